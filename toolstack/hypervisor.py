"""Run the sim hypervisor as a process and start domains under it (dom0's side).

Used by ``ringfence demo``, ``ringfence up``, the benchmarks and the tests.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV, Dom0, open_dom0
from ringfence.isolation.sandbox import SandboxSpec, spawn_sandboxed
from ringfence.isolation.spawn import open_process_dying_with_us


@contextlib.asynccontextmanager
async def open_hypervisor(directory: str | os.PathLike[str], *, verbose: bool = False,
                          quiet: bool = False) -> AsyncIterator[tuple[str, Dom0]]:
    """Start a hypervisor daemon process; yields (socket path, dom0 client)."""
    path = os.path.join(os.fspath(directory), "hv.sock")
    # A socket left by a host that was killed: its appearance must mean the new daemon.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    argv = [sys.executable, "-m", "ringfence"] + (["-vv"] if verbose else []) + [
        "hypervisor", "--socket", path]
    # The domains' hypervisor goes when its toolstack does, even on kill -9.
    process = await open_process_dying_with_us(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else None)
    try:
        with trio.fail_after(20):
            while not os.path.exists(path):
                if process.poll() is not None:
                    raise RuntimeError(f"hypervisor exited with status {process.returncode}")
                await trio.sleep(0.02)
        async with open_dom0(path) as dom0:
            yield path, dom0
    finally:
        process.terminate()
        with trio.move_on_after(5) as scope:
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            await process.wait()


async def start_xenstored(path: str, *, hypervisor: str | None = None,
                          state_dir: str | None = None, quiet: bool = True) -> trio.Process:
    """Start our xenstored on ``path`` and return once it accepts connections (a socket
    left at ``path`` by an earlier run is removed first, so its appearance means this one)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    argv = [sys.executable, "-m", "ringfence", "xenstored", "--socket", path]
    argv += ["--hypervisor", hypervisor] if hypervisor else []
    argv += ["--state-dir", state_dir] if state_dir else []
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL if quiet else None)
    with trio.fail_after(30):
        while not os.path.exists(path):
            if process.poll() is not None:
                raise RuntimeError(f"xenstored exited with status {process.returncode}")
            await trio.sleep(0.02)
    return process


async def spawn_domain(dom0: Dom0, name: str, argv: Sequence[str], *,
                       sandbox: SandboxSpec | None = None, **kwargs: Any) -> tuple[int, trio.Process]:
    """Create a domain and start ``argv`` as its process (it inherits the control socket),
    in a sandbox if one is given."""
    domid, fd = await dom0.create_domain(name)
    env = dict(kwargs.pop("env", None) or os.environ)
    env[DOMAIN_FD_ENV] = str(fd)
    try:
        if sandbox is not None:
            boxed = await spawn_sandboxed(sandbox, argv, pass_fds=(fd,), env=env, **kwargs)
            process = boxed.process
        else:
            process = await trio.lowlevel.open_process(list(argv), pass_fds=(fd,), env=env, **kwargs)
    finally:
        os.close(fd)
    return domid, process
