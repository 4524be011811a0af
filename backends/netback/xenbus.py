"""netback: a guest's vif in the network driver domain (copy-based datapath, one queue).

For each vif the toolstack assigns (``backend/vif/FE/DEVID``), netback publishes Linux's
feature keys, maps the frontend's tx and rx rings, binds its event channel, creates a TAP
``vif<FE>.<DEVID>`` in its own network namespace and attaches it to the bridge named in the
``bridge`` key. Packets the guest sends (tx) are grant-copied out of its pages and written to
the TAP; packets read from the TAP are grant-copied into buffers the guest posted (rx).

Every tx request is validated before use: size 0 or over 64 KiB, offset + size past the
page, slot chains (``more_data``: not offered), and bad grants get an error response and a
counter; an overflowing ring disconnects that vif only.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from ringfence.hypervisor.io import netif
from ringfence.hypervisor.io.netif import Status, TxFlags
from ringfence.hypervisor.io.ring import BackRing, RingOverflow
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.hypervisor.platform import GrantCopy
from ringfence.isolation import netlink
from ringfence.xenbus.backend import serve_devices
from ringfence.xenbus.client import XenStore
from ringfence.xenbus.state import XenbusState
from ringfence.xenbus.storm import NotificationStorm

log = logging.getLogger(__name__)
PAGE = 4096
RX_RSP = netif.RX_RESPONSE
RELEASE_TIMEOUT = 10  # seconds for giving back a vif's rings, port and TAP


@dataclass(frozen=True, slots=True)
class VifStatistics:
    frontend: int
    devid: int
    state: str
    tx_packets: int
    rx_packets: int
    rx_dropped_no_buffer: int
    spurious_notifications: int
    rejected: dict[str, int]


class NetbackVif:
    def __init__(self, domain: Any, xs: XenStore, path: str, frontend_id: int, devid: int) -> None:
        self.domain, self.xs, self.path = domain, xs, path
        self.frontend_id, self.devid = frontend_id, devid
        self.tap_name = f"vif{frontend_id}.{devid}"
        self.state = XenbusState.Initialising
        self.tx_packets = self.rx_packets = self.rx_dropped = 0
        self.rejected: Counter[str] = Counter()
        self.storm = NotificationStorm()

    def statistics(self) -> VifStatistics:
        return VifStatistics(self.frontend_id, self.devid, self.state.name, self.tx_packets,
                             self.rx_packets, self.rx_dropped, self.storm.spurious,
                             dict(self.rejected))

    async def _set_state(self, state: XenbusState) -> None:
        self.state = state
        await self.xs.write(f"{self.path}/state", str(int(state)))

    async def run(self) -> None:
        self.frontend_path = (await self.xs.read(f"{self.path}/frontend")).decode()
        self.bridge = (await self._read_or(f"{self.path}/bridge", b"xenbr0")).decode()
        await self.xs.write_many([(f"{self.path}/{key}", str(value)) for key, value in (
            ("feature-rx-copy", 1), ("feature-rx-flip", 0), ("feature-sg", 0),
            ("feature-gso-tcpv4", 0), ("feature-gso-tcpv6", 0),
            ("feature-ipv6-csum-offload", 0), ("feature-rx-notify", 1),
            ("feature-split-event-channels", 0), ("multi-queue-max-queues", 1))])
        await self._set_state(XenbusState.InitWait)
        async with self.xs.watch(f"{self.frontend_path}/state") as events:
            async for _ in events:
                try:
                    fe = int(await self.xs.read(f"{self.frontend_path}/state"))
                except (XenStoreError, ValueError):
                    fe = 0
                if fe in (3, 4) and self.state == XenbusState.InitWait:
                    try:
                        await self._connect_and_serve()
                    except _Disconnect as exc:
                        log.warning("vif disconnected", extra={"kv": {"vif": self.tap_name, "reason": str(exc)}})
                    await self._set_state(XenbusState.Closing)
                    await self._set_state(XenbusState.Closed)
                elif fe == 1 and self.state == XenbusState.Closed:
                    await self._set_state(XenbusState.InitWait)

    async def _read_or(self, path: str, default: bytes) -> bytes:
        try:
            return await self.xs.read(path)
        except XenStoreError:
            return default

    async def _connect_and_serve(self) -> None:
        fe = self.frontend_path
        # The frontend's keys in one round trip, each copied once and validated.
        raw = await self.xs.read_many([f"{fe}/{key}" for key in (
            "tx-ring-ref", "rx-ring-ref", "event-channel", "request-rx-copy")])
        try:
            if any(value is None for value in raw[:3]):
                raise ValueError("tx-ring-ref, rx-ring-ref or event-channel missing")
            tx_ref, rx_ref, port_no = (int(value) for value in raw[:3])  # type: ignore[arg-type]
        except ValueError as exc:
            raise _Disconnect(f"frontend keys: {exc}") from None
        if raw[3] != b"1":
            raise _Disconnect("frontend does not request rx-copy")
        gt = self.domain.grant_table
        try:
            tx_map = await gt.map(self.frontend_id, [tx_ref])
        except OSError as exc:
            raise _Disconnect(f"tx ring map: {exc}") from None
        try:
            rx_map = await gt.map(self.frontend_id, [rx_ref])
        except OSError as exc:
            with contextlib.suppress(OSError):
                await gt.unmap(tx_map)
            raise _Disconnect(f"rx ring map: {exc}") from None
        port = tap_fd = None
        try:
            # Everything taken from here on is given back whatever fails (finally below):
            # a device that failed once must be able to connect again.
            try:
                port = await self.domain.events.bind_interdomain(self.frontend_id, port_no)
            except OSError as exc:
                raise _Disconnect(f"event channel: {exc}") from None
            tx = BackRing(tx_map.buffer, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
            rx = BackRing(rx_map.buffer, netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
            tap_fd, _ = netlink.open_tap(self.tap_name, vnet_hdr=False)
            await netlink.ensure_bridge(self.bridge)
            await netlink.set_link(self.tap_name, master=self.bridge, up=True)
            await self._set_state(XenbusState.Connected)
            log.info("vif connected", extra={"kv": {"vif": self.tap_name, "bridge": self.bridge}})
            self.rx_buffers: collections.deque[tuple[int, int]] = collections.deque()  # (id, gref)
            self._abuse = ""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_rings, tx, rx, port, tap_fd, nursery.cancel_scope)
                nursery.start_soon(self._tap_to_guest, rx, port, tap_fd)
                nursery.start_soon(self._watch_close, nursery.cancel_scope)
            if self._abuse:
                raise _Disconnect(self._abuse)
        finally:
            # Shielded: a vif removed by the toolstack is cancelled, and what it holds of
            # the frontend must be given back all the same.
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                if tap_fd is not None:
                    trio.lowlevel.notify_closing(tap_fd)
                    os.close(tap_fd)
                    with contextlib.suppress(OSError):
                        await netlink.delete_link(self.tap_name)
                for mapping in (tx_map, rx_map):
                    with contextlib.suppress(OSError):
                        await gt.unmap(mapping)
                if port is not None:
                    await port.close()

    async def _watch_close(self, scope: trio.CancelScope) -> None:
        async with self.xs.watch(f"{self.frontend_path}/state") as events:
            async for _ in events:
                try:
                    fe = int(await self.xs.read(f"{self.frontend_path}/state"))
                except (XenStoreError, ValueError):
                    fe = 0
                if fe not in (3, 4):
                    scope.cancel()
                    return

    async def _serve_rings(self, tx: BackRing, rx: BackRing, port: Any, tap_fd: int,
                           scope: trio.CancelScope) -> None:
        while True:
            try:
                tx_raws = tx.take_requests()
                for raw in rx.take_requests():
                    rid, gref = netif.RX_REQUEST.unpack(raw)
                    self.rx_buffers.append((rid, gref))
            except RingOverflow:
                self._abuse = "ring overflow"
                self.rejected["ring_overflow"] += 1
                scope.cancel()
                return
            if tx_raws:
                await self._transmit(tx, tx_raws, port, tap_fd)
                continue
            if not tx.final_check_for_requests() and not rx.final_check_for_requests():
                await port.wait()
                await self.storm.woken(tx.unconsumed_requests() + rx.unconsumed_requests() > 0)

    async def _transmit(self, tx: BackRing, raws: list[bytes], port: Any, tap_fd: int) -> None:
        copies, kept, responses = [], [], []
        for raw in raws:
            req = netif.decode_tx_request(raw)
            reason = None
            if req.flags & (TxFlags.MORE_DATA | TxFlags.EXTRA_INFO):
                reason = "unsupported_flags"  # we offer neither feature-sg nor extras
            elif req.size == 0 or req.size > netif.MAX_TX_SIZE:
                reason = "bad_size"
            elif req.offset + req.size > PAGE:
                reason = "crosses_page"
            if reason:
                self.rejected[reason] += 1
                responses.append(netif.TX_RESPONSE.pack(req.id, Status.ERROR))
                continue
            buffer = bytearray(req.size)
            copies.append(GrantCopy(req.size, source_gref=(self.frontend_id, req.gref, req.offset),
                                    dest_local=buffer))
            kept.append((req, buffer))
        statuses = await self.domain.grant_table.copy(copies) if copies else []
        for (req, buffer), status in zip(kept, statuses):
            if status:
                self.rejected["bad_grant"] += 1
                responses.append(netif.TX_RESPONSE.pack(req.id, Status.ERROR))
                continue
            try:
                os.write(tap_fd, buffer)
                self.tx_packets += 1
                responses.append(netif.TX_RESPONSE.pack(req.id, Status.OKAY))
            except OSError:
                responses.append(netif.TX_RESPONSE.pack(req.id, Status.DROPPED))
        tx.put_responses(responses)
        if tx.push_responses():
            port.notify()

    async def _tap_to_guest(self, rx: BackRing, port: Any, tap_fd: int) -> None:
        while True:
            packets = []
            while len(packets) < 64:
                try:
                    packets.append(os.read(tap_fd, 65536))
                except BlockingIOError:
                    break
            if not packets:
                await trio.lowlevel.wait_readable(tap_fd)
                continue
            copies, ids = [], []
            for packet in packets:
                if not self.rx_buffers or len(packet) > PAGE:
                    self.rx_dropped += 1  # the guest posted no buffer: drop, as Linux does
                    continue
                rid, gref = self.rx_buffers.popleft()
                copies.append(GrantCopy(len(packet), source_local=packet,
                                        dest_gref=(self.frontend_id, gref, 0)))
                ids.append((rid, len(packet)))
            if not copies:
                continue
            statuses = await self.domain.grant_table.copy(copies)
            responses = [RX_RSP.pack(rid, 0, 0, size if not status else Status.ERROR)
                         for (rid, size), status in zip(ids, statuses)]
            self.rx_packets += len(responses)
            rx.put_responses(responses)
            if rx.push_responses():
                port.notify()


class _Disconnect(Exception):
    pass


async def serve_netback(domain: Any, xs: XenStore, *,
                        task_status: trio.TaskStatus[dict[tuple[int, int], NetbackVif]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve every vif the toolstack assigns to this domain (``backend/vif/FE/DEVID``)."""
    await serve_devices(xs, f"/local/domain/{domain.domid}/backend/vif", "frontend",
                        lambda path, fe, devid: NetbackVif(domain, xs, path, fe, devid),
                        task_status=task_status)


__all__ = ["NetbackVif", "serve_netback"]
