"""Real sim hypervisors and domain processes for tests (this project's and others').

``open_hypervisor(dir)`` runs ``ringfence hypervisor`` as a real process and yields a dom0
client; ``spawn_domain(dom0, name, argv)`` creates a domain and starts its process with the
control socket; ``open_agent(dom0, name)`` does that for the scriptable
:mod:`ringfence.testing.domain_agent`; ``open_net_host`` runs a hypervisor, xenstored and a
network driver domain, and ``start_netfront_guest`` a sandboxed guest whose eth0 is one of
its vifs; ``relaunch_storage_domain`` kills a storage
driver domain with -9 and hands its disk to a new one, as the supervisor would;
``start_domain_program`` runs a test's own ``python -c`` program as a domain created with
``dom0.create_domain``, and ``program_output`` is all it prints.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV, Dom0
from ringfence.isolation.sandbox import Cgroup, SandboxedProcess, SandboxSpec
from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain

__all__ = ["AgentDomain", "NetHost", "NetfrontGuest", "open_agent", "open_hypervisor",
           "open_net_host", "program_output", "relaunch_storage_domain", "spawn_domain",
           "start_domain_program", "start_netfront_guest"]


async def start_domain_program(code: str, fd: int, *args: str, stdin: Any = None,
                               stdout: Any = subprocess.PIPE) -> trio.Process:
    """``python -c code args`` as the process of the domain whose control socket is ``fd``
    (as ``dom0.create_domain`` gives it; closed here once the process has it)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", code, *args], pass_fds=(fd,), stdin=stdin, stdout=stdout,
        env=dict(os.environ, **{DOMAIN_FD_ENV: str(fd)}))
    os.close(fd)
    return process


async def program_output(process: trio.Process, timeout: float = 30) -> bytes:
    """All a program started with ``stdout=PIPE`` prints, once it is done."""
    out = b""
    with trio.fail_after(timeout):
        async for chunk in process.stdout:
            out += chunk
    return out


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
async def open_agent(dom0: Dom0, name: str, *, user: int | None = None,
                     sandbox: SandboxSpec | None = None) -> AsyncIterator[AgentDomain]:
    """An agent domain; in ``sandbox``, if given (its process is then the sandbox's waiter,
    and its cgroup goes with it)."""
    argv = [sys.executable, "-m", "ringfence.testing.domain_agent"]
    kwargs: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    if user is not None:
        argv += ["--user", str(user)]  # the agent drops to it once Python is loaded
    domid, process = await spawn_domain(dom0, name, argv, sandbox=sandbox, **kwargs)
    agent = AgentDomain(domid, process)
    try:
        hello = await agent._read()
        if not hello.get("ok"):
            raise RuntimeError(f"domain {name} failed to start: {hello}")
        yield agent
    finally:
        if sandbox is None:
            agent.kill()
            with trio.move_on_after(5):
                await process.wait()
        else:  # killed, waited for, its cgroup emptied and removed: as any sandbox
            with trio.move_on_after(5):
                await SandboxedProcess(sandbox, process, Cgroup(sandbox.name, sandbox.group)).aclose()


async def relaunch_storage_domain(dom0: Dom0, xs: Any, process: trio.Process, *, domid: int,
                                  name: str, argv: list[str], frontend: int, devid: int,
                                  target: str) -> tuple[int, trio.Process]:
    """kill -9 the driver domain's process (requests in flight die with it), start ``argv``
    as a new domain and move the vbd to it; returns the new domain's id and process."""
    from ringfence.toolstack.devices import move_vbd
    process.kill()
    await process.wait()
    new_domid, new_process = await spawn_domain(dom0, name, argv, stderr=subprocess.DEVNULL)
    await move_vbd(xs, old_backend=domid, new_backend=new_domid, frontend=frontend,
                   devid=devid, target=target)
    return new_domid, new_process


@dataclass
class NetfrontGuest:
    domid: int
    box: Any   # its SandboxedProcess
    pid: int   # the guest's own process, inside its namespaces (for nsenter)


async def start_netfront_guest(dom0: Dom0, xs_path: str, backend: int, name: str, *, mac: str,
                               netfront_args: Sequence[str], directory: str,
                               **vif: Any) -> NetfrontGuest:
    """Create guest ``name`` with vif 0 on network driver domain ``backend`` (``vif``: more
    of add_vif's keys, say ``mtu`` or ``bridge``), start ``ringfence netfront
    NETFRONT_ARGS`` in a sandbox of its own, and return once its eth0 is up."""
    from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV
    from ringfence.isolation.sandbox import SandboxSpec, innermost_pid, spawn_sandboxed
    from ringfence.toolstack.devices import add_vif
    from ringfence.xenbus.client import open_xenstore
    domid, fd = await dom0.create_domain(name)
    try:
        async with open_xenstore(xs_path) as xs:
            await add_vif(xs, backend=backend, frontend=domid, devid=0, mac=mac, **vif)
        marker = os.path.join(directory, f"{name}.out")
        with open(marker, "wb") as out:
            box = await spawn_sandboxed(
                SandboxSpec(name, uid=0), [sys.executable, "-m", "ringfence", "netfront", *netfront_args],
                pass_fds=(fd,), env=dict(os.environ, **{DOMAIN_FD_ENV: str(fd)}),
                stdout=out, stderr=subprocess.DEVNULL)
    finally:
        os.close(fd)
    with trio.fail_after(30):
        while b"netfront ready" not in open(marker, "rb").read():
            if box.process.poll() is not None:
                raise RuntimeError(f"guest {name} exited while starting")
            await trio.sleep(0.05)
    return NetfrontGuest(domid, box, innermost_pid(box.pid))


@dataclass
class NetHost:
    directory: str
    dom0: Dom0
    xs_path: str
    net_domid: int
    net: trio.Process   # the network driver domain's process (its sandbox's waiter)
    guests: list[NetfrontGuest]

    async def start_guest(self, name: str, *, mac: str, netfront_args: Sequence[str],
                          **vif: Any) -> NetfrontGuest:
        """A netfront guest on this driver domain (see start_netfront_guest), stopped with
        the host."""
        guest = await start_netfront_guest(self.dom0, self.xs_path, self.net_domid, name, mac=mac,
                                           netfront_args=netfront_args, directory=self.directory,
                                           **vif)
        self.guests.append(guest)
        return guest


@contextlib.asynccontextmanager
async def open_net_host(directory: str, *, netback_env: dict[str, str] | None = None,
                        name: str = "net") -> AsyncIterator[NetHost]:
    """A hypervisor, xenstored and ``ringfence netback`` as sandboxed driver domain
    ``name`` (``netback_env``: its environment); its guests, netback and xenstored go when
    the block ends."""
    from ringfence.isolation.sandbox import SandboxSpec
    from ringfence.toolstack.hypervisor import start_xenstored
    async with open_hypervisor(directory, quiet=True) as (hv_path, dom0):
        xs_path = os.path.join(directory, "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        host = None
        try:
            await trio.sleep(0.2)  # registered with the hypervisor
            net_domid, net = await spawn_domain(
                dom0, name, [sys.executable, "-m", "ringfence", "netback"], env=netback_env,
                sandbox=SandboxSpec(name, uid=0), stderr=subprocess.DEVNULL)
            host = NetHost(directory, dom0, xs_path, net_domid, net, [])
            yield host
        finally:
            if host is not None:
                for guest in host.guests:
                    await guest.box.aclose()
                with contextlib.suppress(ProcessLookupError):
                    host.net.kill()
            xenstored.terminate()
            await xenstored.wait()
