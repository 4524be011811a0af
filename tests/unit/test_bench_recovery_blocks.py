"""``bench recovery``'s bystander figures: which of fio's intervals count for a block, and
throughput as I/Os over time."""
from __future__ import annotations

from ringfence.bench.recovery import FioSeries, _cost_per_kill, _iops, _ratio_error


def _series(samples: list[tuple[float, int, int]]) -> FioSeries:
    fio = object.__new__(FioSeries)  # no fio process: only its reports
    fio.samples = samples
    return fio


def test_only_intervals_wholly_inside_a_block_count():
    # (came at, total ios, fio's runtime in ms), cumulative: one report every half second
    fio = _series([(0.0, 0, 0), (0.5, 100, 500), (1.0, 300, 1000), (1.5, 350, 1500), (2.0, 400, 2000)])
    assert fio.intervals_within([(0.4, 1.6)]) == [(200, 500), (50, 500)]
    assert fio.intervals_within([(0.0, 0.9), (1.5, 2.0)]) == [(100, 500), (50, 500)]
    assert fio.intervals_within([(0.6, 0.9)]) == []


def test_throughput_counts_every_interval_not_the_median():
    # a stall in one interval of three: the median would not see it, I/Os over time do
    intervals = [(1000, 500), (1000, 500), (100, 500)]
    assert _iops(intervals) == 2100 * 1000 / 1500


def test_the_ratio_error_shrinks_with_more_intervals_and_less_spread():
    noisy = [(900, 500), (1100, 500)] * 4
    steady = [(1000, 500)] * 8
    assert _ratio_error(steady, steady) == 0.0
    few, many = _ratio_error(noisy[:2], steady), _ratio_error(noisy * 4, steady)
    assert 0 < many < few
    assert abs(few - 0.1) < 1e-9  # rates 1.8 and 2.2: stdev 0.28, over sqrt(2) and the mean 2.0
    assert _ratio_error(noisy[:1], steady) == float("inf")  # one interval says nothing


def test_a_kills_cost_is_the_io_time_it_took_from_the_bystander():
    alone = [(1000, 500)] * 4                  # 2000 iops
    during = [(1000, 500), (800, 500)] * 2     # 1800 iops: 10 % less
    # 10 % of 6 s of kills is 600 ms of the bystander's I/O time, over 10 kills
    assert abs(_cost_per_kill(during, alone, 6.0, 10) - 60.0) < 1e-9
    assert _cost_per_kill(alone, alone, 6.0, 10) == 0.0
