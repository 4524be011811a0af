"""Real sim hypervisors and domain processes for tests (this project's and others').

``open_hypervisor(dir)`` runs ``ringfence hypervisor`` as a real process and yields a dom0
client; ``spawn_domain(dom0, name, argv)`` creates a domain and starts its process with the
control socket; ``open_agent(dom0, name)`` does that for the scriptable
:mod:`ringfence.testing.domain_agent`.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV, Dom0, open_dom0


@contextlib.asynccontextmanager
async def open_hypervisor(directory: str | os.PathLike[str], *, verbose: bool = False,
                          quiet: bool = False) -> AsyncIterator[tuple[str, Dom0]]:
    """Start a hypervisor daemon process; yields (socket path, dom0 client)."""
    path = os.path.join(os.fspath(directory), "hv.sock")
    argv = [sys.executable, "-m", "ringfence"] + (["-vv"] if verbose else []) + [
        "hypervisor", "--socket", path]
    process = await trio.lowlevel.open_process(
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


async def spawn_domain(dom0: Dom0, name: str, argv: Sequence[str], **kwargs: Any) -> tuple[int, trio.Process]:
    """Create a domain and start ``argv`` as its process (it inherits the control socket)."""
    domid, fd = await dom0.create_domain(name)
    env = dict(kwargs.pop("env", None) or os.environ)
    env[DOMAIN_FD_ENV] = str(fd)
    try:
        process = await trio.lowlevel.open_process(list(argv), pass_fds=(fd,), env=env, **kwargs)
    finally:
        os.close(fd)
    return domid, process


class AgentDomain:
    """A domain process driven by JSON commands (see domain_agent)."""

    def __init__(self, domid: int, process: trio.Process) -> None:
        self.domid = domid
        self.process = process
        self.pid = process.pid
        self._buffer = b""

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        return await self._read()

    async def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        with trio.fail_after(30):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    raise EOFError(f"domain {self.domid} exited (status {self.process.poll()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return dict(json.loads(line))

    async def ok(self, cmd: str, **args: Any) -> dict[str, Any]:
        result = await self.call(cmd, **args)
        if not result.get("ok"):
            raise AssertionError(f"{cmd} failed: {result}")
        return result

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


@contextlib.asynccontextmanager
async def open_agent(dom0: Dom0, name: str, *, user: int | None = None) -> AsyncIterator[AgentDomain]:
    argv = [sys.executable, "-m", "ringfence.testing.domain_agent"]
    kwargs: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    if user is not None:
        argv += ["--user", str(user)]  # the agent drops to it once Python is loaded
    domid, process = await spawn_domain(dom0, name, argv, **kwargs)
    agent = AgentDomain(domid, process)
    try:
        hello = await agent._read()
        if not hello.get("ok"):
            raise RuntimeError(f"domain {name} failed to start: {hello}")
        yield agent
    finally:
        agent.kill()
        with trio.move_on_after(5):
            await process.wait()
