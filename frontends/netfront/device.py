"""netfront: the guest's ``eth0``, a TAP in its own network namespace, backed by tx and rx
rings to netback (copy mode, one queue, one event channel).

Packets read from eth0 are copied into granted tx buffers and put on the tx ring, a slot per
page (``feature-sg``), with their checksum state and TCP segmentation (GSO) from the TAP's
virtio-net header; the rx ring carries buffers posted to the backend, which copies received
packets into them, and the pieces are put together again before eth0 gets them. Frontends
distrust backends too: response ids are checked against what is outstanding, lengths
against the page.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import trio

from ringfence.frontends.netfront.fastpath import VifPump
from ringfence.hypervisor.io import netif, vnet
from ringfence.hypervisor.io.cloop import CLoop
from ringfence.hypervisor.io.ring import FrontRing, RingOverflow
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.hypervisor.platform import end_access_settled
from ringfence.isolation import netlink
from ringfence.xenbus.client import XenStore
from ringfence.xenbus.state import XenbusState, refused_handshake_delay
from ringfence.xenbus.storm import NotificationStorm

log = logging.getLogger(__name__)
PAGE = 4096
BUFFERS = 256  # tx and rx each, a ring's worth: pages 0..255 tx, 256..511 rx
MAX_PIECES = 17   # pages of the largest frame eth0 may hand us (64 KiB and its headers)


class _BackendMoved(Exception):
    pass


class _BackendRefused(_BackendMoved):
    """The backend closed after its InitWait, on our keys (a Connected of ours left from its
    predecessor, or keys it judged bad): the handshake starts over from Initialising."""


@dataclass(frozen=True, slots=True)
class NetfrontStatistics:
    devid: int
    state: str
    tx_packets: int
    rx_packets: int
    tx_dropped: int
    rx_dropped: int
    bad_responses: int
    spurious_notifications: int
    unrevoked_grants: int  # grants a previous backend still holds mapped (XSA-396)
    refused_handshakes: int  # backends that closed on our keys (the handshake started over)


class NetFront:
    def __init__(self, domain: Any, xs: XenStore, devid: int, *, ifname: str = "eth0",
                 mac: str | None = None, addresses: tuple[str, ...] = (), mtu: int = 1500) -> None:
        self.domain, self.xs, self.devid = domain, xs, devid
        self.path = f"/local/domain/{domain.domid}/device/vif/{devid}"
        self.ifname, self.mac, self.addresses, self.mtu = ifname, mac, addresses, mtu
        self.state = XenbusState.Initialising
        self.tx_packets = self.rx_packets = self.tx_dropped = self.rx_dropped = self.bad_responses = 0
        self._pump: VifPump | None = None  # while connected
        self.storm = NotificationStorm()  # a rogue backend notifying in a loop (XSA-391)
        self.all_grefs: list[int] = []  # granted to the backend of now
        self.unrevoked: list[int] = []  # grants a previous backend would not give back
        self.refused_handshakes = 0

    def statistics(self) -> NetfrontStatistics:
        pump = self._pump
        return NetfrontStatistics(self.devid, self.state.name,
                                  self.tx_packets + (pump.packets if pump else 0),
                                  self.rx_packets + (pump.rx_packets if pump else 0),
                                  self.tx_dropped + (pump.dropped if pump else 0),
                                  self.rx_dropped + (pump.rx_dropped if pump else 0),
                                  self.bad_responses + (pump.bad_responses if pump else 0),
                                  self.storm.spurious + (pump.spurious if pump else 0),
                                  len(self.unrevoked), self.refused_handshakes)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bring eth0 up, connect, and reconnect whenever the backend starts over: the
        interface, its addresses and its link stay; packets in flight are lost and TCP
        retransmits them."""
        xs, p = self.xs, self.path
        if self.mac is None:
            self.mac = (await xs.read(f"{p}/mac")).decode()
        tap_fd, _ = netlink.open_tap(self.ifname, vnet_hdr=True)
        try:
            await netlink.set_link(self.ifname, mac=self.mac, mtu=self.mtu, up=True)
            await netlink.set_link("lo", up=True)
            for cidr in self.addresses:
                await netlink.add_address(self.ifname, cidr)
            self.rings = await self.domain.memory.alloc_pages(2)
            # Pages a backend can map (and keep mapped while we are connected) or copy.
            self.buffers = await self.domain.memory.alloc_pages(2 * BUFFERS)
            self.pages = self.buffers.buffer
            self.backend_id = -1
            self.connections = 0
            started = False
            while True:
                backend, tx, rx, port = await self._connect()
                if not started:
                    task_status.started()
                    started = True
                pump = self._pump = VifPump(tap_fd, memoryview(self.pages), self.tx_grefs,
                                              self.features["feature-sg"], self.rx_grefs)
                pump.start_rx(rx)  # every rx buffer posted
                port.notify()
                self._tx_room = trio.Event()
                async with trio.open_nursery() as nursery:
                    if CLoop.possible(port):
                        nursery.start_soon(self._serve_in_c, tx, rx, port, tap_fd, pump)
                    else:
                        nursery.start_soon(self._from_tap, tx, port, tap_fd, pump)
                        nursery.start_soon(self._from_rings, tx, rx, port, pump)
                    await self._wait_backend_leaves(backend)
                    nursery.cancel_scope.cancel()
                self._pump = None  # its counts carry over
                self.tx_packets += pump.packets
                self.tx_dropped += pump.dropped
                self.bad_responses += pump.bad_responses
                self.rx_packets += pump.rx_packets
                self.rx_dropped += pump.rx_dropped
                self.storm.spurious += pump.spurious
                log.warning("backend went away; reconnecting", extra={"kv": {"devid": self.devid}})
                self.state = XenbusState.Initialising
                await xs.write(f"{p}/state", str(int(XenbusState.Initialising)))
                await port.close()
        finally:
            trio.lowlevel.notify_closing(tap_fd)
            os.close(tap_fd)  # the interface goes with its last fd (detach, guest exit)

    async def _connect(self) -> tuple[str, FrontRing, FrontRing, Any]:
        refusals = 0
        while True:
            try:
                return await self._try_connect()
            except _BackendRefused:
                refusals += 1
                self.refused_handshakes += 1
                log.warning("backend closed during the handshake; starting it over", extra={
                    "kv": {"devid": self.devid, "backend": self.backend_id, "in_a_row": refusals}})
                await trio.sleep(refused_handshake_delay(refusals))
            except _BackendMoved:
                log.info("backend moved while connecting; following it")

    async def _try_connect(self) -> tuple[str, FrontRing, FrontRing, Any]:
        xs, p = self.xs, self.path
        # Every attempt starts from Initialising: a backend that came up while we still said
        # Connected (to its predecessor) and failed on our stale keys waits for exactly this.
        self.state = XenbusState.Initialising
        await xs.write(f"{p}/state", str(int(XenbusState.Initialising)))
        raw_backend, raw_id = await xs.read_many([f"{p}/backend", f"{p}/backend-id"])
        if raw_backend is None or raw_id is None:
            raise XenStoreError("ENOENT", f"{p}: no backend or backend-id")
        backend, backend_id = raw_backend.decode(), int(raw_id)
        gt = self.domain.grant_table
        if backend_id != self.backend_id:  # granted while the backend starts up
            # A new driver domain: our pages go to it. One try-end per grant (XSA-396):
            # pages the old backend still has mapped are not granted to the new one; the vif
            # waits for the toolstack to move it again (the refused grants are retried then,
            # and only they).
            old = self.all_grefs + self.unrevoked
            self.all_grefs = []
            self.unrevoked = await end_access_settled(gt, old)
            if self.unrevoked:
                log.error("granted pages still mapped by the previous backend: not reused",
                          extra={"kv": {"devid": self.devid, "pages": len(self.unrevoked),
                                        "backend": self.backend_id}})
                await self._wait_moved_from(backend)
                raise _BackendMoved
            self.backend_id = backend_id
            self.ring_grefs = gt.grant_access_many(backend_id, self.rings.frames)
            frames = self.buffers.frames
            self.tx_grefs = gt.grant_access_many(backend_id, frames[:BUFFERS], readonly=True)
            self.rx_grefs = gt.grant_access_many(backend_id, frames[BUFFERS:])
            self.all_grefs = self.ring_grefs + self.tx_grefs + self.rx_grefs
        await self._wait_backend(backend, (XenbusState.InitWait,))
        keys = ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6")
        values = await xs.read_many([f"{backend}/{key}" for key in keys])  # one round trip
        self.features = {key: value == b"1" for key, value in zip(keys, values)}
        buffer = self.rings.buffer
        tx = FrontRing(buffer[:PAGE], netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
        rx = FrontRing(buffer[PAGE:], netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
        try:
            port = await self.domain.events.alloc_unbound(backend_id)
        except OSError:
            # That backend's domain died after announcing InitWait: wait until the toolstack
            # moves us (its directory goes) or it changes state, then start over.
            await self._wait_backend_leaves_state(backend, XenbusState.InitWait)
            raise _BackendMoved from None
        async for tx_ in xs.transaction():
            async with tx_:
                await tx_.write_many([
                    (f"{p}/tx-ring-ref", str(self.ring_grefs[0])),
                    (f"{p}/rx-ring-ref", str(self.ring_grefs[1])),
                    (f"{p}/event-channel", str(port.port)),
                    (f"{p}/request-rx-copy", "1"), (f"{p}/feature-rx-notify", "1"),
                    (f"{p}/feature-sg", "1"), (f"{p}/feature-gso-tcpv4", "1"),
                    (f"{p}/feature-gso-tcpv6", "1"), (f"{p}/feature-ipv6-csum-offload", "1"),
                    (f"{p}/state", str(int(XenbusState.Connected)))])
        self.state = XenbusState.Connected
        try:
            await self._wait_backend(backend, (XenbusState.Connected,))
        except BaseException:
            await port.close()
            raise
        self.connections += 1
        log.info("vif connected", extra={"kv": {"devid": self.devid, "mac": self.mac,
                                               "backend": backend_id}})
        return backend, tx, rx, port

    async def _wait_backend_leaves_state(self, backend: str, seen: XenbusState) -> None:
        async with self.xs.watch(f"{backend}/state") as events:
            async for _ in events:
                try:
                    state = XenbusState(int(await self.xs.read(f"{backend}/state")))
                except (XenStoreError, ValueError):
                    return
                if state != seen:
                    return

    async def _wait_moved_from(self, backend: str) -> None:
        async with self.xs.watch(f"{self.path}/backend") as events:
            async for _ in events:
                if (await self._read_or(f"{self.path}/backend", b"")).decode() not in ("", backend):
                    return

    async def _wait_backend_leaves(self, backend: str) -> None:
        await self._wait_backend_leaves_state(backend, XenbusState.Connected)

    async def _wait_backend(self, backend: str, wanted: tuple[XenbusState, ...]) -> None:
        async with self.xs.watch(f"{backend}/state") as events:
            async for _ in events:
                try:
                    state = XenbusState(int(await self.xs.read(f"{backend}/state")))
                    if state in wanted:
                        return
                    if state == XenbusState.Closed and XenbusState.Connected in wanted:
                        raise _BackendRefused  # closed since its InitWait, on our keys
                except (XenStoreError, ValueError):
                    # gone: if the toolstack pointed us at a successor, follow it
                    try:
                        moved = (await self.xs.read(f"{self.path}/backend")).decode() != backend
                    except XenStoreError:
                        moved = False
                    if moved:
                        raise _BackendMoved from None

    async def _read_or(self, path: str, default: bytes) -> bytes:
        try:
            return await self.xs.read(path)
        except XenStoreError:
            return default

    def _set_offloads(self, tap_fd: int) -> None:
        """What eth0 may hand us: partial checksums always (the backend finishes them),
        TCP segments up to 64 KiB when the backend takes packets over several slots."""
        sg = self.features["feature-sg"]
        vnet.set_offload(tap_fd, True, sg and self.features["feature-gso-tcpv4"],
                         sg and self.features["feature-gso-tcpv6"])

    async def _serve_in_c(self, tx: FrontRing, rx: FrontRing, port: Any, tap_fd: int,
                          pump: VifPump) -> None:
        """Both directions on the pump's C thread until the connection ends."""
        self._set_offloads(tap_fd)
        loop = pump.loop(tx, rx, port)
        try:
            result = await loop.run()
        finally:
            loop.close()
        if result == loop.OVERFLOW:
            self.bad_responses += 1
            log.error("backend overflowed a ring")
        elif result == loop.TAP_ERROR:
            raise OSError(loop.error, f"{self.ifname}: {os.strerror(loop.error)}")

    async def _from_tap(self, tx: FrontRing, port: Any, tap_fd: int, pump: VifPump) -> None:
        """Packets go from eth0 to the ring in C (fastpath.py), a batch a call."""
        self._set_offloads(tap_fd)
        while True:
            result, notify = pump.pump(tx, 64)
            if notify:
                port.notify()
            if result == VifPump.TAP_EMPTY:
                await trio.lowlevel.wait_readable(tap_fd)
            elif result == VifPump.NO_ROOM:
                self._tx_room = trio.Event()  # the backend's responses give buffers back
                await self._tx_room.wait()
            else:
                await trio.lowlevel.checkpoint()  # a busy eth0 leaves room to the rest

    async def _from_rings(self, tx: FrontRing, rx: FrontRing, port: Any, pump: VifPump) -> None:
        while True:
            try:
                tx_done = pump.complete(tx)  # the buffers answered come back, in C
                rx_done, notify = pump.receive(rx)  # packets to eth0, buffers posted again
            except RingOverflow:
                self.bad_responses += 1
                log.error("backend overflowed a ring")
                return
            if tx_done or rx_done:
                self.storm.note_work()
            if tx_done:
                self._tx_room.set()
            if notify:
                port.notify()
            if not tx_done and not rx_done:
                # A tx answer only gives a buffer back: woken when half are answered (as
                # Linux's netfront), or at once when the pump waits for room.
                tx_pending = tx.final_check_for_responses() if not self._tx_room.is_set() \
                    else tx.check_for_half_the_responses()
                if not tx_pending and not rx.final_check_for_responses():
                    await port.wait()
                    await self.storm.woken(tx.unconsumed_responses() + rx.unconsumed_responses() > 0)
