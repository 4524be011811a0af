"""A sim domain's grant table in batches (a frontend re-granting its pages to a new backend)
gives the same entries as one call per page, and never ends a pinned one."""
from __future__ import annotations

import errno
import os

import pytest

from ringfence.hypervisor._lib import ffi, lib
from ringfence.hypervisor.sim.client import RESERVED_GREFS, SimGrantTable


def table(entries: int = 64) -> SimGrantTable:
    fd = os.memfd_create("grant-table")
    os.ftruncate(fd, 4096)
    return SimGrantTable(None, fd, entries)  # type: ignore[arg-type]


def entry(gt: SimGrantTable, gref: int) -> tuple[int, int, int]:
    e = gt._base[gref]  # type: ignore[index]
    return int(e.flags), int(e.domid), int(e.frame)


def test_batches_match_single_calls_and_leave_pinned_entries_alone():
    one, many = table(), table()
    frames = [0x1000000 + i for i in range(20)]
    singles = [one.grant_access(7, f, readonly=i % 2 == 1) for i, f in enumerate(frames)]
    batch = many.grant_access_many(7, frames[0::2]) + many.grant_access_many(7, frames[1::2], readonly=True)
    assert sorted(batch) == sorted(singles) and min(batch) >= RESERVED_GREFS
    by_frame = {entry(many, g)[2]: entry(many, g) for g in batch}
    assert [by_frame[entry(one, g)[2]] for g in singles] == [entry(one, g) for g in singles]
    # a pinned entry (mapped by the grantee) is not ended, and its gref is not reused
    frame = ffi.new("uint32_t *")
    assert lib.rf_grant_pin(many._base + batch[3], 7, 0, frame) == 0  # type: ignore[operator]
    assert many.end_access_many(batch) == [batch[3]]  # the one still mapped
    assert batch[3] not in many.grant_access_many(8, list(range(many.entries - RESERVED_GREFS - 1)))


def test_every_entry_can_be_granted_once_and_ended_ones_come_back_first():
    gt = table(entries=32)
    first = gt.grant_access_many(7, list(range(10)))
    assert first == list(range(RESERVED_GREFS, RESERVED_GREFS + 10))  # in order, never reserved
    assert gt.end_access_many(first[2:5]) == []
    assert gt.grant_access(7, 99) == first[4]  # the last ended goes first
    rest = gt.grant_access_many(7, list(range(32 - RESERVED_GREFS - 10 + 2)))
    assert rest[:2] == [first[3], first[2]] and len(set(first + rest)) == 32 - RESERVED_GREFS
    assert gt.statistics().granted == 32 - RESERVED_GREFS
    for grant in (lambda: gt.grant_access(7, 1), lambda: gt.grant_access_many(7, [1])):
        with pytest.raises(OSError) as full:
            grant()
        assert full.value.errno == errno.ENOSPC
    assert gt.end_access(first[0]) and gt.statistics().granted == 32 - RESERVED_GREFS - 1
    assert gt.grant_access_many(7, [5]) == [first[0]]
