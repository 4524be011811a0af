"""``ringfence bench ring``: our ring between two sim domains against C peers.

Ours: a front and a back domain process under a real sim hypervisor; the front grants a ring
page and an event channel, the back maps and binds them, and both loop in the C core
(ringdrive.c: the ring API drivers use, eventfd notifications with event-index suppression,
a short busy-poll before blocking), as the net data path drives its rings (netloop.c). The
metrics are these. The same pair looping in Python, a ring method call a round
(FrontRing/BackRing.exchange, as a driver written in Python does), is measured too and shown
on the progress lines: that is the interpreter's cost, not the ring's.
Peers, built with gcc in the same run: an eventfd ping-pong between two processes (for one
request in flight) and a plain C ring with the same layout (for 32 in flight).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable

import trio

from ringfence.bench.cbuild import build
from ringfence.bench.report import Metric
from ringfence.toolstack.ringpair import run_ring_pair

REQ, RSP = 112, 16
SPIN_NS = 50_000  # busy-poll budget before blocking, as NAPI's busy_poll


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _peer(binary: str, *args: object) -> float:
    out = subprocess.run([binary, *map(str, args)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    cpus = sorted(os.sched_getaffinity(0))
    cross = (cpus[0], cpus[1]) if len(cpus) > 1 else None
    qd1_n = 20_000 if quick else 200_000
    batch_n = 300_000 if quick else 3_000_000
    metrics = []
    with tempfile.TemporaryDirectory() as tmp:
        binary = build("ring_peers.c", tmp)
        placements = [("same_cpu", (cpus[0], cpus[0]))] + ([("cross_cpu", cross)] if cross else [])
        for label, pair in placements:
            progress(f"qd1 round trip, {label}: C eventfd ping-pong")
            peer_ns = _peer(binary, "pingpong", pair[0], pair[1], qd1_n)
            progress(f"qd1 round trip, {label}: ours between two sim domains")
            ours_ns = _seconds_per_request("qd1", pair, qd1_n, 1, "c") * 1e9
            python_ns = _seconds_per_request("qd1", pair, qd1_n, 1, "python") * 1e9
            progress(f"qd1 round trip, {label}: looping in Python {python_ns:.0f} ns "
                     f"({python_ns / peer_ns:.2f}x the ping-pong)")
            name = "qd1_roundtrip" if label == "cross_cpu" or not cross else f"qd1_roundtrip_{label}"
            metrics.append(Metric(name, ours_ns, peer_ns, "ns", "<=1.3"))
        for label, pair in placements:
            progress(f"32 in flight, {label}: plain C ring")
            peer_rate = _peer(binary, "ring", pair[0], pair[1], batch_n, 32)
            progress(f"32 in flight, {label}: ours between two sim domains")
            ours_rate = 1 / _seconds_per_request("batched", pair, batch_n, 32, "c")
            python_rate = 1 / _seconds_per_request("batched", pair, batch_n // 3, 32, "python")
            progress(f"32 in flight, {label}: looping in Python {python_rate:.0f} req/s "
                     f"({python_rate / peer_rate:.2f}x the C ring)")
            name = "batched_throughput" if label == "cross_cpu" or not cross else f"batched_throughput_{label}"
            metrics.append(Metric(name, ours_rate, peer_rate, "req/s", ">=0.5"))
    return metrics


def _seconds_per_request(mode: str, pair: tuple[int, int], count: int, depth: int, driver: str) -> float:
    result = trio.run(lambda: run_ring_pair(mode, pair, count, depth, driver=driver))
    return float(result["seconds_per_request"])

