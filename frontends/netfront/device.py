"""netfront: the guest's ``eth0``, a TAP in its own network namespace, backed by tx and rx
rings to netback (copy mode, one queue, one event channel).

Packets read from eth0 are copied into granted tx buffers and put on the tx ring; the rx ring
carries buffers posted to the backend, which copies received packets into them. Frontends
distrust backends too: response ids are checked against what is outstanding.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import trio

from ringfence.hypervisor.io import netif
from ringfence.hypervisor.io.ring import FrontRing, RingOverflow
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.isolation import netlink
from ringfence.xenbus.client import XenStore
from ringfence.xenbus.state import XenbusState
from ringfence.xenbus.storm import NotificationStorm

log = logging.getLogger(__name__)
PAGE = 4096
BUFFERS = 128  # tx and rx each; RAM frames 0..127 tx, 128..255 rx


class _BackendMoved(Exception):
    pass


@dataclass(frozen=True, slots=True)
class NetfrontStatistics:
    devid: int
    state: str
    tx_packets: int
    rx_packets: int
    tx_dropped: int
    bad_responses: int
    spurious_notifications: int


class NetFront:
    def __init__(self, domain: Any, xs: XenStore, devid: int, *, ifname: str = "eth0",
                 mac: str | None = None, addresses: tuple[str, ...] = (), mtu: int = 1500) -> None:
        self.domain, self.xs, self.devid = domain, xs, devid
        self.path = f"/local/domain/{domain.domid}/device/vif/{devid}"
        self.ifname, self.mac, self.addresses, self.mtu = ifname, mac, addresses, mtu
        self.state = XenbusState.Initialising
        self.tx_packets = self.rx_packets = self.tx_dropped = self.bad_responses = 0
        self.storm = NotificationStorm()  # a rogue backend notifying in a loop (XSA-391)

    def statistics(self) -> NetfrontStatistics:
        return NetfrontStatistics(self.devid, self.state.name, self.tx_packets, self.rx_packets,
                                  self.tx_dropped, self.bad_responses, self.storm.spurious)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bring eth0 up, connect, and reconnect whenever the backend starts over: the
        interface, its addresses and its link stay; packets in flight are lost and TCP
        retransmits them."""
        xs, p = self.xs, self.path
        if self.mac is None:
            self.mac = (await xs.read(f"{p}/mac")).decode()
        tap_fd, _ = netlink.open_tap(self.ifname, vnet_hdr=False)
        try:
            await netlink.set_link(self.ifname, mac=self.mac, mtu=self.mtu, up=True)
            await netlink.set_link("lo", up=True)
            for cidr in self.addresses:
                await netlink.add_address(self.ifname, cidr)
            self.rings = await self.domain.memory.alloc_pages(2)
            self.backend_id = -1
            self.connections = 0
            started = False
            while True:
                backend, tx, rx, port = await self._connect()
                if not started:
                    task_status.started()
                    started = True
                free_tx = list(range(BUFFERS))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._from_tap, tx, port, tap_fd, free_tx)
                    nursery.start_soon(self._from_rings, tx, rx, port, tap_fd, free_tx)
                    await self._wait_backend_leaves(backend)
                    nursery.cancel_scope.cancel()
                log.warning("backend went away; reconnecting", extra={"kv": {"devid": self.devid}})
                self.state = XenbusState.Initialising
                await xs.write(f"{p}/state", str(int(XenbusState.Initialising)))
                await port.close()
        finally:
            trio.lowlevel.notify_closing(tap_fd)
            os.close(tap_fd)  # the interface goes with its last fd (detach, guest exit)

    async def _connect(self) -> tuple[str, FrontRing, FrontRing, Any]:
        while True:
            try:
                return await self._try_connect()
            except _BackendMoved:
                log.info("backend moved while connecting; following it")

    async def _try_connect(self) -> tuple[str, FrontRing, FrontRing, Any]:
        xs, p = self.xs, self.path
        # Every attempt starts from Initialising: a backend that came up while we still said
        # Connected (to its predecessor) and failed on our stale keys waits for exactly this.
        self.state = XenbusState.Initialising
        await xs.write(f"{p}/state", str(int(XenbusState.Initialising)))
        backend = (await xs.read(f"{p}/backend")).decode()
        backend_id = int(await xs.read(f"{p}/backend-id"))
        await self._wait_backend(backend, (XenbusState.InitWait,))
        gt = self.domain.grant_table
        if backend_id != self.backend_id:
            # a new driver domain: grant our pages to it (the old one is gone)
            for gref in getattr(self, "all_grefs", []):
                gt.end_access(gref)
            self.backend_id = backend_id
            self.ring_grefs = [gt.grant_access(backend_id, f) for f in self.rings.frames]
            self.tx_grefs = [gt.grant_access(backend_id, f, readonly=True) for f in range(BUFFERS)]
            self.rx_grefs = [gt.grant_access(backend_id, f) for f in range(BUFFERS, 2 * BUFFERS)]
            self.all_grefs = self.ring_grefs + self.tx_grefs + self.rx_grefs
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
                    (f"{p}/state", str(int(XenbusState.Connected)))])
        self.state = XenbusState.Connected
        try:
            await self._wait_backend(backend, (XenbusState.Connected,))
        except BaseException:
            await port.close()
            raise
        rx.put_requests([netif.RX_REQUEST.pack(i, self.rx_grefs[i]) for i in range(min(BUFFERS, rx.size))])
        if rx.push_requests():
            port.notify()
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

    async def _wait_backend_leaves(self, backend: str) -> None:
        await self._wait_backend_leaves_state(backend, XenbusState.Connected)

    async def _wait_backend(self, backend: str, wanted: tuple[XenbusState, ...]) -> None:
        async with self.xs.watch(f"{backend}/state") as events:
            async for _ in events:
                try:
                    if XenbusState(int(await self.xs.read(f"{backend}/state"))) in wanted:
                        return
                except (XenStoreError, ValueError):
                    # gone: if the toolstack pointed us at a successor, follow it
                    try:
                        moved = (await self.xs.read(f"{self.path}/backend")).decode() != backend
                    except XenStoreError:
                        moved = False
                    if moved:
                        raise _BackendMoved from None

    async def _from_tap(self, tx: FrontRing, port: Any, tap_fd: int, free_tx: list[int]) -> None:
        ram = self.domain.memory
        while True:
            try:
                packet = os.read(tap_fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(tap_fd)
                continue
            if not free_tx or len(packet) > PAGE or not tx.free_requests():
                self.tx_dropped += 1
                continue
            slot = free_tx.pop()
            ram.ram_page(slot)[:len(packet)] = packet
            tx.put_requests([netif.encode_tx_request(netif.TxRequest(self.tx_grefs[slot], 0, 0, slot, len(packet)))])
            if tx.push_requests():
                port.notify()
            self.tx_packets += 1

    async def _from_rings(self, tx: FrontRing, rx: FrontRing, port: Any, tap_fd: int,
                          free_tx: list[int]) -> None:
        ram = self.domain.memory
        while True:
            try:
                tx_done = tx.take_responses()
                rx_done = rx.take_responses()
            except RingOverflow:
                self.bad_responses += 1
                log.error("backend overflowed a ring")
                return
            for raw in tx_done:
                rid, _ = netif.TX_RESPONSE.unpack(raw)
                if 0 <= rid < BUFFERS and rid not in free_tx:
                    free_tx.append(rid)
                else:
                    self.bad_responses += 1
            repost = []
            for raw in rx_done:
                rid, offset, _, status = netif.RX_RESPONSE.unpack(raw)
                if not 0 <= rid < BUFFERS:
                    self.bad_responses += 1
                    continue
                if status > 0 and offset + status <= PAGE:
                    packet = bytes(ram.ram_page(BUFFERS + rid)[offset:offset + status])
                    try:
                        os.write(tap_fd, packet)
                        self.rx_packets += 1
                    except OSError:
                        pass
                repost.append(netif.RX_REQUEST.pack(rid, self.rx_grefs[rid]))
            if repost:
                rx.put_requests(repost)
                if rx.push_requests():
                    port.notify()
            if not tx_done and not rx_done:
                if not tx.final_check_for_responses() and not rx.final_check_for_responses():
                    await port.wait()
                    await self.storm.woken(tx.unconsumed_responses() + rx.unconsumed_responses() > 0)
