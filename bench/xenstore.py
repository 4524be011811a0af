"""``ringfence bench xenstore``: our xenstored against Xen's C xenstored, same client.

Both daemons run side by side as processes, each on the second CPU, and the same client
(``xs_client.c``, built in the run, on the first CPU) drives each in turn, in rounds that
alternate (each figure is the median of its side's rounds): one read at a time, 64 reads in
flight, read-modify-write transactions, write-to-watch-event latency. The client is C so that
the daemons are measured: our Python client spends ~170 us of its own per round trip here,
and through it both daemons measure the same. Restore: 10,000 nodes written through a
``--state-dir`` daemon, then loaded back as a restarted daemon does, against the 100 ms goal.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import trio

from ringfence.bench.cbuild import build
from ringfence.bench.report import Metric
from ringfence.testing.peers import open_peer_xenstored
from ringfence.xenbus.client import open_xenstore


async def _start_ours(directory: str, state: str | None = None) -> tuple[str, trio.Process]:
    from ringfence.toolstack.hypervisor import start_xenstored
    path = os.path.join(directory, f"ours-{time.monotonic_ns()}.sock")
    return path, await start_xenstored(path, state_dir=state)


ROUNDS_QUICK, ROUNDS_FULL = 3, 7
# per round: (mode of xs_client.c, count, metric, unit, goal)
MODES = [("read", 5000, "read_latency_qd1", "us", "<=1.0"),
         ("pipelined", 100_000, "read_pipelined_64", "reads/s", ">=1.0"),
         ("tx", 2000, "transaction_rate", "tx/s", ">=1.0"),
         ("watch", 3000, "watch_latency", "us", "<=1.0")]


def _placement() -> tuple[int | None, int | None]:
    """The client on one CPU, the daemon on another, the same for both daemons."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)


def _pin(pid: int, cpu: int | None) -> None:
    if cpu is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):  # every thread: ours has the engine's too
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


async def _client(binary: str, path: str, mode: str, count: int, cpu: int | None) -> float:
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    done = await trio.run_process([binary, path, mode, str(count)], capture_stdout=True,
                                  preexec_fn=pin)
    return float(done.stdout)


async def _measure(binary: str, paths: dict[str, str], quick: bool, client_cpu: int | None,
                   progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Rounds that take turns, the peer's then ours, and the median of each side's rounds:
    one pass of each left the second measured on a host busier or quieter by then."""
    rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
    seen: dict[str, dict[str, list[float]]] = {side: {} for side in paths}
    for number in range(rounds):
        progress(f"round {number + 1} of {rounds}")
        for side, path in paths.items():
            for mode, count, metric, _, _ in MODES:
                value = await _client(binary, path, mode, count // (2 if quick else 1), client_cpu)
                seen[side].setdefault(metric, []).append(value)
    return {side: {metric: statistics.median(values) for metric, values in by_metric.items()}
            for side, by_metric in seen.items()}


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
    client_cpu, daemon_cpu = _placement()
    with tempfile.TemporaryDirectory() as tmp:
        binary = build("xs_client.c", tmp)
        progress("starting Xen's C xenstored (peer) and ours")
        ours_path, ours = await _start_ours(tmp)
        try:
            async with open_peer_xenstored(tmp) as peer_path:
                _pin(ours.pid, daemon_cpu)
                _pin(_socket_owner(peer_path), daemon_cpu)
                figures = await _measure(binary, {"peer": peer_path, "ours": ours_path}, quick,
                                         client_cpu, progress)
        finally:
            ours.terminate()
            await ours.wait()
        progress("restore of 10,000 nodes after kill -9")
        restore = await _restore_ms(tmp)
    metrics = [Metric(metric, figures["ours"][metric], figures["peer"][metric], unit, goal)
               for _, _, metric, unit, goal in MODES]
    return metrics + [Metric("restore_10k_nodes", restore, 100.0, "ms", "<=1.0")]


def _socket_owner(path: str) -> int:
    """The process listening on a Unix socket path (the peer is started by a script)."""
    inode = None
    with open("/proc/net/unix") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[-1] == path:
                inode = fields[6]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return int(pid)
    raise RuntimeError(f"no process listens on {path}")


def run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    return trio.run(_run, quick, progress)
