"""Child processes that die with this process (hypervisor, sandboxes, drivers under test).

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process, and
``trio.lowlevel.open_process`` forks from a worker thread, which retires after 10 s idle:
a child told to die with its parent was killed at that moment (an idle ``ringfence up``
lost its hypervisor, xenstored and every domain 10 s after start). So these children are
forked by the thread running the event loop, which lives as long as the process; a fork
and exec blocks it for about a millisecond.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ringfence.hypervisor._lib import lib


class ParentGone(OSError):
    """The parent exited while the child was starting."""


def pipe_to_child(name: str) -> tuple[trio.lowlevel.FdStream, int]:
    """A pipe for a child's ``name`` (stdin, stdout or stderr): our end as a trio stream,
    and the child's end, to close once the child has it."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    ours, theirs = (write_end, read_end) if name == "stdin" else (read_end, write_end)
    return trio.lowlevel.FdStream(ours), theirs


def _dying_with_us(preexec_fn: Callable[[], None] | None) -> Callable[[], None]:
    """A ``preexec_fn`` (run in the child, between fork and exec) that sets the parent-death
    signal, then runs ``preexec_fn``."""
    parent = os.getpid()

    def preexec() -> None:
        if lib.rf_die_with_parent(parent) < 0:
            raise ParentGone("the parent exited while this child was starting")
        if preexec_fn is not None:
            preexec_fn()
    return preexec


def popen_dying_with_us(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` for a child that gets SIGKILL when we exit however we exit: call
    it from a thread that lives as long as the process (the main thread), see above."""
    return subprocess.Popen(list(argv), preexec_fn=_dying_with_us(kwargs.pop("preexec_fn", None)), **kwargs)


async def open_process_dying_with_us(argv: Sequence[str], *,
                                     preexec_fn: Callable[[], None] | None = None,
                                     **kwargs: Any) -> trio.Process:
    """``trio.lowlevel.open_process``, for a child that gets SIGKILL when we exit however we
    exit (also ``kill -9``). Takes the same arguments; ``preexec_fn`` runs after the
    parent-death signal is set."""
    streams: dict[str, Any] = {}
    child_ends: list[int] = []
    try:
        for name in ("stdin", "stdout", "stderr"):
            if kwargs.get(name) != subprocess.PIPE:
                continue
            streams[name], theirs = pipe_to_child(name)
            child_ends.append(theirs)
            kwargs[name] = theirs
        await trio.lowlevel.checkpoint()
        popen = popen_dying_with_us(argv, preexec_fn=preexec_fn, **kwargs)
    except BaseException:
        for stream in streams.values():
            with contextlib.suppress(OSError):
                await trio.aclose_forcefully(stream)
        raise
    finally:
        for fd in child_ends:
            os.close(fd)
    # trio has no public constructor for a Process around a Popen; this is what its own
    # open_process returns.
    return trio.Process._create(popen, streams.get("stdin"), streams.get("stdout"),  # type: ignore[attr-defined]
                                streams.get("stderr"))
