"""``ringfence bench ring``: our ring between two sim domains against C peers.

Ours: a front and a back domain process under a real sim hypervisor; the front grants a ring
page and an event channel, the back maps and binds them, and both loop with the ring API
drivers use (FrontRing/BackRing, one C call per batch, eventfd notifications with event-index
suppression, a short busy-poll before blocking when the peer is on another CPU).
Peers, built with gcc in the same run: an eventfd ping-pong between two processes (for one
request in flight) and a plain C ring with the same layout (for 32 in flight).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources

import trio

from ringfence.bench.report import Metric

REQ, RSP = 112, 16
SPIN_NS = 50_000  # busy-poll budget before blocking, as NAPI's busy_poll


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


# ---- the two domain processes -------------------------------------------------------------

async def _front(mode: str, cpu: int, count: int, depth: int, spin: int, back_domid: int) -> None:
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

        run = qd1 if mode == "qd1" else batched
        run(max(count // 20, 100))  # warm up
        started = time.perf_counter()
        run(count)
        elapsed = time.perf_counter() - started
        print(json.dumps({"elapsed": elapsed, "count": count}), flush=True)
        front.staging[0] = 0xFF  # stop marker: operation 0xff
        front.submit_staged(1, notify)


async def _back(cpu: int, spin: int, front_domid: int, gref: int, port_no: int) -> None:
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
        n = 0
        while True:
            n = exchange(n, notify, wait, spin)
            if received[(n - 1) * REQ] == 0xFF:
                return


def worker_main(argv: list[str]) -> None:
    role = argv[0]
    if role == "front":
        mode, cpu, count, depth, spin, back = argv[1], *map(int, argv[2:7])
        trio.run(_front, mode, cpu, count, depth, spin, back)
    else:
        cpu, spin, front, gref, port = map(int, argv[1:6])
        trio.run(_back, cpu, spin, front, gref, port)


async def _ours(mode: str, cpus: tuple[int, int], count: int, depth: int) -> float:
    """Seconds per request for our ring between two sim domains."""
    from ringfence.testing.sim import open_hypervisor, spawn_domain
    spin = SPIN_NS
    with tempfile.TemporaryDirectory() as tmp:
        async with open_hypervisor(tmp, quiet=True) as (_, dom0):
            base = [sys.executable, "-m", "ringfence.bench.ring"]
            back_domid, fd = await dom0.create_domain("bench-back")
            front_domid, front = await spawn_domain(
                dom0, "bench-front",
                base + ["front", mode, str(cpus[0]), str(count), str(depth), str(spin), str(back_domid)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            lines = _Lines(front.stdout)
            info = json.loads(await lines.next())
            env = dict(os.environ, RINGFENCE_DOMAIN_FD=str(fd))
            back = await trio.lowlevel.open_process(
                base + ["back", str(cpus[1]), str(spin), str(front_domid), str(info["gref"]),
                        str(info["port"])], pass_fds=(fd,), env=env, stdout=subprocess.PIPE)
            os.close(fd)
            assert (await _Lines(back.stdout).next()).strip() == "attached"
            await front.stdin.send_all(b"go\n")
            result = json.loads(await lines.next())
            with trio.fail_after(30):
                await front.wait()
                await back.wait()
            return float(result["elapsed"]) / int(result["count"])


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream, self.buffer = stream, b""

    async def next(self) -> str:
        with trio.fail_after(60):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(4096)
                if not chunk:
                    raise RuntimeError("benchmark worker exited")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def _build_peers(workdir: str) -> str:
    source = resources.files("ringfence.bench").joinpath("ring_peers.c")
    binary = os.path.join(workdir, "ring_peers")
    with resources.as_file(source) as path:
        subprocess.run(["gcc", "-O2", "-o", binary, str(path)], check=True)
    return binary


def _peer(binary: str, *args: object) -> float:
    out = subprocess.run([binary, *map(str, args)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    if shutil.which("gcc") is None:
        raise RuntimeError("the ring benchmark builds its C peers with gcc")
    cpus = sorted(os.sched_getaffinity(0))
    cross = (cpus[0], cpus[1]) if len(cpus) > 1 else None
    qd1_n = 20_000 if quick else 200_000
    batch_n = 300_000 if quick else 3_000_000
    metrics = []
    with tempfile.TemporaryDirectory() as tmp:
        binary = _build_peers(tmp)
        placements = [("same_cpu", (cpus[0], cpus[0]))] + ([("cross_cpu", cross)] if cross else [])
        for label, pair in placements:
            progress(f"qd1 round trip, {label}: C eventfd ping-pong")
            peer_ns = _peer(binary, "pingpong", pair[0], pair[1], qd1_n)
            progress(f"qd1 round trip, {label}: ours between two sim domains")
            ours_ns = trio.run(_ours, "qd1", pair, qd1_n, 1) * 1e9
            name = "qd1_roundtrip" if label == "cross_cpu" or not cross else f"qd1_roundtrip_{label}"
            metrics.append(Metric(name, ours_ns, peer_ns, "ns", "<=1.3"))
        for label, pair in placements:
            progress(f"32 in flight, {label}: plain C ring")
            peer_rate = _peer(binary, "ring", pair[0], pair[1], batch_n, 32)
            progress(f"32 in flight, {label}: ours between two sim domains")
            ours_rate = 1 / trio.run(_ours, "batched", pair, batch_n, 32)
            name = "batched_throughput" if label == "cross_cpu" or not cross else f"batched_throughput_{label}"
            metrics.append(Metric(name, ours_rate, peer_rate, "req/s", ">=0.5"))
    return metrics


if __name__ == "__main__":
    worker_main(sys.argv[1:])
