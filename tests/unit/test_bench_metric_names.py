"""Every benchmark prints the metrics DESIGN.md §8 names, under those names: scripts and
dashboards that read ``metric=<name>`` lines rely on them (the recovery benchmark printed
``recovery_p99_*`` for ``kill_to_io_p99_*`` for a long while before anyone noticed)."""
from __future__ import annotations

import importlib
import re

import pytest

# DESIGN.md §8, benchmark by benchmark (more may come beside them).
DESIGN_METRICS = {
    "ring": ["qd1_roundtrip", "batched_throughput"],
    "xenstore": ["read_latency_qd1", "read_pipelined_64", "transaction_rate", "watch_latency",
                 "restore_10k_nodes"],
    "blk": ["randread_4k_qd32_iops", "seqread_1m_throughput", "qd1_latency", "persistent_vs_map_iops"],
    "net": ["tcp_throughput", "udp_64b_pps"],
    "recovery": ["kill_to_io_p99_cold", "kill_to_io_p99_warm", "bystander_throughput"],
}


@pytest.mark.parametrize("bench", sorted(DESIGN_METRICS))
def test_a_benchmark_names_its_metrics_as_the_design_does(bench):
    module = importlib.import_module(f"ringfence.bench.{bench}")
    with open(module.__file__, encoding="utf-8") as f:
        quoted = set(re.findall(r'"([a-z0-9_]+)"', f.read()))
    missing = [name for name in DESIGN_METRICS[bench] if name not in quoted]
    assert not missing, f"bench {bench} never names {missing}"
