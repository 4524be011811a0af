"""netback: a guest's vif in the network driver domain (copy-based datapath, one queue).

For each vif the toolstack assigns (``backend/vif/FE/DEVID``), netback publishes Linux's
feature keys, maps the frontend's tx and rx rings, binds its event channel, creates a TAP
``vif<FE>.<DEVID>`` in its own network namespace and attaches it to the bridge named in the
``bridge`` key. Packets the guest sends (tx) are grant-copied out of its pages and written to
the TAP; packets read from the TAP are grant-copied into buffers the guest posted (rx).

Packets span several slots (``feature-sg``), carry partial checksums both ways and TCP
segments of up to 64 KiB (``feature-gso-tcpv4/6``): the TAP's virtio-net header says the
same to the kernel, so a guest's TCP stream crosses the driver domain in 64 KiB pieces.
Every tx request is validated before use (``datapath.TxParser``): a bad packet gets error
responses and a counter; a broken chain or an overflowing ring disconnects that vif only.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from ringfence._log import RateLimitedLog
from ringfence.backends.netback.copier import GrantCopier, MappingCopier
from ringfence.backends.netback.fastpath import VifFastPath
from ringfence.backends.netback.datapath import Fatal, TxPacket, TxParser, responses
from ringfence.hypervisor.io import netif, vnet
from ringfence.hypervisor.io.netif import STATUS_DROPPED, STATUS_ERROR, STATUS_OKAY
from ringfence.hypervisor.io.ring import BackRing, RingOverflow
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.isolation import netlink, udev
from ringfence.xenbus.backend import Found, Verdict, follow_frontend, serve_devices, watch_for_close
from ringfence.xenbus.client import XenStore
from ringfence.xenbus.state import XenbusState
from ringfence.xenbus.storm import NotificationStorm

log = logging.getLogger(__name__)
PAGE = 4096
RX_RSP = netif.RX_RESPONSE
RELEASE_TIMEOUT = 10  # seconds for giving back a vif's rings, port and TAP
# What the toolstack writes for a vif, read when a scan finds it (frontend says it is complete)
DEVICE_KEYS = ("frontend", "bridge")
RX_BACKLOG = 64       # packets read from the TAP that wait for the guest's buffers


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
    device_events: dict[str, int]
    copier: dict[str, int]          # pages kept mapped, maps, failures (sim); {} with grant copy
    refusals_not_logged: int        # held back by the rate limit on refusal log lines


class NetbackVif:
    def __init__(self, domain: Any, xs: XenStore, path: str, frontend_id: int, devid: int,
                 found: Found | None = None) -> None:
        self.domain, self.xs, self.path = domain, xs, path
        self._found = found  # DEVICE_KEYS as the scan that found us read them
        self.frontend_id, self.devid = frontend_id, devid
        self.tap_name = f"vif{frontend_id}.{devid}"
        self.state = XenbusState.Initialising
        self.tx_packets = self.rx_packets = self.rx_dropped = 0
        self.parser = TxParser()
        self.rejected: Counter[str] = self.parser.rejected
        self.storm = NotificationStorm()
        self.refusals = RateLimitedLog(log)
        self.device_events: Counter[str] = Counter()  # kernel uevents for our TAP, by action
        self._tap_index = 0                # the ifindex of our TAP while it serves
        self._serving: trio.CancelScope | None = None
        self.copier: GrantCopier | MappingCopier | None = None  # while connected
        self.fast: VifFastPath | None = None  # the data path in C (sim: pages stay mapped)

    def statistics(self) -> VifStatistics:
        fast = self.fast
        return VifStatistics(self.frontend_id, self.devid, self.state.name,
                             self.tx_packets + (fast.packets if fast else 0),
                             self.rx_packets + (fast.rx_packets if fast else 0),
                             self.rx_dropped + (fast.rx_dropped if fast else 0),
                             self.storm.spurious + (fast.spurious if fast else 0),
                             dict(self.rejected), dict(self.device_events),
                             self.copier.statistics() if self.copier else {},
                             self.refusals.suppressed)

    def _tap_gone(self, why: str) -> None:
        if self._serving is not None:
            self._abuse = "TAP removed"
            log.warning("vif TAP removed under us; disconnecting so that it is made again",
                        extra={"kv": {"vif": self.tap_name, "seen_by": why}})
            self._serving.cancel()
            self._serving = None

    def device_event(self, event: udev.NetDeviceEvent) -> None:
        """A uevent for our TAP's name. Removed by someone else while serving (an admin's
        ``ip link del``): disconnect, so that the frontend reconnects and a new TAP is made
        and attached. Events for an earlier TAP of the same name (ifindex) are ignored."""
        if event.ifindex and event.ifindex != self._tap_index:
            return
        self.device_events[event.action] += 1
        if event.action == "remove":
            self._tap_gone("kernel remove event")

    async def _set_state(self, state: XenbusState) -> None:
        self.state = state
        await self.xs.write(f"{self.path}/state", str(int(state)))

    async def run(self) -> None:
        found, self._found = self._found, None
        raw_frontend, raw_bridge = ([found[key] for key in DEVICE_KEYS] if found else
                                    await self.xs.read_many([f"{self.path}/{key}" for key in DEVICE_KEYS]))
        if raw_frontend is None:
            return  # removed meanwhile
        self.frontend_path = raw_frontend.decode()
        self.bridge = (raw_bridge or b"xenbr0").decode()
        # One round trip: the daemon applies them in order, so a frontend that sees InitWait
        # (written last) reads every feature already there.
        await self.xs.write_many([(f"{self.path}/{key}", str(value)) for key, value in (
            ("feature-rx-copy", 1), ("feature-rx-flip", 0), ("feature-sg", 1),
            ("feature-gso-tcpv4", 1), ("feature-gso-tcpv6", 1),
            ("feature-ipv6-csum-offload", 1), ("feature-rx-notify", 1),
            ("feature-split-event-channels", 0), ("multi-queue-max-queues", 1),
            ("state", int(XenbusState.InitWait)))])
        self.state = XenbusState.InitWait
        await follow_frontend(self.xs, self.frontend_path, self._frontend_changed)

    async def _frontend_changed(self, frontend_states: Any) -> Verdict:
        """React to the frontend's state (:func:`~ringfence.xenbus.backend.follow_frontend`):
        "again" when a connection (which took ``frontend_states``' events while it lasted)
        has ended, else "wait" (the toolstack's removal of the vif ends it)."""
        try:
            # backend before state: see blkback's _frontend_changed
            raw_backend, raw_state = await self.xs.read_many(
                [f"{self.frontend_path}/backend", f"{self.frontend_path}/state"])
        except XenStoreError:
            raw_state = raw_backend = None
        if raw_backend is not None and raw_backend != self.path.encode():
            return "wait"  # staged for a warm spare: the frontend is another backend's yet
        try:
            fe = int(raw_state or b"")
        except ValueError:
            fe = 0
        if fe in (3, 4) and self.state == XenbusState.InitWait:
            try:
                await self._connect_and_serve(frontend_states)
            except _Disconnect as exc:
                log.warning("vif disconnected", extra={"kv": {"vif": self.tap_name, "reason": str(exc)}})
            await self._set_state(XenbusState.Closing)
            await self._set_state(XenbusState.Closed)
            return "again"
        if fe == 1 and self.state == XenbusState.Closed:
            await self._set_state(XenbusState.InitWait)
        return "wait"

    async def _read_or(self, path: str, default: bytes) -> bytes:
        try:
            return await self.xs.read(path)
        except XenStoreError:
            return default

    async def _connect_and_serve(self, frontend_states: Any) -> None:
        fe = self.frontend_path
        # The frontend's keys in one round trip, each copied once and validated.
        raw = await self.xs.read_many([f"{fe}/{key}" for key in (
            "tx-ring-ref", "rx-ring-ref", "event-channel", "request-rx-copy", "feature-sg",
            "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-no-csum-offload")])
        raw_mtu = await self._read_or(f"{self.path}/mtu", b"1500")
        try:
            if any(value is None for value in raw[:3]):
                raise ValueError("tx-ring-ref, rx-ring-ref or event-channel missing")
            tx_ref, rx_ref, port_no = (int(value) for value in raw[:3])  # type: ignore[arg-type]
        except ValueError as exc:
            raise _Disconnect(f"frontend keys: {exc}") from None
        if raw[3] != b"1":
            raise _Disconnect("frontend does not request rx-copy")
        # What the guest can take on rx: packets over several slots, TCP segments, partial
        # checksums (Linux's defaults when a key is absent: no sg, no gso, checksums on).
        self.rx_sg = raw[4] == b"1"
        gso4, gso6 = self.rx_sg and raw[5] == b"1", self.rx_sg and raw[6] == b"1"
        csum = raw[7] != b"1"
        try:
            mtu = int(raw_mtu)
            if not 68 <= mtu <= (65535 - 14 if self.rx_sg else PAGE - 14):
                raise ValueError(f"mtu {mtu}")
        except ValueError as exc:
            raise _Disconnect(f"backend mtu: {exc}") from None
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
            tap_fd, _ = netlink.open_tap(self.tap_name, vnet_hdr=True)
            vnet.set_offload(tap_fd, csum, gso4, gso6)
            await netlink.ensure_bridge(self.bridge)
            self._tap_index = socket.if_nametoindex(self.tap_name)
            await netlink.set_link(self.tap_name, master=self.bridge, mtu=mtu, up=True)
            await self._set_state(XenbusState.Connected)
            log.info("vif connected", extra={"kv": {"vif": self.tap_name, "bridge": self.bridge}})
            self.rx_buffers: collections.deque[tuple[int, int]] = collections.deque()  # (id, gref)
            self.rx_posted = trio.Event()  # set when the guest posts buffers
            self.copier = (MappingCopier if gt.persistent_maps else GrantCopier)(gt, self.frontend_id)
            self.fast = None
            if isinstance(self.copier, MappingCopier):  # the C path uses the pages it keeps
                self.fast = self.copier.fast = VifFastPath(tap_fd, self.rx_sg)
            self._abuse = ""
            async with trio.open_nursery() as nursery:
                self._serving = nursery.cancel_scope
                if self.fast is not None:  # both rings and the TAP on a C thread
                    nursery.start_soon(self._serve_in_c, tx, rx, port, tap_fd, nursery.cancel_scope)
                else:
                    nursery.start_soon(self._serve_rings, tx, rx, port, tap_fd, nursery.cancel_scope)
                    nursery.start_soon(self._tap_to_guest, rx, port, tap_fd)
                nursery.start_soon(watch_for_close, self.xs, self.frontend_path, frontend_states,
                                   nursery.cancel_scope)
            if self._abuse:
                raise _Disconnect(self._abuse)
        finally:
            self._serving = None  # our own removal of the TAP below is no news
            # Shielded: a vif removed by the toolstack is cancelled, and what it holds of
            # the frontend must be given back all the same.
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                if tap_fd is not None:
                    trio.lowlevel.notify_closing(tap_fd)
                    os.close(tap_fd)
                    with contextlib.suppress(OSError):
                        await netlink.delete_link(self.tap_name)
                copier, self.copier = self.copier, None
                if self.fast is not None:  # its counts carry over; its pages go now
                    self.storm.spurious += self.fast.spurious
                    self.tx_packets += self.fast.packets
                    self.rx_packets += self.fast.rx_packets
                    self.rx_dropped += self.fast.rx_dropped
                    self.rejected["bad_rx_grant"] += self.fast.rx_bad_grants
                    self.fast = None
                if copier is not None:
                    await copier.close()
                for mapping in (tx_map, rx_map):
                    with contextlib.suppress(OSError):
                        await gt.unmap(mapping)
                if port is not None:
                    await port.close()

    def _broke_protocol(self, reason: str, scope: trio.CancelScope) -> None:
        self._abuse = reason.replace("_", " ")
        log.warning("vif broke the protocol; disconnecting", extra={"kv": {
            "vif": self.tap_name, "reason": reason}})
        scope.cancel()

    async def _serve_in_c(self, tx: BackRing, rx: BackRing, port: Any, tap_fd: int,
                          scope: trio.CancelScope) -> None:
        """The vif's C loop (fastpath.py) moves the common packets both ways; Python parses
        the transmit requests it hands back and maps the receive buffers it has no page for."""
        fast = self.fast
        assert fast is not None and self.copier is not None
        loop = fast.loop(tx, rx, port)
        try:
            while True:
                result = await loop.run()
                if result == loop.HANDED_BACK:
                    try:
                        await self._transmit(tx, self.parser.parse(loop.handed_back()), port, tap_fd)
                    except Fatal as exc:
                        return self._broke_protocol(str(exc), scope)
                elif result == loop.NEW_BUFFERS:
                    posted = loop.new_buffers()
                    await self.copier.prepare({gref for _, gref in posted}, True)
                    fast.post_rx(posted)
                elif result == loop.OVERFLOW:
                    self.rejected["ring_overflow"] += 1
                    return self._broke_protocol("ring_overflow", scope)
                elif result == loop.TAP_ERROR:  # EBADFD: the TAP was deleted under us
                    return self._tap_gone(os.strerror(loop.error))
                else:
                    return
        finally:
            loop.close()

    async def _serve_rings(self, tx: BackRing, rx: BackRing, port: Any, tap_fd: int,
                           scope: trio.CancelScope) -> None:
        while True:
            try:
                tx_raws = tx.take_requests()
                posted = [netif.RX_REQUEST.unpack(raw) for raw in rx.take_requests()]
                if posted:
                    await self.copier.prepare({gref for _, gref in posted}, True)
                    self.rx_buffers.extend(posted)
                    self.rx_posted.set()
                    self.storm.note_work()
                if tx_raws:
                    self.storm.note_work()
                    await self._transmit(tx, self.parser.parse(tx_raws), port, tap_fd)
                    continue
            except RingOverflow:
                self.rejected["ring_overflow"] += 1
                return self._broke_protocol("ring_overflow", scope)
            except Fatal as exc:
                return self._broke_protocol(str(exc), scope)
            if not tx.final_check_for_requests() and not rx.final_check_for_requests():
                await port.wait()
                await self.storm.woken(tx.unconsumed_requests() + rx.unconsumed_requests() > 0)

    async def _transmit(self, tx: BackRing, packets: list[Any], port: Any, tap_fd: int) -> None:
        """Copy a batch of the guest's packets out of its pages (one grant copy for all) and
        write each to the TAP with the virtio-net header its flags and GSO info call for."""
        answers: list[bytes] = []
        kept, jobs = [], []
        for packet in packets:
            if not isinstance(packet, TxPacket):
                answers += self._refused(packet.layout, packet.reason, counted=True)
                continue
            frame = bytearray(vnet.HEADER_SIZE + packet.size)
            jobs.append(([(seg.gref, seg.offset, seg.length) for seg in packet.segments],
                         memoryview(frame)[vnet.HEADER_SIZE:]))
            kept.append((packet, frame))
        arrived = await self.copier.gather(jobs) if jobs else []
        for (packet, frame), whole in zip(kept, arrived):
            if not whole:
                answers += self._refused(packet.layout, "bad_grant")
                continue
            body = memoryview(frame)[vnet.HEADER_SIZE:]
            header = vnet.header_for(body, partial=bool(packet.flags & netif.TXF_CSUM_BLANK),
                                     validated=bool(packet.flags & netif.TXF_DATA_VALIDATED),
                                     gso_type=packet.gso_type, gso_size=packet.gso_size)
            if header is None:
                answers += self._refused(packet.layout, "bad_offload_headers")
                continue
            frame[:vnet.HEADER_SIZE] = header
            try:
                os.write(tap_fd, frame)
                self.tx_packets += 1
                answers += responses(packet.layout, STATUS_OKAY)
            except OSError:
                answers += responses(packet.layout, STATUS_DROPPED)
        tx.put_responses(answers)
        if tx.push_responses():
            port.notify()

    def _refused(self, layout: tuple[int | None, ...], reason: str, counted: bool = False) -> list[bytes]:
        """The error responses of a refused packet, its counter (unless the parser counted
        it) and a rate-limited log line."""
        if not counted:
            self.rejected[reason] += 1
        self.refusals.warning("tx packet refused", vif=self.tap_name, reason=reason)
        return responses(layout, STATUS_ERROR)

    async def _tap_to_guest(self, rx: BackRing, port: Any, tap_fd: int) -> None:
        backlog: collections.deque[bytes] = collections.deque()
        while True:
            while len(backlog) < RX_BACKLOG:
                try:
                    backlog.append(os.read(tap_fd, 65536 + vnet.HEADER_SIZE + 64))
                except BlockingIOError:
                    break
                except OSError as exc:  # EBADFD: the TAP was deleted under us
                    self._tap_gone(str(exc))
                    return
            if not backlog:
                await trio.lowlevel.wait_readable(tap_fd)
                continue
            jobs: list[list[tuple[int, memoryview]]] = []
            plans: list[list[bytes]] = []  # the responses of each packet
            while backlog:
                planned = self._plan_rx(backlog[0])
                if planned is None:
                    break  # the guest has not posted enough buffers yet
                backlog.popleft()
                if planned:
                    plans.append(planned[0])
                    jobs.append(planned[1])
            if plans:
                arrived = await self.copier.scatter(jobs)
                answers: list[bytes] = []
                for rsps, whole in zip(plans, arrived):
                    if not whole:
                        rid, _, flags, _ = RX_RSP.unpack(rsps[0])
                        rsps = [RX_RSP.pack(rid, 0, flags, STATUS_ERROR)] + rsps[1:]
                        self.rejected["bad_rx_grant"] += 1
                    else:
                        self.rx_packets += 1
                    answers += rsps
                rx.put_responses(answers)
                if rx.push_responses():
                    port.notify()
            if backlog:  # its head waits for the guest to post more buffers
                self.rx_posted = trio.Event()
                await self.rx_posted.wait()

    def _plan_rx(self, packet: bytes) -> tuple[list[bytes], list[tuple[int, memoryview]]] | tuple[()] | None:
        """The responses and the (gref, bytes) pieces that put one packet from the TAP into
        the guest's buffers: data in page-sized pieces, a GSO extra after the first (as
        Linux's netback orders them). None: not enough buffers posted yet; (): dropped."""
        header = vnet.unpack(packet)
        frame = memoryview(packet)[vnet.HEADER_SIZE:]
        partial, validated, gso_type, gso_size = vnet.describe(header)
        pieces = max(1, -(-len(frame) // PAGE))
        if (pieces > 1 and not self.rx_sg) or (header.gso_type and not gso_type):
            self.rx_dropped += 1  # the guest cannot take it (the TAP's offloads should prevent it)
            return ()
        if len(self.rx_buffers) < pieces + (1 if gso_type else 0):
            return None
        flags = (netif.RXF_CSUM_BLANK | netif.RXF_DATA_VALIDATED if partial
                 else netif.RXF_DATA_VALIDATED if validated else 0)
        rsps, job = [], []
        for index in range(pieces):
            rid, gref = self.rx_buffers.popleft()
            piece = frame[index * PAGE:(index + 1) * PAGE]
            job.append((gref, piece))
            piece_flags = netif.RXF_MORE_DATA if index < pieces - 1 else 0
            if index == 0:
                piece_flags |= flags | (netif.RXF_EXTRA_INFO if gso_type else 0)
            rsps.append(RX_RSP.pack(rid, 0, piece_flags, len(piece)))
            if index == 0 and gso_type:
                self.rx_buffers.popleft()  # its slot carries the extra info
                rsps.append(netif.encode_gso_extra(gso_size, gso_type, netif.RX_SLOT))
        return rsps, job


class _Disconnect(Exception):
    pass


async def serve_netback(domain: Any, xs: XenStore, *,
                        task_status: trio.TaskStatus[dict[tuple[int, int], NetbackVif]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve every vif the toolstack assigns to this domain (``backend/vif/FE/DEVID``), and
    tell each the kernel's events for its TAP."""
    events = udev.open_net_events()
    async with trio.open_nursery() as nursery:
        devices = await nursery.start(functools.partial(
            serve_devices, xs, f"/local/domain/{domain.domid}/backend/vif", DEVICE_KEYS,
            lambda path, fe, devid, found: NetbackVif(domain, xs, path, fe, devid, found)))
        task_status.started(devices)
        if events is not None:
            async for event in events:
                for vif in list(devices.values()):
                    if vif.tap_name == event.name:
                        vif.device_event(event)


__all__ = ["NetbackVif", "serve_netback"]
