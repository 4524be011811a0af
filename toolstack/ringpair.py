"""Two sim domains joined by a ring pair: the smallest complete split driver.

The front domain allocates a ring page, grants it to the back domain and allocates an event
channel for it; the back domain maps the page and binds the channel; then the front sends
requests and the back answers them with the ring API every driver uses. The demo shows it
with statistics, the ring benchmark times it. Each end runs as its own domain process:
``python -m ringfence.toolstack.ringpair front|back …``.

``driver`` says who loops: "python" (a ring method call a round, as a Python driver does) or
"c" (the whole loop in the C core, ringdrive.c, as the net data path drives its rings).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import trio

REQ, RSP = 112, 16
SPIN_NS = 50_000  # busy-poll budget before blocking, as NAPI's busy_poll


def _pin(cpu: int) -> None:
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})


async def _front(mode: str, driver: str, cpu: int, count: int, depth: int, spin: int,
                 back_domid: int) -> None:
    from ringfence.hypervisor._lib import ffi, lib
    from ringfence.hypervisor.io.ring import FrontRing
    from ringfence.hypervisor.sim.client import open_domain
    _pin(cpu)
    async with open_domain() as dom:
        pages = await dom.memory.alloc_pages(1)
        gref = dom.grant_table.grant_access(back_domid, pages.frames[0])
        port = await dom.events.alloc_unbound(back_domid)
        front = FrontRing(pages.buffer, REQ, RSP)
        print(json.dumps({"gref": gref, "port": port.port, "domid": dom.domid}), flush=True)
        sys.stdin.readline()  # the back end is attached
        notify, wait = port.notify_fd, port.wait_fd
        exchange = front.exchange

        def qd1(n: int) -> None:
            for _ in range(n):
                exchange(1, notify, wait, spin)

        def batched(n: int) -> None:
            sent = done = 0
            while done < n:
                room = min(depth - (sent - done), n - sent)
                sent += room
                done += exchange(room, notify, wait, spin, depth // 2)

        def in_c(n: int) -> None:
            done = lib.rf_drive_front(front.c_ring, ffi.new("uint8_t[]", REQ), n,
                                      1 if mode == "qd1" else depth, notify, wait, spin)
            if done < 0:
                raise OSError(-done, "driving the ring")

        run = in_c if driver == "c" else qd1 if mode == "qd1" else batched
        run(max(count // 20, 100))  # warm up
        started = time.perf_counter()
        run(count)
        elapsed = time.perf_counter() - started
        print(json.dumps({"elapsed": elapsed, "count": count,
                          "ring": asdict(front.statistics()),
                          "grants": asdict(dom.grant_table.statistics()),
                          "port": asdict(port.statistics())}), flush=True)
        front.staging[0] = 0xFF  # stop marker: operation 0xff
        front.submit_staged(1, notify)


async def _back(driver: str, cpu: int, spin: int, front_domid: int, gref: int, port_no: int) -> None:
    from ringfence.hypervisor._lib import ffi, lib
    from ringfence.hypervisor.io.ring import BackRing
    from ringfence.hypervisor.sim.client import open_domain
    _pin(cpu)
    async with open_domain() as dom:
        mapped = await dom.grant_table.map(front_domid, [gref])
        port = await dom.events.bind_interdomain(front_domid, port_no)
        back = BackRing(mapped.buffer, REQ, RSP)
        print("attached", flush=True)
        notify, wait = port.notify_fd, port.wait_fd
        exchange, received = back.exchange, back.received
        # Half the ring per call: the front refills one half while we serve the other.
        budget = back.size // 2
        if driver == "c":
            answered = lib.rf_drive_back(back.c_ring, ffi.new("uint8_t[]", RSP), 0xFF, budget,
                                         notify, wait, spin)
            if answered < 0:
                raise OSError(-answered, "driving the ring")
        else:
            n = 0
            while True:
                n = exchange(n, notify, wait, spin, budget)
                if received[(n - 1) * REQ] == 0xFF:
                    break
        print(json.dumps({"ring": asdict(back.statistics()),
                          "grants": asdict(dom.grant_table.statistics()),
                          "port": asdict(port.statistics())}), flush=True)


def worker_main(argv: list[str]) -> None:
    from ringfence.isolation.sandbox import drop_privileges_from_environment
    drop_privileges_from_environment()
    role = argv[0]
    if role == "front":
        mode, driver, cpu, count, depth, spin, back = argv[1], argv[2], *map(int, argv[3:8])
        trio.run(_front, mode, driver, cpu, count, depth, spin, back)
    else:
        driver, (cpu, spin, front, gref, port) = argv[1], map(int, argv[2:7])
        trio.run(_back, driver, cpu, spin, front, gref, port)


async def run_ring_pair(mode: str, cpus: tuple[int, int], count: int, depth: int,
                        spin: int = SPIN_NS, *, driver: str = "python", sandboxed: bool = False,
                        progress: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Run a front and a back domain under a fresh hypervisor; returns timing and statistics.

    ``mode`` is "qd1" (one request in flight) or "batched" (``depth`` in flight); with
    ``sandboxed`` each domain runs in its own sandbox (namespaces, cgroup, no privileges).
    """
    from ringfence.isolation.sandbox import SandboxSpec
    from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain

    base = [sys.executable, "-m", "ringfence.toolstack.ringpair"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    with tempfile.TemporaryDirectory() as tmp:
        async with open_hypervisor(tmp, quiet=True) as (_, dom0):
            progress("hypervisor up")
            # The back domain is created first so that the front knows whom to grant to.
            back_domid, back_fd = await dom0.create_domain("ring-back")
            front_domid, front = await spawn_domain(
                dom0, "ring-front",
                base + ["front", mode, driver, str(cpus[0]), str(count), str(depth), str(spin),
                        str(back_domid)],
                sandbox=SandboxSpec("ring-front") if sandboxed else None, **pipes)
            front_lines = _Lines(front.stdout)
            info = json.loads(await front_lines.next())
            progress(f"front domain {front_domid} granted ring page gref={info['gref']} "
                     f"and event channel port={info['port']}")
            back = await _start_with_fd(
                base + ["back", driver, str(cpus[1]), str(spin), str(front_domid), str(info["gref"]),
                        str(info["port"])], back_fd, SandboxSpec("ring-back") if sandboxed else None)
            back_lines = _Lines(back.stdout)
            if (await back_lines.next()).strip() != "attached":
                raise RuntimeError("back domain failed to attach")
            progress(f"back domain {back_domid} mapped the ring and bound the channel")
            await front.stdin.send_all(b"go\n")
            progress(f"sending {count} requests ({mode}, {depth} in flight)")
            result = json.loads(await front_lines.next())
            back_result = json.loads(await back_lines.next())
            stats = await dom0.statistics()
            with trio.fail_after(30):
                await front.wait()
                await back.wait()
            return {"seconds_per_request": float(result["elapsed"]) / int(result["count"]),
                    "front": result, "back": back_result, "hypervisor": stats["hypervisor"],
                    "domains": stats["domains"], "front_domid": front_domid,
                    "back_domid": back_domid}


async def _start_with_fd(argv: list[str], fd: int, sandbox: Any) -> trio.Process:
    """Start a created domain's process with its control socket."""
    from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV
    from ringfence.isolation.sandbox import spawn_sandboxed
    env = dict(os.environ, **{DOMAIN_FD_ENV: str(fd)})
    try:
        if sandbox is not None:
            return (await spawn_sandboxed(sandbox, argv, pass_fds=(fd,), env=env,
                                          stdout=subprocess.PIPE)).process
        return await trio.lowlevel.open_process(argv, pass_fds=(fd,), env=env,
                                                stdout=subprocess.PIPE)
    finally:
        os.close(fd)


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream, self.buffer = stream, b""

    async def next(self) -> str:
        with trio.fail_after(60):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(4096)
                if not chunk:
                    raise RuntimeError("domain process exited")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


if __name__ == "__main__":
    worker_main(sys.argv[1:])
