"""The back-off from peers that notify without giving work (ATTACKS A13)."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from ringfence.xenbus.storm import NotificationStorm


@pytest.mark.parametrize("autojump_clock", [trio.testing.MockClock(autojump_threshold=0)])
async def test_a_run_of_empty_wakeups_backs_off_and_work_ends_it(autojump_clock):
    storm = NotificationStorm(run=3, first_delay=0.001, max_delay=0.004)
    start = trio.current_time()
    for _ in range(3):
        await storm.woken(had_work=False)
    assert trio.current_time() == start  # a few stray wakeups cost nothing
    delays = []
    for _ in range(5):
        before = trio.current_time()
        await storm.woken(had_work=False)
        delays.append(round(trio.current_time() - before, 6))
    assert delays == [0.001, 0.002, 0.004, 0.004, 0.004]
    await storm.woken(had_work=True)
    before = trio.current_time()
    await storm.woken(had_work=False)
    assert trio.current_time() == before
    assert storm.spurious == 9
