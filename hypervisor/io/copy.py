"""Batched, bounds-checked copies between mapped regions (one C call per batch)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ringfence.hypervisor._lib import ffi, lib


class CopyBatch:
    """Regions are registered once; each :meth:`run` copies many (dst, src) slices at once."""

    def __init__(self, regions: Sequence[Any]) -> None:
        self._keep = [ffi.from_buffer(r, require_writable=False) for r in regions]
        self._regions = ffi.new("rf_region[]", len(regions))
        for i, (region, ptr) in enumerate(zip(regions, self._keep)):
            self._regions[i].base = ffi.cast("uint8_t *", ptr)
            self._regions[i].size = memoryview(region).nbytes
        self.copies = self.bytes = self.rejected = 0

    def run(self, ops: Sequence[tuple[int, int, int, int, int]]) -> list[int]:
        """ops: (dst_region, dst_offset, src_region, src_offset, length); returns statuses
        (0, or -1 for an op out of bounds, which copies nothing)."""
        batch = ffi.new("rf_copy_op[]", len(ops))
        for i, (dr, do, sr, so, length) in enumerate(ops):
            op = batch[i]
            op.dst_region, op.dst_offset, op.src_region, op.src_offset, op.len = dr, do, sr, so, length
        self.rejected += lib.rf_copy_batch(self._regions, len(self._keep), batch, len(ops))
        statuses = [batch[i].status for i in range(len(ops))]
        self.copies += statuses.count(0)
        self.bytes += sum(op[4] for op, s in zip(ops, statuses) if s == 0)
        return statuses
