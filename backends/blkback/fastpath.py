"""blkback's fast path: the common request served by the C core, the rest by Python.

READ and WRITE requests whose pages are all persistently mapped go from the ring to the
disk and back in one C call per batch (``rf_blk_serve``): no Python object per request.
Anything else — a grant seen for the first time, flush, discard, indirect, any request the
C code would not accept — is handed back as its raw 112 bytes, and Python's
:class:`~ringfence.backends.blkback.datapath.Validator` plans it or refuses it as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ringfence.hypervisor._lib import c_counter, ffi, lib
from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io.ring import BackRing, RingOverflow

GREF_LIMIT = 1 << 15  # Xen's default 64 grant frames of 512 entries; larger grefs go to Python


@dataclass(frozen=True, slots=True)
class FastPathStatistics:
    served: int
    handed_back: int
    batches: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    io_errors: int
    cached_grants: int


class FastPath:
    def __init__(self, disk_fd: int, sectors: int, read_only: bool) -> None:
        self._c = ffi.new("rf_blk_backend *")
        self._pages = ffi.new("uint8_t *[]", GREF_LIMIT)
        self._writable = ffi.new("uint8_t[]", GREF_LIMIT)
        self._c.disk_fd, self._c.sectors, self._c.read_only = disk_fd, sectors, int(read_only)
        self._c.ngrants, self._c.pages, self._c.writable = GREF_LIMIT, self._pages, self._writable
        self._c.enabled = 1
        self._cached = 0
        self._handed_back = ffi.new("uint8_t[]", 64 * blkif.REQUEST_SIZE)
        self._notify = ffi.new("int *")

    def enable(self, on: bool) -> None:
        """Off: every request goes through Python (fault injection decides each one)."""
        self._c.enabled = int(on)

    def remember(self, gref: int, mapping: Any) -> None:
        """A persistent grant, mapped by Python: the C path may use it from now on."""
        if 0 <= gref < GREF_LIMIT:
            self._cached += self._pages[gref] == ffi.NULL
            self._pages[gref] = ffi.cast("uint8_t *", ffi.from_buffer(mapping.buffer))
            self._writable[gref] = int(not mapping.buffer.readonly)

    def forget(self, gref: int) -> None:
        """Call before the page is unmapped."""
        if 0 <= gref < GREF_LIMIT and self._pages[gref] != ffi.NULL:
            self._pages[gref] = ffi.NULL
            self._cached -= 1

    served = c_counter("_c", "served")

    def serve(self, ring: BackRing) -> tuple[list[bytes], bool]:
        """Serve what the ring holds; returns the requests left for Python and whether the
        frontend must be notified of the responses pushed."""
        n = lib.rf_blk_serve(self._c, ring.c_ring, self._handed_back, 64, self._notify)
        if n < 0:
            raise RingOverflow("frontend published more requests than the ring holds")
        size = blkif.REQUEST_SIZE
        raw = ffi.buffer(self._handed_back, n * size)[:]
        return [raw[i * size:(i + 1) * size] for i in range(n)], bool(self._notify[0])

    def statistics(self) -> FastPathStatistics:
        c = self._c
        return FastPathStatistics(int(c.served), int(c.handed_back), int(c.batches), int(c.reads),
                                  int(c.writes), int(c.bytes_read), int(c.bytes_written),
                                  int(c.io_errors), self._cached)
