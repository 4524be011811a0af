"""A sim domain's grant table in batches (a frontend re-granting its pages to a new backend)
gives the same entries as one call per page, and never ends a pinned one."""
from __future__ import annotations

import os

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
