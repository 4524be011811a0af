"""netback's transmit fast path: the guest's common packets go from the tx ring to the vif's
TAP in one C call per batch (``rf_net_tx_serve``, hypervisor/csrc/netio.c).

A packet whose pages are mapped already and whose chain and headers are the usual ones is
written to the TAP from C; from the first packet that is anything else, the rest of the
batch comes back raw and :class:`~ringfence.backends.netback.datapath.TxParser` parses,
refuses and counts it as before. The C code never refuses: refusals have one owner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ringfence.hypervisor._lib import ffi, lib
from ringfence.hypervisor.io import netif
from ringfence.hypervisor.io.ring import BackRing, RingOverflow

GREF_LIMIT = 1 << 15  # pages are looked up by gref below this; larger grefs go to Python
TX_SLOTS = 256        # a tx ring's slots (one page): room for a whole batch handed back


@dataclass(frozen=True, slots=True)
class TxFastPathStatistics:
    packets: int
    bytes: int
    dropped: int
    handed_back: int
    batches: int
    mapped_pages: int


class TxFastPath:
    def __init__(self, tap_fd: int) -> None:
        self._c = ffi.new("rf_net_tx *")
        self._pages = ffi.new("uint8_t *[]", GREF_LIMIT)
        self._c.tap_fd, self._c.ngrants, self._c.pages = tap_fd, GREF_LIMIT, self._pages
        self._c.enabled = 1
        self._mapped = 0
        self._handed_back = ffi.new("uint8_t[]", TX_SLOTS * netif.TX_SLOT)
        self._notify = ffi.new("int *")

    def remember(self, gref: int, page: Any) -> None:
        """A page the copier keeps mapped: C may read packets from it until :meth:`forget_all`."""
        if 0 <= gref < GREF_LIMIT:
            self._mapped += self._pages[gref] == ffi.NULL
            self._pages[gref] = ffi.cast("uint8_t *", ffi.from_buffer(page))

    def forget_all(self) -> None:
        """Call before the pages are unmapped."""
        ffi.memmove(self._pages, bytes(ffi.sizeof(self._pages)), ffi.sizeof(self._pages))
        self._mapped = 0

    def serve(self, ring: BackRing) -> tuple[list[bytes], bool]:
        """Serve what the ring holds; returns the requests left for Python and whether the
        frontend must be notified of the responses pushed."""
        n = lib.rf_net_tx_serve(self._c, ring.c_ring, self._handed_back, self._notify)
        if n < 0:
            raise RingOverflow("frontend published more requests than the ring holds")
        size = netif.TX_SLOT
        raw = ffi.buffer(self._handed_back, n * size)[:]
        return [raw[i * size:(i + 1) * size] for i in range(n)], bool(self._notify[0])

    @property
    def packets(self) -> int:
        return int(self._c.packets)

    def statistics(self) -> TxFastPathStatistics:
        c = self._c
        return TxFastPathStatistics(int(c.packets), int(c.bytes), int(c.dropped),
                                    int(c.handed_back), int(c.batches), self._mapped)
