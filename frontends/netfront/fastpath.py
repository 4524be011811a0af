"""netfront's data path in C (``rf_netfront_*``, hypervisor/csrc/netio.c).

Transmit: packets are read from the guest's TAP straight into free tx buffer pages (the rest
of a frame's last page zeroed: a granted page holds that frame's bytes and zeroes) and put
on the tx ring, a batch per call and one push (and at most one event) per batch; the
backend's responses give the buffers back, and an answer for a buffer that is not on the
ring is counted and ignored (the hardened Linux netfront's check).

Receive: each rx response answers the oldest buffer posted; a packet's pieces are written to
the TAP with the virtio-net header their flags call for (the first piece from a private
copy: its headers are what the kernel trusts), and the buffers go back on the ring.

With a channel C can wait on (sim's eventfds), both run on a C thread of the connection's own
(:meth:`VifPump.loop`, netloop.c): no Python per packet, and no trio wake-up per batch.
"""
from __future__ import annotations

from typing import Any

from ringfence.hypervisor._lib import c_counter, ffi, lib
from ringfence.hypervisor.io.cloop import CLoop
from ringfence.hypervisor.io.ring import FrontRing, RingOverflow


class VifPump:
    """One connection's data path (its grants are that backend's): ``pages`` holds the tx
    buffers, then the rx buffers."""
    TAP_EMPTY, NO_ROOM, BUDGET = lib.RF_NETFRONT_TAP_EMPTY, lib.RF_NETFRONT_NO_ROOM, lib.RF_NETFRONT_BUDGET

    def __init__(self, tap_fd: int, pages: Any, grefs: list[int], sg: bool,
                 rx_grefs: list[int] | None = None) -> None:
        buffers = len(grefs)
        self._pages = ffi.from_buffer(pages)  # kept: C holds the address
        # A new connection's backend sees none of what the buffers held for the last one
        # (XSA-403); from here on, each frame's page is zeroed past its last byte.
        ffi.memmove(self._pages, bytes(len(self._pages)), len(self._pages))
        self._grefs = ffi.new("uint32_t[]", grefs)
        self._free = ffi.new("uint16_t[]", list(range(buffers)))
        self._on_ring = ffi.new("uint8_t[]", buffers)
        self._dirty = ffi.new("uint16_t[]", buffers)  # all zero: the pages are zeroed below
        c = self._c = ffi.new("rf_netfront_tx *")
        c.tap_fd, c.sg, c.buffers, c.nfree = tap_fd, int(sg), buffers, buffers
        c.pages = ffi.cast("uint8_t *", self._pages)
        c.grefs, c.free, c.on_ring, c.dirty = self._grefs, self._free, self._on_ring, self._dirty
        self._notify = ffi.new("int *")
        rx_grefs = rx_grefs or []
        self._rx_grefs = ffi.new("uint32_t[]", rx_grefs or [0])
        self._posted = ffi.new("uint16_t[]", max(1, len(rx_grefs)))
        rx = self._rx = ffi.new("rf_netfront_rx *")
        rx.tap_fd, rx.buffers, rx.grefs, rx.posted = tap_fd, len(rx_grefs), self._rx_grefs, self._posted
        rx.pages = ffi.cast("uint8_t *", self._pages) + buffers * 4096
        self._loop: CLoop | None = None

    def loop(self, tx: FrontRing, rx: FrontRing, port: Any) -> CLoop:
        """Both rings and the TAP on a C thread (port: eventfds, sim); it comes back when
        stopped, or when the backend overflows a ring (OVERFLOW) or the TAP fails."""
        c = ffi.new("rf_netfront_loop *")
        c.tx, c.rx = self._c, self._rx
        self._loop = CLoop(lib.rf_netfront_loop_run, c, c.base, port, tx, rx)
        return self._loop

    @property
    def spurious(self) -> int:
        """Notifications that brought the loop no work."""
        return self._loop.spurious if self._loop else 0

    def start_rx(self, ring: FrontRing) -> None:
        """Post every rx buffer (a new connection)."""
        lib.rf_netfront_rx_start(self._rx, ring.c_ring)

    def receive(self, ring: FrontRing) -> tuple[int, bool]:
        """Take the rx responses: (how many; whether the buffers posted again need an event)."""
        n = lib.rf_netfront_rx_serve(self._rx, ring.c_ring, self._notify)
        if n < 0:
            raise RingOverflow("backend published more responses than there are requests")
        return int(n), bool(self._notify[0])

    def pump(self, ring: FrontRing, budget: int) -> tuple[int, bool]:
        """Send what the TAP holds: (TAP_EMPTY, NO_ROOM or BUDGET; whether to notify)."""
        result = lib.rf_netfront_tx_pump(self._c, ring.c_ring, budget, self._notify)
        if result < 0:
            raise OSError(-result, "reading the TAP")
        return int(result), bool(self._notify[0])

    def complete(self, ring: FrontRing) -> int:
        """Take the tx responses: how many buffers came back."""
        back = lib.rf_netfront_tx_complete(self._c, ring.c_ring)
        if back < 0:
            raise RingOverflow("backend published more responses than there are requests")
        return int(back)

    packets = c_counter("_c", "packets")
    dropped = c_counter("_c", "dropped")
    rx_packets = c_counter("_rx", "packets")
    rx_dropped = c_counter("_rx", "dropped")

    @property
    def bad_responses(self) -> int:
        return int(self._c.bad_responses + self._rx.bad_responses)
