"""blkback: the XenBus side of a virtual block device, and its serving loop.

Runs inside the storage driver domain. It watches ``backend/vbd`` in its own XenStore
directory; for each device the toolstack sets up there (``params``, ``mode``,
``frontend``) it publishes the features Linux's blkback publishes, waits for the frontend's
ring, maps it, and serves requests until the frontend closes — then waits for it to come
back. Hostile input costs the frontend an error response or, for a broken ring, its
connection; never the service, and never another device.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import trio

from ringfence._log import RateLimitedLog, logging_context
from ringfence.backends.blkback import faults
from ringfence.backends.blkback.datapath import Geometry, Plan, Rejection, Validator
from ringfence.backends.blkback.fastpath import GREF_LIMIT, FastPath
from ringfence.backends.blkback.vbd import IoKind, IoRequest, Vbd, backing_path
from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.blkif import Op, Status
from ringfence.hypervisor.io.ring import BackRing, RingOverflow
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.xenbus.backend import Found, Verdict, follow_frontend, serve_devices, watch_for_close
from ringfence.xenbus.client import XenStore, gather
from ringfence.xenbus.state import XenbusState
from ringfence.xenbus.storm import NotificationStorm

log = logging.getLogger(__name__)

MAX_RING_PAGE_ORDER = 4
MAX_QUEUES = 4                 # multi-queue-max-queues: a ring and an event channel each
PERSISTENT_GRANTS_MAX = 1056   # LRU bound on cached mappings per device (as Linux's default)
VDISK_READONLY = 4
# What the toolstack writes for a vbd, read when a scan finds it (params says it is complete)
DEVICE_KEYS = ("params", "mode", "frontend")
RELEASE_TIMEOUT = 10  # seconds for giving back a device's mappings and port


# The frontend's keys that say how its rings are laid out (read with its state), and the
# pages it will do I/O from first, listed for a backend it stands by with (_premap).
HEADER_KEYS = ("ring-page-order", "multi-queue-num-queues", "protocol", "feature-persistent",
               "pool-refs")
PREMAP_MAX = 128  # grefs of pool-refs mapped ahead, at most (ringfence's blkfront lists 64)


@dataclass(frozen=True, slots=True)
class DeviceStatistics:
    frontend: int
    devid: int
    state: str
    connections: int
    requests: int
    errors: int
    rejected: dict[str, int]
    persistent_grants: int
    persistent_hits: int
    persistent_maps: int
    disconnects_for_abuse: int
    injected_errors: int
    spurious_notifications: int
    ring_keys_read_ahead: int  # connections whose ring keys came with the frontend's state
    premapped_grants: int      # persistent grants mapped ahead, from the frontend's pool-refs
    fast_path: dict[str, Any] | None
    queues: int
    ring: dict[str, Any] | None  # the first queue's
    vbd: dict[str, Any] | None
    injected_faults: dict[str, int]  # ring faults the harness made, by kind


class BlkbackDevice:
    def __init__(self, domain: Any, xs: XenStore, path: str, frontend_id: int, devid: int,
                 found: Found | None = None) -> None:
        self.domain, self.xs, self.path = domain, xs, path
        self._found = found  # DEVICE_KEYS as the scan that found us read them
        self.frontend_id, self.devid = frontend_id, devid
        self.vbd: Vbd | None = None
        self.validator: Validator | None = None
        self.rings: list[BackRing] = []  # one per queue, while connected
        self._ports: list[Any] = []       # their event channels
        self._in_thread = trio.Lock()   # fast-path calls in worker threads, one at a time,
                                        # and never while a page they may use is unmapped
        self.state = XenbusState.Initialising
        self.persistent: OrderedDict[int, Any] = OrderedDict()
        self.connections = self.requests = self.errors = self.abuse = 0
        self.storm = NotificationStorm()
        self.refusals = RateLimitedLog(log)
        self.hits = self.maps = 0
        # Fault injection (ringfence inject eio): None, -1 (every I/O fails), or how many more
        self.failing: int | None = None
        self.injected_errors = 0
        self.ring_fault: faults.RingFault | None = None  # ringfence inject corrupt-index, ...
        self.injected: Counter[str] = Counter()           # ring faults made, by kind
        self.use_persistent = True
        self.fast: FastPath | None = None  # while connected with persistent grants
        # The frontend's ring layout (ring-page-order, multi-queue-num-queues) as last seen
        # with its keys in place, and its state as last read: a frontend that starts over
        # (Initialising) is expected to keep its layout, so the state that says it is ready
        # comes with its ring keys (one round trip fewer; read again if it changed).
        self._layout_seen: tuple[bytes | None, bytes | None] | None = None
        self._frontend_state = XenbusState.Unknown
        self.ring_keys_read_ahead = 0
        self.premapped = 0

    def statistics(self) -> DeviceStatistics:
        fast = self.fast.statistics() if self.fast else None
        served = fast.served if fast else 0
        return DeviceStatistics(
            self.frontend_id, self.devid, self.state.name, self.connections, self.requests + served,
            self.errors + (fast.io_errors if fast else 0),
            dict(self.validator.rejected) if self.validator else {},
            len(self.persistent), self.hits + served, self.maps, self.abuse, self.injected_errors,
            self.storm.spurious, self.ring_keys_read_ahead, self.premapped,
            asdict(fast) if fast else None, len(self.rings),
            asdict(self.rings[0].statistics()) if self.rings else None,
            asdict(self.vbd.statistics()) if self.vbd else None, dict(self.injected))

    async def _set_state(self, state: XenbusState) -> None:
        self.state = state
        await self.xs.write(f"{self.path}/state", str(int(state)))

    async def run(self) -> None:
        with logging_context(kind="vbd", frontend=self.frontend_id, devid=self.devid):
            found, self._found = self._found, None
            raw_params, raw_mode, raw_frontend = ([found[key] for key in DEVICE_KEYS] if found else
                                                  await self.xs.read_many([f"{self.path}/{key}" for key in DEVICE_KEYS]))
            if raw_params is None or raw_frontend is None:
                return  # removed meanwhile
            params, mode = raw_params.decode(), (raw_mode or b"w").decode()
            self.frontend_path = raw_frontend.decode()
            self.vbd = Vbd(backing_path(params), read_only=mode.startswith("r"))
            self.validator = Validator(Geometry(self.vbd.sectors, self.vbd.read_only))
            try:
                await self._publish_features()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._follow_fault_injection)
                    await follow_frontend(self.xs, self.frontend_path, self._frontend_changed)
                    nursery.cancel_scope.cancel()
            finally:
                self.vbd.close()

    async def _follow_fault_injection(self) -> None:
        """The toolstack's ``fault-inject`` node (:mod:`~ringfence.backends.blkback.faults`):
        a failing disk, or a fault of the ring's; empty or absent, nothing."""
        async with self.xs.watch(f"{self.path}/fault-inject") as events:
            async for _ in events:
                value = (await self._read_or(f"{self.path}/fault-inject", b"")).decode(errors="replace")
                self.failing, self.ring_fault = faults.parse(value)
                log.warning("fault injection", extra={"kv": {"fault": value or "none"}})
                if self.ring_fault is not None and self.ring_fault.kind == "storm" and self.rings:
                    self._make_ring_fault(self.rings[0], self._ports[0])  # now: it needs no request

    def _make_ring_fault(self, ring: BackRing, port: Any) -> None:
        fault = self.ring_fault
        if fault is not None and faults.make_on_ring(fault, ring, port):
            self._made(fault)

    def _notify(self, port: Any) -> None:
        fault = self.ring_fault
        if fault is not None and fault.kind == "drop-notify":
            self._made(fault)
            return
        port.notify()

    def _made(self, fault: faults.RingFault) -> None:
        self.injected[fault.kind] += 1
        fault.left -= 1
        if fault.left <= 0:  # one line per fault, however many times it is made
            if self.ring_fault is fault:
                self.ring_fault = None
            log.warning("fault made", extra={"kv": {"fault": fault.kind, "times": self.injected[fault.kind]}})

    async def _publish_features(self) -> None:
        assert self.vbd is not None
        p, vbd = self.path, self.vbd
        features = (
            ("sectors", vbd.sectors), ("sector-size", 512),
            ("physical-sector-size", vbd.physical_sector_size),
            ("info", VDISK_READONLY if vbd.read_only else 0),
            ("feature-flush-cache", 1), ("feature-discard", int(not vbd.read_only)),
            ("discard-granularity", 4096), ("discard-alignment", 0),
            ("discard-secure", 0), ("feature-persistent", 1),
            ("feature-max-indirect-segments", 256),
            ("multi-queue-max-queues", MAX_QUEUES), ("max-ring-page-order", MAX_RING_PAGE_ORDER),
            ("state", int(XenbusState.InitWait)))
        # One round trip: the daemon applies them in order, so a frontend that sees InitWait
        # (written last) reads every feature already there.
        await self.xs.write_many([(f"{p}/{key}", str(value)) for key, value in features])
        self.state = XenbusState.InitWait
        log.info("device waiting for frontend", extra={"kv": {"sectors": vbd.sectors}})

    async def _frontend_changed(self, frontend_states: Any) -> Verdict:
        """React to the frontend's state (:func:`~ringfence.xenbus.backend.follow_frontend`):
        "gone" when the device is gone, "again" when a connection (which took
        ``frontend_states``' events while it lasted) has ended, else "wait"."""
        # The keys a connection starts from come with the state (a reconnection after a
        # crash waits on each round trip). ``backend`` is read before ``state``, the reverse
        # of the order a takeover writes them in: a frontend seen naming us has its stale
        # Connected reset already (toolstack.devices.switch_backends).
        guess = self._layout_seen if (self.state == XenbusState.InitWait and self._frontend_state
                                      == XenbusState.Initialising) else None
        guessed: list[str] = []
        if guess is not None:
            with contextlib.suppress(_Disconnect, ValueError):  # judged when connecting
                guessed = self._ring_key_paths(self.frontend_path, *guess)[0]
        if not guessed:
            guess = None
        keys = [f"{self.frontend_path}/{key}" for key in ("backend", "state", *HEADER_KEYS)] + guessed
        raw_backend, raw_state, *rest = [None if isinstance(value, XenStoreError) else value
                                         for value in await self.xs.pipeline(
                                             [(W.Op.READ, W.join(key), 0) for key in keys])]
        header, ring_keys = rest[:len(HEADER_KEYS)], rest[len(HEADER_KEYS):]
        fe = self._frontend_state = XenbusState.of(raw_state)
        if fe in (XenbusState.Initialised, XenbusState.Connected):
            self._layout_seen = (header[0], header[1])
        if guess != (header[0], header[1]) or None in ring_keys:
            ring_keys = []  # guessed wrong: read once the layout is known
        if raw_backend is not None and raw_backend != self.path.encode():
            return "wait"  # staged for a warm spare: the frontend is another backend's yet
        if fe in (XenbusState.Initialised, XenbusState.Connected) and self.state == XenbusState.InitWait:
            try:
                await self._connect_and_serve(header, ring_keys, frontend_states)
            except _Disconnect as exc:
                self.abuse += exc.abuse
                log.warning("frontend disconnected", extra={"kv": {"reason": str(exc)}})
                await self._set_state(XenbusState.Closing)
                await self._set_state(XenbusState.Closed)
            return "again"
        if fe == XenbusState.Initialising and self.state == XenbusState.Closed:
            await self._publish_features()  # the frontend reconnects
        elif fe in (XenbusState.Closing, XenbusState.Closed) and self.state not in (
                XenbusState.Closing, XenbusState.Closed):
            await self._set_state(XenbusState.Closing)
            await self._set_state(XenbusState.Closed)
        elif fe == XenbusState.Unknown and self.state != XenbusState.InitWait:
            return "gone"
        return "wait"

    async def _connect_and_serve(self, header: list[bytes | None], ring_keys: list[bytes | None],
                                 frontend_states: Any) -> None:
        queues = await self._frontend_queues(header, ring_keys)
        mappings: list[Any] = []
        ports: list[Any] = []
        try:
            # Everything taken from here on is given back whatever fails (finally below).
            async def take(call: Any) -> Any:
                try:
                    return await call
                except OSError as exc:
                    return exc

            # all the rings and channels at once (requests in flight together), in order
            gt, events = self.domain.grant_table, self.domain.events
            taken = await gather([take(gt.map(self.frontend_id, refs)) for refs, _ in queues]
                                 + [take(events.bind_interdomain(self.frontend_id, port_no))
                                    for _, port_no in queues])
            mappings += [m for m in taken[:len(queues)] if not isinstance(m, OSError)]
            ports += [p for p in taken[len(queues):] if not isinstance(p, OSError)]
            failure = next((t for t in taken if isinstance(t, OSError)), None)
            if failure is not None:  # what was taken is given back below
                raise _Disconnect(f"ring map or event channel failed: {failure}", 1)
            self.rings = [BackRing(m.buffer, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE) for m in mappings]
            self._ports = ports
            assert self.vbd is not None
            if self.use_persistent:
                self.fast = FastPath(self.vbd.fd, self.vbd.sectors, self.vbd.read_only)
            self.connections += 1
            self._abuse_reason = ""
            async with trio.open_nursery() as nursery:
                # Serving before Connected is written: a frontend that sees it and replays
                # at once is answered without waiting for this side's round trip.
                for ring, port in zip(self.rings, ports):
                    nursery.start_soon(self._serve, ring, port, nursery.cancel_scope)
                # Closing and Closed are written once the rings are unmapped, outside this
                # (then cancelled) scope.
                nursery.start_soon(watch_for_close, self.xs, self.frontend_path, frontend_states,
                                   nursery.cancel_scope)
                if self.use_persistent and header[4] is not None:
                    nursery.start_soon(self._premap, header[4])
                await self._set_state(XenbusState.Connected)
                log.info("device connected", extra={"kv": {
                    "queues": len(queues), "ring_pages": len(queues[0][0]), "persistent": self.use_persistent}})
            if self._abuse_reason:
                raise _Disconnect(self._abuse_reason, 1)
        finally:
            self.rings, self._ports = [], []
            self.fast = None  # before the pages it points into go
            # Shielded: a vbd removed by the toolstack is cancelled, and the frontend's pages
            # and ports must be given back all the same.
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                for pages in self.persistent.values():
                    with contextlib.suppress(OSError):
                        await self.domain.grant_table.unmap(pages)
                self.persistent.clear()
                for mapping in mappings:
                    with contextlib.suppress(OSError):
                        await self.domain.grant_table.unmap(mapping)
                for port in ports:
                    await port.close()
        # The frontend closed (or went away): tell it, as xen-blkback does on Closing.
        await self._set_state(XenbusState.Closing)
        await self._set_state(XenbusState.Closed)

    async def _premap(self, raw_refs: bytes) -> None:
        """Map now, as persistent grants, the pages a frontend lists in ``pool-refs`` (the
        ones it will do I/O from first): one standing by with us (a warm spare) does, so
        that its first requests after a takeover are served in C with nothing to map. The
        list is copied once and checked; a page that cannot be mapped is mapped, as any,
        when a request names it."""
        try:
            grefs = list(dict.fromkeys(int(word) for word in raw_refs.split()))
            if len(grefs) > PREMAP_MAX or not all(0 <= gref < GREF_LIMIT for gref in grefs):
                raise ValueError(f"{len(grefs)} grefs, or one out of range")
        except ValueError as exc:
            self._refuse_pool_refs(str(exc))
            return
        grefs = [gref for gref in grefs if gref not in self.persistent]
        if not grefs or len(self.persistent) + len(grefs) > PERSISTENT_GRANTS_MAX:
            return
        gt = self.domain.grant_table
        try:
            with trio.CancelScope(shield=True):  # what it maps is kept track of below
                mappings = await gt.map_each(self.frontend_id, grefs)
        except OSError as exc:  # one is not granted to us: none is mapped ahead
            self._refuse_pool_refs(str(exc))
            return
        surplus = []
        for gref, mapping in zip(grefs, mappings):  # no await until each is kept track of
            if gref in self.persistent or self.fast is None:  # mapped meanwhile, or gone
                surplus.append(mapping)
                continue
            self.persistent[gref] = mapping
            self.fast.remember(gref, mapping)
            self.premapped += 1
        with trio.CancelScope(shield=True):
            for mapping in surplus:
                with contextlib.suppress(OSError):
                    await gt.unmap(mapping)

    def _refuse_pool_refs(self, reason: str) -> None:
        if self.validator is not None:
            self.validator.rejected["bad_pool_refs"] += 1
        self.refusals.warning("pool-refs refused", reason=reason)

    @staticmethod
    def _ring_key_paths(fe: str, raw_order: bytes | None,
                        raw_queues: bytes | None) -> tuple[list[str], int, int]:
        """The paths of each queue's ring grefs then event channel for a layout as the
        frontend wrote it, with the number of queues and of keys per queue; _Disconnect for
        a layout out of bounds, ValueError for one that is not numbers."""
        order = int(raw_order or b"0")
        if not 0 <= order <= MAX_RING_PAGE_ORDER:
            raise _Disconnect(f"ring-page-order {order} above {MAX_RING_PAGE_ORDER}", 1)
        count = int(raw_queues or b"1")
        if not 1 <= count <= MAX_QUEUES:
            raise _Disconnect(f"multi-queue-num-queues {count} not in 1..{MAX_QUEUES}", 1)
        wheres = [fe] if raw_queues is None else [f"{fe}/queue-{q}" for q in range(count)]
        names = ["ring-ref"] if raw_order is None else [f"ring-ref{i}" for i in range(1 << order)]
        names.append("event-channel")
        return [f"{where}/{name}" for where in wheres for name in names], len(wheres), len(names)

    async def _frontend_queues(self, header: list[bytes | None],
                               ring_keys: list[bytes | None]) -> list[tuple[list[int], int]]:
        """Each queue's ring grefs and event channel, as Linux's blkfront writes them: at the
        top level for one queue, under queue-N/ with multi-queue-num-queues; ring-ref for
        one page, ring-page-order (shared by the queues) and ring-refN for several. Every
        value is copied once, then validated. ``header``: the values of HEADER_KEYS;
        ``ring_keys``: those of the layout's ring keys if read with them, else empty."""
        raw_order, raw_queues, raw_protocol, raw_persistent = header[:4]
        try:
            paths, count, per_queue = self._ring_key_paths(self.frontend_path, raw_order, raw_queues)
            # every queue's keys in one round trip, unless they came with the header
            if ring_keys:
                self.ring_keys_read_ahead += 1
            values = ring_keys or await self.xs.read_many(paths)
            if any(v is None for v in values):
                raise _Disconnect("frontend keys unreadable: a ring-ref or event-channel is missing", 1)
            queues = []
            for q in range(count):
                mine = values[q * per_queue:(q + 1) * per_queue]
                queues.append(([int(v) for v in mine[:-1]], int(mine[-1])))  # type: ignore[arg-type]
        except ValueError as exc:
            raise _Disconnect(f"frontend keys unreadable: {exc}", 1) from None
        except XenStoreError as exc:
            raise _Disconnect(f"frontend keys unreadable: {exc}", 1) from None
        protocol = (raw_protocol or b"x86_64-abi").decode(errors="replace")
        if protocol not in ("x86_64-abi", "native"):
            raise _Disconnect(f"unsupported protocol {protocol}", 1)
        self.use_persistent = raw_persistent == b"1"
        return queues

    async def _read_or(self, path: str, default: bytes) -> bytes:
        try:
            return await self.xs.read(path)
        except XenStoreError:
            return default

    # ---- datapath --------------------------------------------------------------------
    async def _serve(self, ring: BackRing, port: Any, scope: trio.CancelScope) -> None:
        fast = self.fast
        assert self.validator is not None and self.vbd is not None
        in_thread = self.vbd.is_block_device  # a real disk may block: not on the event loop
        while True:
            if self.ring_fault is not None:
                self._make_ring_fault(ring, port)
            try:
                if fast is None:
                    raws = ring.take_requests()
                else:
                    fast.enable(not self.failing)
                    served = fast.served
                    if in_thread:
                        async with self._in_thread:  # the queues share the fast path's tables
                            raws, notify = await trio.to_thread.run_sync(fast.serve, ring)
                    else:
                        raws, notify = fast.serve(ring)
                    if notify:
                        self._notify(port)
                    if fast.served != served:
                        self.storm.note_work()
                    if not raws:
                        await port.wait()
                        await self.storm.woken(ring.unconsumed_requests() > 0)
                        continue
            except RingOverflow:
                if self.ring_fault is not None and self.ring_fault.kind == "corrupt-index":
                    self._made(self.ring_fault)
                # Reported outside the nursery, as a plain exception.
                self._abuse_reason = "ring overflow: frontend published more than the ring holds"
                scope.cancel()
                return
            if not raws:
                if ring.final_check_for_requests():
                    continue
                await port.wait()
                await self.storm.woken(ring.unconsumed_requests() > 0)
                continue
            self.storm.note_work()
            responses = await self._handle_batch(raws)
            ring.put_responses(responses)
            if ring.push_responses():
                self._notify(port)

    async def _handle_batch(self, raws: list[bytes]) -> list[bytes]:
        assert self.validator is not None and self.vbd is not None
        self.requests += len(raws)
        results: list[tuple[int, int, int]] = []   # id, operation, status
        io: list[tuple[Plan, IoRequest]] = []
        transient: list[Any] = []  # this batch's maps without persistent grants (queues overlap)
        for raw in raws:
            planned = self.validator.plan(raw)
            if isinstance(planned, Plan) and planned.indirect_grefs:
                planned = await self._load_indirect(planned, raw, transient)
            if isinstance(planned, Rejection):
                self.refusals.warning("request refused", reason=planned.reason)
                self.errors += 1
                results.append((planned.id, planned.operation, planned.status))
                continue
            if self.failing is not None and self.failing != 0:
                if self.failing > 0:
                    self.failing -= 1
                self.injected_errors += 1
                results.append((planned.id, planned.operation, Status.ERROR))
                continue
            try:
                request = await self._io_request(planned, transient)
            except OSError:
                self.errors += 1
                self.validator.rejected["bad_grant"] += 1
                results.append((planned.id, planned.operation, Status.ERROR))
                continue
            io.append((planned, request))
        await self.vbd.submit([request for _, request in io])
        for mapping in transient:  # without persistent grants: a map per request
            with contextlib.suppress(OSError):
                await self.domain.grant_table.unmap(mapping)
        for plan, request in io:
            if request.error:
                self.errors += 1
            results.append((plan.id, plan.operation, Status.ERROR if request.error else Status.OKAY))
        return [blkif.encode_response(rid, op, status) for rid, op, status in results]

    async def _load_indirect(self, plan: Plan, raw: bytes, transient: list[Any]) -> Plan | Rejection:
        assert self.validator is not None
        nr_segments = blkif.decode_request(raw).nr_segments
        pages = []
        for gref in plan.indirect_grefs:
            try:
                mapping = await self._page(gref, True, transient)
            except OSError:
                return self.validator.reject(blkif.decode_request(raw), "bad_grant")
            pages.append(bytes(mapping.buffer))  # copied once, then parsed
        return self.validator.indirect_segments(plan, pages, nr_segments)

    async def _io_request(self, plan: Plan, transient: list[Any]) -> IoRequest:
        kind = {Op.READ: IoKind.READ, Op.WRITE: IoKind.WRITE, Op.FLUSH_DISKCACHE: IoKind.FLUSH,
                Op.DISCARD: IoKind.DISCARD}[Op(plan.kind)]
        buffers = []
        for seg in plan.segments:
            mapping = await self._page(seg.gref, kind != IoKind.READ, transient)
            buffers.append(mapping.buffer[seg.offset:seg.offset + seg.length])
        return IoRequest(kind, plan.offset, plan.length, buffers)

    async def _page(self, gref: int, readonly: bool, transient: list[Any]) -> Any:
        """A frontend page: persistent grants stay mapped (LRU-bounded); without them the
        mapping goes on ``transient``, unmapped when the batch is answered."""
        cached = self.persistent.get(gref)
        if cached is not None and (readonly or not cached.readonly):
            self.persistent.move_to_end(gref)
            self.hits += 1
            return cached
        mapping = await self.domain.grant_table.map(self.frontend_id, [gref], readonly=False
                                                    if self.use_persistent else readonly)
        self.maps += 1
        if not self.use_persistent:
            transient.append(mapping)
            return mapping
        raced = self.persistent.get(gref)
        if raced is not None and raced is not cached and (readonly or not raced.readonly):
            # another queue mapped it while we waited: keep one mapping, not two
            with contextlib.suppress(OSError):
                await self.domain.grant_table.unmap(mapping)
            return raced
        # The old (read-only) mapping goes, ours comes, before any await: another queue
        # must never find the gref half replaced.
        old = self.persistent.pop(gref, None)
        if old is not None:
            self._forget(gref)
        self.persistent[gref] = mapping
        if self.fast is not None:
            self.fast.remember(gref, mapping)
        if old is not None:
            await self._unmap_persistent(old)
        while len(self.persistent) > PERSISTENT_GRANTS_MAX:
            old_gref, evicted = self.persistent.popitem(last=False)
            self._forget(old_gref)
            await self._unmap_persistent(evicted)
        return mapping

    async def _unmap_persistent(self, mapping: Any) -> None:
        """Unmap a page the fast path has forgotten, once no fast-path call that may still
        hold a pointer into it runs in a worker thread (a block device's)."""
        async with self._in_thread:
            with contextlib.suppress(OSError):
                await self.domain.grant_table.unmap(mapping)

    def _forget(self, gref: int) -> None:
        if self.fast is not None:
            self.fast.forget(gref)


class _Disconnect(Exception):
    def __init__(self, reason: str, abuse: int = 0) -> None:
        super().__init__(reason)
        self.abuse = abuse


async def serve_blkback(domain: Any, xs: XenStore, *,
                        task_status: trio.TaskStatus[dict[tuple[int, int], BlkbackDevice]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve every vbd the toolstack assigns to this domain (``backend/vbd/FE/DEVID``)."""
    await serve_devices(xs, f"/local/domain/{domain.domid}/backend/vbd", DEVICE_KEYS,
                        lambda path, fe, devid, found: BlkbackDevice(domain, xs, path, fe, devid, found),
                        task_status=task_status)


__all__ = ["BlkbackDevice", "serve_blkback"]
