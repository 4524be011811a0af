"""``ringfence bench xenstore``: our xenstored against Xen's C xenstored, same client.

Both daemons run side by side as processes; the same trio client drives each in turn:
one read at a time, 64 reads in flight, read-modify-write transactions, write-to-watch-event
latency. Restore: 10,000 nodes written through a ``--state-dir`` daemon, then loaded back as
a restarted daemon does, against the 100 ms goal.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import trio

from ringfence.bench.report import Metric
from ringfence.testing.peers import open_peer_xenstored
from ringfence.xenbus.client import XenStore, open_xenstore


async def _start_ours(directory: str, state: str | None = None) -> tuple[str, trio.Process]:
    from ringfence.toolstack.hypervisor import start_xenstored
    path = os.path.join(directory, f"ours-{time.monotonic_ns()}.sock")
    return path, await start_xenstored(path, state_dir=state)


async def _read_latency(xs: XenStore, n: int) -> float:
    await xs.write("/bench/key", b"value")
    started = time.perf_counter()
    for _ in range(n):
        await xs.read("/bench/key")
    return (time.perf_counter() - started) / n * 1e6


async def _read_pipelined(xs: XenStore, n: int, depth: int = 64) -> float:
    await xs.write("/bench/key", b"value")
    per_task = n // depth

    async def worker() -> None:
        for _ in range(per_task):
            await xs.read("/bench/key")

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    return per_task * depth / (time.perf_counter() - started)


async def _transactions(xs: XenStore, n: int) -> float:
    await xs.write("/bench/counter", b"0")
    started = time.perf_counter()
    for _ in range(n):
        async for tx in xs.transaction():
            async with tx:
                value = int(await tx.read("/bench/counter"))
                await tx.write("/bench/counter", str(value + 1))
    return n / (time.perf_counter() - started)


async def _watch_latency(path: str, n: int) -> float:
    async with open_xenstore(path) as watcher, open_xenstore(path) as writer:
        async with watcher.watch("/bench/w", "t") as events:
            await events.receive()  # the initial event
            total = 0.0
            for i in range(n):
                started = time.perf_counter()
                await writer.write("/bench/w/x", str(i))
                await events.receive()
                total += time.perf_counter() - started
    return total / n * 1e6


async def _measure(path: str, quick: bool) -> dict[str, float]:
    scale = 1 if quick else 5
    async with open_xenstore(path) as xs:
        await _read_latency(xs, 200)  # warm up
        return {
            "read_latency_qd1": await _read_latency(xs, 2000 * scale),
            "read_pipelined_64": await _read_pipelined(xs, 12800 * scale),
            "transaction_rate": await _transactions(xs, 500 * scale),
            "watch_latency": await _watch_latency(path, 500 * scale),
        }


async def _restore_ms(directory: str) -> float:
    from ringfence.xenbus.persistence import Journal
    from ringfence.xenbus.server import XenStoreServer
    state = os.path.join(directory, "state")
    os.makedirs(state)
    path, process = await _start_ours(directory, state)
    try:
        async with open_xenstore(path) as xs:
            async with trio.open_nursery() as nursery:
                for block in range(100):
                    async def fill(block: int = block) -> None:
                        for i in range(100):
                            await xs.write(f"/restore/{block}/{i}", b"x" * 32)
                    nursery.start_soon(fill)
    finally:
        process.kill()  # kill -9: no clean shutdown
        await process.wait()
    best = float("inf")
    for _ in range(3):
        server = XenStoreServer()
        journal = Journal.open(state, server)
        journal.close()
        assert len(server.store.nodes) >= 10_000
        best = min(best, journal.restore_ms)
    return best


async def _run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    with tempfile.TemporaryDirectory() as tmp:
        progress("starting Xen's C xenstored (peer) and ours")
        ours_path, ours = await _start_ours(tmp)
        try:
            async with open_peer_xenstored(tmp) as peer_path:
                progress("measuring Xen's C xenstored")
                peer = await _measure(peer_path, quick)
                progress("measuring ours")
                mine = await _measure(ours_path, quick)
        finally:
            ours.terminate()
            await ours.wait()
        progress("restore of 10,000 nodes after kill -9")
        restore = await _restore_ms(tmp)
    return [
        Metric("read_latency_qd1", mine["read_latency_qd1"], peer["read_latency_qd1"], "us", "<=1.0"),
        Metric("read_pipelined_64", mine["read_pipelined_64"], peer["read_pipelined_64"], "reads/s", ">=1.0"),
        Metric("transaction_rate", mine["transaction_rate"], peer["transaction_rate"], "tx/s", ">=1.0"),
        Metric("watch_latency", mine["watch_latency"], peer["watch_latency"], "us", "<=1.0"),
        Metric("restore_10k_nodes", restore, 100.0, "ms", "<=1.0"),
    ]


def run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    return trio.run(_run, quick, progress)
