"""netback's data path in C (hypervisor/csrc/netio.c), one call per batch each way.

Transmit (``rf_net_tx_serve``): a packet whose pages are mapped already and whose chain and
headers are the usual ones is written to the TAP from C; from the first packet that is
anything else, the rest of the batch comes back raw and
:class:`~ringfence.backends.netback.datapath.TxParser` parses, refuses and counts it as
before. The C code never refuses: refusals have one owner.

Receive (``rf_net_rx_serve``): packets read from the TAP go into the buffers the guest
posted (mapped writable by the copier when posted), in the order posted.

Both run on a C thread of the vif's own (:meth:`VifFastPath.loop`, netloop.c), which comes
back to Python only for the transmit requests C hands back and for receive buffers whose
pages are not mapped yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ringfence.hypervisor._lib import c_counter, ffi, lib
from ringfence.hypervisor.io import netif
from ringfence.hypervisor.io.cloop import CLoop
from ringfence.hypervisor.io.ring import BackRing, RingOverflow

GREF_LIMIT = 1 << 15  # pages are looked up by gref below this; larger grefs go to Python
RING_SLOTS = 256      # a tx or rx ring's slots (one page): a batch handed back, the buffers posted


RX_EMPTY, RX_NO_BUFFERS, RX_BUDGET = lib.RF_NETBACK_TAP_EMPTY, lib.RF_NETBACK_NO_BUFFERS, lib.RF_NETBACK_BUDGET


@dataclass(frozen=True, slots=True)
class VifFastPathStatistics:
    packets: int
    bytes: int
    dropped: int
    handed_back: int
    batches: int
    mapped_pages: int
    rx_packets: int
    rx_dropped: int
    rx_bad_grants: int
    rx_direct: int        # read from the TAP straight into the guest's buffers


class VifFastPath:
    def __init__(self, tap_fd: int, rx_sg: bool) -> None:
        self._c = ffi.new("rf_net_tx *")
        self._pages = ffi.new("uint8_t *[]", GREF_LIMIT)
        self._writable = ffi.new("uint8_t[]", GREF_LIMIT)
        self._c.tap_fd, self._c.ngrants, self._c.pages = tap_fd, GREF_LIMIT, self._pages
        self._c.enabled = 1
        self._mapped = 0
        self._handed_back = ffi.new("uint8_t[]", RING_SLOTS * netif.TX_SLOT)
        self._notify = ffi.new("int *")
        rx = self._rx = ffi.new("rf_net_rx *")
        self._posted_ids = ffi.new("uint16_t[]", RING_SLOTS)
        self._posted_grefs = ffi.new("uint32_t[]", RING_SLOTS)
        self._packet = ffi.new("uint8_t[]", lib.RF_NET_RX_PACKET)
        rx.tap_fd, rx.sg, rx.ngrants, rx.pages, rx.writable = tap_fd, int(rx_sg), GREF_LIMIT, self._pages, self._writable
        rx.posted_ids, rx.posted_grefs, rx.posted_cap = self._posted_ids, self._posted_grefs, RING_SLOTS
        rx.packet = self._packet
        self._loop: NetbackLoop | None = None

    def remember(self, gref: int, page: Any, writable: bool) -> None:
        """A page the copier keeps mapped: C may use it until :meth:`forget_all`."""
        if 0 <= gref < GREF_LIMIT:
            self._mapped += self._pages[gref] == ffi.NULL
            self._pages[gref] = ffi.cast("uint8_t *", ffi.from_buffer(page))
            self._writable[gref] = int(writable)

    def forget_all(self) -> None:
        """Call before the pages are unmapped."""
        ffi.memmove(self._pages, bytes(ffi.sizeof(self._pages)), ffi.sizeof(self._pages))
        ffi.memmove(self._writable, bytes(GREF_LIMIT), GREF_LIMIT)
        self._mapped = 0

    def post_rx(self, posted: list[tuple[int, int]]) -> None:
        """Receive buffers the guest posted, (id, gref) each, mapped already."""
        if posted:
            ids, grefs = zip(*posted)
            lib.rf_net_rx_post(self._rx, ids, grefs, len(posted))

    def serve_rx(self, ring: BackRing, budget: int) -> tuple[int, bool]:
        """Packets from the TAP into the guest's buffers: (RX_EMPTY, RX_NO_BUFFERS or
        RX_BUDGET; whether to notify). OSError: the TAP is gone."""
        result = lib.rf_net_rx_serve(self._rx, ring.c_ring, budget, self._notify)
        if result < 0:
            raise OSError(-result, "reading the TAP")
        return int(result), bool(self._notify[0])

    def loop(self, tx: BackRing, rx: BackRing, port: Any) -> NetbackLoop:
        """The vif's C loop over both rings and the TAP (port: eventfds, sim)."""
        self._loop = NetbackLoop(self, tx, rx, port)
        return self._loop

    @property
    def spurious(self) -> int:
        """Notifications that brought the loop no work."""
        return self._loop.spurious if self._loop else 0

    def serve(self, ring: BackRing) -> tuple[list[bytes], bool]:
        """Serve what the ring holds; returns the requests left for Python and whether the
        frontend must be notified of the responses pushed."""
        n = lib.rf_net_tx_serve(self._c, ring.c_ring, self._handed_back, self._notify)
        if n < 0:
            raise RingOverflow("frontend published more requests than the ring holds")
        size = netif.TX_SLOT
        raw = ffi.buffer(self._handed_back, n * size)[:]
        return [raw[i * size:(i + 1) * size] for i in range(n)], bool(self._notify[0])

    packets = c_counter("_c", "packets")
    rx_packets = c_counter("_rx", "packets")
    rx_dropped = c_counter("_rx", "dropped")
    rx_bad_grants = c_counter("_rx", "bad_grants")

    def statistics(self) -> VifFastPathStatistics:
        c, rx = self._c, self._rx
        return VifFastPathStatistics(int(c.packets), int(c.bytes), int(c.dropped),
                                     int(c.handed_back), int(c.batches), self._mapped,
                                     int(rx.packets), int(rx.dropped), int(rx.bad_grants),
                                     int(rx.direct))


class NetbackLoop(CLoop):
    def __init__(self, fast: VifFastPath, tx: BackRing, rx: BackRing, port: Any) -> None:
        c = ffi.new("rf_netback_loop *")
        c.tx, c.rx, c.handed_back = fast._c, fast._rx, fast._handed_back
        super().__init__(lib.rf_netback_loop_run, c, c.base, port, tx, rx)

    def handed_back(self) -> list[bytes]:
        """The transmit requests C left to Python (after HANDED_BACK)."""
        size = netif.TX_SLOT
        raw = ffi.buffer(self.c.handed_back, self.c.nhanded * size)[:]
        return [raw[i * size:(i + 1) * size] for i in range(self.c.nhanded)]

    def new_buffers(self) -> list[tuple[int, int]]:
        """(id, gref) of receive buffers posted whose pages C has not (after NEW_BUFFERS)."""
        c = self.c
        return [(int(c.new_ids[i]), int(c.new_grefs[i])) for i in range(c.nnew)]
