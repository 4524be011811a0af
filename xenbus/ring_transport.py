"""XenStore over the ring page and an event channel, as real guests talk to xenstored.

Both ends see the ring as a byte stream (:class:`RingStream`), so the daemon serves it and
the client speaks over it exactly as over a socket. The reconnection protocol is
``docs/misc/xenstore-ring.txt``'s: the daemon sets ``error`` when it cannot go on (a
hostile index, an oversized message, or its own restart, which lost the connection's
state); the guest then writes ``connection = RECONNECT``; the daemon empties the rings,
clears the error and writes ``CONNECTED``; the guest registers its watches again and resends
what had no reply (:class:`ringfence.xenbus.client.XenStore` does that for any transport).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import trio

from ringfence.hypervisor.io.xs_ring import (GNTTAB_RESERVED_XENSTORE, SERVER_FEATURES,
                                            Connection, RingError, RingProtocolError, XsRing,
                                            XsRingStatistics)

log = logging.getLogger(__name__)


class _Doorbell:
    """Notifications on one event channel for any number of waiting tasks: one task reads
    the eventfd, the others park, and every notification wakes them all to look again."""

    def __init__(self, port: Any) -> None:
        self.port = port
        self._lot = trio.lowlevel.ParkingLot()
        self._listening = False

    async def wait(self) -> None:
        if self._listening:
            await self._lot.park()
            return
        self._listening = True
        try:
            await self.port.wait()
        finally:
            self._listening = False
            self._lot.unpark_all()


BACKLOG_LIMIT = 65536  # bytes a writer may leave behind before send_all waits for room


class RingStream(trio.abc.Stream):
    """One connection's worth of a ring page: ends (EOF) when the other side asks for a
    reset (the guest sees ``error``, the daemon sees ``RECONNECT``) or breaks the ring.

    What does not fit in the 1 KiB ring waits in a backlog that the reading task pushes
    whenever the other side makes room, so a writer never blocks (uncancellably, inside
    the client's shielded flush) on a daemon that is restarting."""

    def __init__(self, ring: XsRing, doorbell: _Doorbell, *, guest: bool) -> None:
        self.ring, self.doorbell, self.guest = ring, doorbell, guest
        self.ended: RingError | Connection | None = None  # why it ended, if it did
        self._backlog = bytearray()
        self._closed = False

    def _over(self) -> bool:
        if self.ended is None:
            error = self.ring.error
            if self.guest and error != RingError.NONE:
                self.ended = RingError(error) if error in (1, 2, 3) else RingError.COMM
            elif not self.guest and self.ring.connection == Connection.RECONNECT:
                self.ended = Connection.RECONNECT
        return self.ended is not None

    def _push(self) -> None:
        try:
            while self._backlog:
                sent, wake = self.ring.put(self._backlog)
                if not sent:
                    return
                del self._backlog[:sent]
                if wake:
                    self.doorbell.port.notify()
        except RingProtocolError:
            self.ended = RingError.RINGIDX

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("ring stream closed")
        if self._over():
            raise trio.BrokenResourceError(f"ring connection ended: {self.ended!r}")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("ring stream closed")
            if self._over():
                return b""
            try:
                data, wake = self.ring.get()
            except RingProtocolError:
                self.ended = RingError.RINGIDX
                return b""
            if data:
                if wake:
                    self.doorbell.port.notify()  # room for a producer that found the ring full
                return data
            self._push()
            if self.ended is None:
                await self.doorbell.wait()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check()
        self._backlog += data
        self._push()
        while len(self._backlog) > BACKLOG_LIMIT:
            self._check()
            await self.doorbell.wait()
            self._push()
        self._check()

    async def wait_send_all_might_not_block(self) -> None:
        while not self._closed and not self._over() and len(self._backlog) > BACKLOG_LIMIT:
            await self.doorbell.wait()
            self._push()

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()

    def statistics(self) -> XsRingStatistics:
        return self.ring.statistics()


# ---- the daemon's side -------------------------------------------------------------------

async def serve_domain_ring(server: Any, domid: int, ring: XsRing, port: Any, *,
                            resumed: bool) -> None:
    """Serve a domain's ring page until cancelled (the domain is released).

    ``resumed``: this daemon did not serve the ring before (it restarted), so whatever the
    ring holds belongs to a lost connection: the guest is told to reconnect first."""
    doorbell = _Doorbell(port)
    ring.server_features = SERVER_FEATURES
    if resumed:
        ring.error = RingError.COMM
    while True:
        if ring.error != RingError.NONE:
            port.notify()
            while ring.connection != Connection.RECONNECT:
                await doorbell.wait()
        if ring.connection == Connection.RECONNECT:
            ring.reset()
            port.notify()
        stream = RingStream(ring, doorbell, guest=False)
        await server.serve_domain_connection(stream, domid)
        if stream.ended == RingError.RINGIDX:
            server.counters["protocol_violations"] += 1
            ring.error = RingError.RINGIDX
        elif stream.ended is None:
            # The daemon dropped the connection itself: a message over the payload limit or
            # a malformed one, or replies never read. The guest must reset before more.
            ring.error = RingError.PROTO
        if ring.error != RingError.NONE:
            log.warning("ring connection stopped", extra={"kv": {
                "domid": domid, "error": RingError(ring.error).name}})


# ---- the guest's side --------------------------------------------------------------------

class GuestRing:
    """A guest's XenStore ring: its page at the reserved gref, its port for dom0."""

    def __init__(self, pages: Any, port: Any) -> None:
        self.pages, self.port = pages, port
        self.ring = XsRing(pages.buffer, guest=True)
        self.doorbell = _Doorbell(port)

    def stream(self) -> RingStream:
        return RingStream(self.ring, self.doorbell, guest=True)

    def statistics(self) -> XsRingStatistics:
        return self.ring.statistics()

    async def reconnect(self) -> RingStream:
        """Ask the daemon to reset the ring, wait until it has (it may be restarting)."""
        self.ring.connection = Connection.RECONNECT
        self.port.notify()
        while self.ring.connection != Connection.CONNECTED or self.ring.error != RingError.NONE:
            await self.doorbell.wait()
        return self.stream()


async def setup_guest_ring(domain: Any) -> GuestRing:
    """Put a zeroed page at the reserved gref for dom0, allocate a port for dom0 and
    announce both (the sim domain builder's job, done by the domain itself)."""
    pages = await domain.memory.alloc_pages(1)
    pages.buffer[:] = bytes(len(pages.buffer))
    domain.grant_table.grant_reserved(GNTTAB_RESERVED_XENSTORE, 0, pages.frames[0])
    port = await domain.events.alloc_unbound(0)
    await domain.announce_store_ring(port.port)
    return GuestRing(pages, port)


@contextlib.asynccontextmanager
async def mapped_domain_ring(dom0: Any, domid: int, port_number: int) -> AsyncIterator[tuple[XsRing, Any]]:
    """Map a domain's ring page (its reserved gref) and bind its port, as dom0."""
    mapped = await dom0.grant_table.map(domid, [GNTTAB_RESERVED_XENSTORE])
    try:
        port = await dom0.events.bind_interdomain(domid, port_number)
        ring = XsRing(mapped.buffer, guest=False)
        try:
            yield ring, port
        finally:
            ring.release()
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError):
                    await port.close()
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(OSError):
                await dom0.grant_table.unmap(mapped)


__all__ = ["RingStream", "GuestRing", "serve_domain_ring", "setup_guest_ring", "mapped_domain_ring"]
