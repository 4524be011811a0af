"""blkfront: a virtual block device as the guest uses it, with replay across backend restarts.

The frontend owns a pool of pages granted to the backend once (persistent grants) and a ring.
Every request stays in ``pending`` until its response has arrived: when the backend goes
away and a backend comes back (the driver domain was relaunched), the frontend connects to
it again and resubmits everything pending, in order. Callers of :meth:`read`/:meth:`write`
see a pause, never an error, and an acknowledged write is never lost.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import logging
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ringfence.frontends.blkfront.fastpath import DeviceFastPath
from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.blkif import Op, Status
from ringfence.hypervisor.io.ring import FrontRing, RingOverflow
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.hypervisor.platform import end_access_settled
from ringfence.xenbus.client import XenStore, gather, present
from ringfence.xenbus.paths import TAKEOVER_KEY, standby_dir, standby_domid
from ringfence.xenbus.state import XenbusState, refused_handshake_delay
from ringfence.xenbus.storm import NotificationStorm

log = logging.getLogger(__name__)

PAGE = 4096
RING_PAGE_ORDER = 3       # up to 8 ring pages (256 requests) a queue, as the backend allows
MAX_QUEUES = 4            # rings with an event channel each, as many as CPUs and the backend allow
POOL_PAGES = 1024         # 4 MiB in flight: a full ring (352 pages) and then some; below
                          # blkback's bound on persistent grants (1056)
SEGMENTS = blkif.MAX_SEGMENTS_PER_REQUEST
INDIRECT_SEGMENTS = 256   # 1 MiB in one request when the backend takes indirect ones
PREMAP_PAGES = 64         # the pool's first pages, all a light load uses (the free list is a
                          # stack that starts at page 0): granted to a standby link's backend
                          # beforehand (``pool-refs``), which maps them while it stands by
CLEANUP_DELAY_MAX = 0.05  # seconds a takeover's clean-up waits for the replay, at most
NOTIFY_GRACE = 1.0        # seconds responses may wait unnoticed before they are taken anyway


class BlockIOError(OSError):
    pass


# What the device's directory names: the backend, our state, and a warm spare's standby
# directory (see BlkFront._link_for).
NAMED_KEYS = ("backend-id", "backend", "state", "standby")
# The backend's keys a connection needs, read with its InitWait.
FEATURE_KEYS = ("sectors", "info", "feature-flush-cache", "feature-discard", "feature-persistent",
                "feature-max-indirect-segments", "max-ring-page-order", "multi-queue-max-queues")


async def _close_port(port: Any) -> None:
    with contextlib.suppress(OSError):
        await port.close()


async def _close_ports(ports: list[Any]) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(5):  # a detach must not leak them
        await gather([_close_port(port) for port in ports])


class _BackendMoved(Exception):
    """The backend we were connecting to was replaced (see _wait_for_backend)."""


class _BackendRefused(_BackendMoved):
    """The backend closed after its InitWait, on our keys: it acted on a Connected of ours
    left from its predecessor (keys it may not read), or judged ours bad. The handshake
    starts over from Initialising, which a closed backend waits for."""


class _BackendFailed(Exception):
    """The toolstack gave up on the backend (its driver domain hit its start limit)."""


@dataclass(frozen=True, slots=True)
class BlkfrontStatistics:
    devid: int
    backend_id: int
    state: str
    connections: int
    requests: int
    replayed: int
    in_flight: int
    errors: int
    bad_responses: int
    bytes_read: int
    bytes_written: int
    free_pages: int
    spurious_notifications: int
    queues: int               # rings (and event channels) in use
    ring_slots: int           # requests each ring holds
    max_segments: int         # pages in one request (over 11: indirect requests)
    unrevoked_grants: int     # grants a previous backend still holds mapped (XSA-396)
    standby_backend: int      # the warm spare we stand by with, connected (-1: none)
    promotions: int           # takeovers that only switched to the standby link
    signalled_takeovers: int  # of those, begun on dom0's takeover channel, before XenStore
    refused_handshakes: int   # backends that closed on our keys (the handshake started over)
    standby_links: int        # standby links begun (connected or not)
    missed_notifications: int  # responses taken after NOTIFY_GRACE without a notification


@dataclass(eq=False, slots=True)
class _Pending:
    id: int
    operation: int
    sector: int
    pages: list[int]             # pool page indexes, in order
    sectors_in_last: int = 8     # how much of the last page is used
    nr_sectors: int = 0          # discard
    descriptor: int = -1         # pool page holding the segments of an indirect request
    finished: bool = False
    done: trio.Event | None = None  # for a caller that awaits it (see _submit)
    status: int = Status.OKAY
    sent_on: int = 0             # the connection whose ring carries it (0: none yet)


@dataclass(eq=False)
class _Queue:
    """One ring and its event channel (``multi-queue-num-queues`` of them)."""
    index: int
    ring: FrontRing
    port: Any


@dataclass(eq=False)
class _Link:
    """One connection's worth of a device: the directory its keys go in (the device's own,
    or a standby directory in it that the toolstack made for a warm spare), the backend
    named there, and what was made for that backend: ring pages granted to it, channels,
    queues, the features it offered."""
    path: str
    ring_pages: Any
    backend_id: int = -1
    backend_path: str = ""
    ring_grefs: list[int] = field(default_factory=list)
    pool_grefs: list[int] = field(default_factory=list)  # a standby link's: PREMAP_PAGES of the pool
    queues: list[_Queue] = field(default_factory=list)
    loose_ports: list[Any] = field(default_factory=list)
    features: dict[str, int] = field(default_factory=dict)
    sectors: int = 0
    read_only: bool = False
    connected: bool = False   # the backend said Connected to this link's keys
    promoted: bool = False    # a standby link a takeover made the device's connection
    # a standby link's channel for dom0 (TAKEOVER_KEY): notified when the spare takes over
    takeover_port: Any = None
    # a standby link's keeper: its scope, and set once its handshake ended (either way)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    settled: trio.Event = field(default_factory=trio.Event)


class BlkFront:
    def __init__(self, domain: Any, xs: XenStore, devid: int, *, persistent: bool = True) -> None:
        self.domain, self.xs, self.devid = domain, xs, devid
        self.persistent = persistent
        self.path = f"/local/domain/{domain.domid}/device/vbd/{devid}"
        self._link: _Link | None = None     # the connection's (run() makes it)
        self._attached: _Link | None = None  # the link whose rings the fast path uses
        self._standby: _Link | None = None  # a warm spare's, while we stand by with it
        self._spare_pages: Any = None       # ring pages no link uses: a standby link's
        # A standby directory whose link ended unpromoted: not tried again until the toolstack
        # names a spare anew (a dead spare's slot, named still, was retried in a tight loop)
        self._ended_slot: str | None = None
        self.promotions = 0                 # takeovers that only switched to the standby link
        self.signalled_takeovers = 0        # of those, begun on dom0's takeover channel
        self.refused_handshakes = 0
        self.standby_links = 0
        self.missed_notifications = 0
        self._serving: trio.CancelScope | None = None  # the wait while a connection serves
        self._old_backend_dead = False  # dom0 said so: a takeover on its channel (_regrant)
        self.pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        # The pool's free pages and the NBD server's requests in flight live in C.
        self.fastpath: DeviceFastPath | None = None
        # Parked here: whoever waits for free pages or a free ring slot (both come back when
        # responses arrive) or for the next ring.
        self._room = trio.lowlevel.ParkingLot()
        self._connected = trio.Event()
        self._background: Any = None  # a nursery for what need not delay a reconnection
        self._next_queue = 0
        self._pool: Any = None
        self._pool_grefs: list[int] = []
        self._pool_backend = -1  # whom the pool is granted to
        self._unrevoked: list[int] = []  # grefs a previous backend would not give back
        self._unrevoked_rings: list[int] = []  # a left link's, never reused
        # NAMED_KEYS' values as read when the last backend was seen to go (the next
        # connection starts from them instead of reading them again), or None
        self._next_backend: tuple[bytes | None, ...] | None = None
        self._ports_to_close: list[Any] = []  # a previous connection's channels
        self.state = XenbusState.Initialising
        self.connections = self.requests = self.replayed = self.errors = self.bad_responses = 0
        self.storm = NotificationStorm()  # a rogue backend notifying in a loop (XSA-391)
        self.failed: str | None = None  # why the backend is given up on, while it is
        self._disk_sectors = 0  # the size a backend last gave: the disk's, between backends
        self.bytes_read = self.bytes_written = 0
        # Run after each batch of responses (the NBD server sends the batch's replies at once).
        self.after_responses: set[Callable[[], None]] = set()

    @property
    def size(self) -> int:
        return self.sectors * blkif.SECTOR_SIZE

    # The connection's, as its backend offered them.
    @property
    def backend_id(self) -> int:
        return self._link.backend_id if self._link is not None else -1

    @property
    def backend_path(self) -> str:
        return self._link.backend_path if self._link is not None else ""

    @property
    def sectors(self) -> int:
        # A takeover can make a link the device's before that link has read its backend's
        # size (the NBD server must not see the disk shrink to nothing meanwhile).
        return (self._link.sectors if self._link is not None else 0) or self._disk_sectors

    @property
    def read_only(self) -> bool:
        return self._link.read_only if self._link is not None else False

    @property
    def features(self) -> dict[str, int]:
        return self._link.features if self._link is not None else {}

    @property
    def _queues(self) -> list[_Queue]:
        return self._link.queues if self._link is not None else []

    def statistics(self) -> BlkfrontStatistics:
        fast = self.fastpath.counters() if self.fastpath else {}
        return BlkfrontStatistics(self.devid, self.backend_id, self.state.name, self.connections,
                                  self.requests + fast.get("requests", 0),
                                  self.replayed + fast.get("replayed", 0),
                                  len(self.pending) + (self.fastpath.in_flight if self.fastpath else 0),
                                  self.errors + fast.get("errors", 0),
                                  self.bad_responses + fast.get("bad_responses", 0),
                                  self.bytes_read + fast.get("bytes_read", 0),
                                  self.bytes_written + fast.get("bytes_written", 0),
                                  self.fastpath.free_pages if self.fastpath else 0,
                                  self.storm.spurious, len(self._queues),
                                  self._queues[0].ring.size if self._queues else 0,
                                  self.max_segments, len(self._unrevoked) + len(self._unrevoked_rings),
                                  self._standby.backend_id if self._standby is not None and self._standby.connected
                                  else -1, self.promotions, self.signalled_takeovers,
                                  self.refused_handshakes, self.standby_links, self.missed_notifications)

    # ---- connection ------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve responses, and reconnect whenever the backend starts over; stand
        by meanwhile with the warm spare the toolstack names, if it names one."""
        self._pool = await self.domain.memory.alloc_pages(POOL_PAGES)
        self.fastpath = DeviceFastPath(self._pool.buffer, POOL_PAGES)
        # Two sets of ring pages: the connection's, and a standby link's.
        self._link = _Link(self.path, await self.domain.memory.alloc_pages(MAX_QUEUES << RING_PAGE_ORDER))
        self._spare_pages = await self.domain.memory.alloc_pages(MAX_QUEUES << RING_PAGE_ORDER)
        started = False
        async with trio.open_nursery() as self._background:
            self._background.start_soon(self._keep_standby)
            while True:
                started = await self._connect_and_serve(started, task_status)

    async def _connect_and_serve(self, started: bool, task_status: trio.TaskStatus[None]) -> bool:
        """One connection: made, served until the backend starts over, taken down."""
        await self._connect()
        # What fits of the fast path's unanswered requests goes on the new rings now, before
        # the tasks below start (the backend serves us already): the read a guest waits on
        # is not queued behind their start-up. _replay does the rest.
        self._fast.replay()
        self.kick(self._fast.notify_mask)
        old_ports, self._ports_to_close = self._ports_to_close, []
        self._background.start_soon(_close_ports, old_ports)
        async with trio.open_nursery() as nursery:
            # Responses flow while the replay fills the ring: more requests may be pending
            # than the ring has slots.
            for queue in self._queues:
                nursery.start_soon(self._receive_responses, self._active, queue, nursery.cancel_scope)
            # The backend serves us already: the replay does not wait for this write.
            nursery.start_soon(self._write_state, XenbusState.Connected)
            nursery.start_soon(self._replay)
            if not started:
                await self._connected.wait()
                task_status.started()
                started = True
            with trio.CancelScope() as self._serving:
                await self._wait_backend_restart()
            self._serving = None
            nursery.cancel_scope.cancel()
        await self._disconnect()
        return started

    async def _write_state(self, state: XenbusState) -> None:
        """The device's state, and its link's where that is a standby directory."""
        self.state = state
        paths = {self.path, self._active.path}
        await self.xs.write_many([(f"{path}/state", str(int(state))) for path in sorted(paths)])

    @property
    def _active(self) -> _Link:
        assert self._link is not None, "run() makes the link"
        return self._link

    @staticmethod
    def _state_and(link: _Link, also: list[tuple[int, bytes, int]]) -> list[tuple[int, bytes, int]]:
        return [(W.Op.READ, W.join(f"{link.backend_path}/state"), 0)] + also

    async def _wait_for_backend(self, link: _Link, wanted: tuple[XenbusState, ...], events: Any,
                                also: list[tuple[int, bytes, int]] | None = None,
                                first: list[Any] | None = None) -> list[Any]:
        """Wait, on a watch of the backend's state held for the whole connection (one
        registration, not one per state waited for), until that state is one of ``wanted``;
        returns the results of the requests ``also``, sent with each read of the state (what
        the caller reads next costs no round trip of its own). ``first``: the replies to
        :meth:`_state_and` read with the watch's registration
        (:meth:`~ringfence.xenbus.client.XenStore.watch_and`), judged before any event (a
        backend waiting already is not waited for); without ``also``'s, which are then read
        with the state once it is wanted."""
        also = also or []
        replies = first
        while True:
            if replies is None:
                try:
                    await events.receive()
                except trio.EndOfChannel:
                    raise XenStoreError("EIO", "watch ended") from None
                replies = await self.xs.pipeline(self._state_and(link, also))
            raw, *results = replies
            replies = None
            state = XenbusState.of(raw)
            if state in wanted and len(results) < len(also):
                replies = await self.xs.pipeline(self._state_and(link, also))
                continue
            if state in wanted:
                return results
            if state == XenbusState.Unknown and await self._backend_moved(link):
                # That backend is gone before it ever came up (killed while starting):
                # the toolstack has pointed us at its successor.
                raise _BackendMoved
            if state == XenbusState.Closed:
                error = await self._read_or(f"{link.backend_path}/hotplug-error", b"")
                if error:
                    raise _BackendFailed(error.decode(errors="replace"))
                if XenbusState.Connected in wanted:  # closed since its InitWait, on our keys
                    raise _BackendRefused

    async def _wait_for_backend_change(self, link: _Link, seen: XenbusState, events: Any = None) -> None:
        """Until the backend's state is not ``seen`` (judged at once, on the watch's first
        event), or the toolstack named another backend: both read in one round trip.
        ``events``: those of a watch of the state held already, whose last read was
        ``seen`` (judged on its next event)."""
        async with contextlib.AsyncExitStack() as stack:
            if events is None:
                events = await stack.enter_async_context(self.xs.watch(f"{link.backend_path}/state"))
            async for _ in events:
                # (An error reads as no state, and as not moved: a backend may make its
                # state unreadable to us, which ends the wait as its going would.)
                state, named = await self.xs.pipeline(
                    self._state_and(link, [(W.Op.READ, W.join(f"{self._named_in(link)}/backend"), 0)]))
                if XenbusState.of(state) != seen or (isinstance(named, bytes) and named.decode(
                        errors="replace") != link.backend_path):
                    return

    def _named_in(self, link: _Link) -> str:
        """Where the backend of ``link`` is named: in the device's directory for the
        connection's link, in its own for a standby link."""
        return self.path if link is self._link or link.promoted else link.path

    async def _backend_moved(self, link: _Link) -> bool:
        """Whether the toolstack named another backend (see _named_in)."""
        try:
            return (await self.xs.read(f"{self._named_in(link)}/backend")).decode() != link.backend_path
        except XenStoreError:
            return False

    async def _connect(self) -> None:
        refusals = 0
        while True:
            known, self._next_backend = self._next_backend, None
            old_backend_dead, self._old_backend_dead = self._old_backend_dead, False
            if known is None:
                known = tuple(present(await self.xs.pipeline(  # type: ignore[assignment]
                    [(W.Op.READ, W.join(f"{self.path}/{key}"), 0) for key in NAMED_KEYS])))
            link = self._link_for(known)
            if link.promoted and not link.settled.is_set():
                await link.settled.wait()  # its handshake under way: not begun again
            try:
                return await self._try_connect(link, known, old_backend_dead)
            except (_BackendMoved, _BackendFailed) as exc:
                await self._close_queues(link)
                link.connected = False
                if isinstance(exc, _BackendRefused):
                    refusals += 1
                    self.refused_handshakes += 1
                    log.warning("backend closed during the handshake; starting it over", extra={
                        "kv": {"devid": self.devid, "backend": link.backend_id, "in_a_row": refusals}})
                    await trio.sleep(refused_handshake_delay(refusals))
                    continue
                if isinstance(exc, _BackendMoved):
                    log.info("backend moved while connecting; following it")
                    continue
                await self._fail_until_replaced(str(exc))

    def _link_for(self, known: tuple[bytes | None, ...]) -> _Link:
        """The link a connection to the backend ``known`` names (NAMED_KEYS' values) is
        made on: the directory the toolstack staged for it if it was a warm spare
        (``standby`` names ``standby-<its domid>``), else the device's own. The standby
        link is taken over as it is (a takeover then only switches: ``promotions``)."""
        raw_id, _, _, pointer = known
        slot = standby_dir(self.path, raw_id.decode(errors="replace")) if raw_id else None
        if pointer is None or slot is None or pointer.decode(errors="replace") != slot:
            slot = None
        standby, active = self._standby, self._active
        if slot is not None and standby is not None and standby.path == slot:
            return self._promote(standby)
        target = slot or self.path
        if active.path != target:
            if active.path != self.path:  # a standby directory served the last connection
                self._background.start_soon(self._remove_quietly, active.path)
            active.path, active.connected = target, False
        return active

    async def _remove_quietly(self, path: str) -> None:
        with contextlib.suppress(XenStoreError):
            await self.xs.rm(path)

    async def _fail_until_replaced(self, reason: str) -> None:
        """No backend will come: what is pending fails with EIO (so does anything new),
        until the toolstack writes a fresh backend for this device."""
        self.failed = reason
        log.error("backend failed; I/O fails until it is replaced", extra={"kv": {
            "devid": self.devid, "reason": reason, "failed_requests": len(self.pending)}})
        failed, self.pending = list(self.pending.values()), {}
        self.errors += len(failed)
        for pending in failed:
            self._complete(pending, Status.ERROR)
        self._fast.set_failed(True)
        self._after_completions()
        self._connected.set()  # wakes putters waiting for a ring: they fail now
        self._room.unpark_all()
        failed_backend = self.backend_path
        async with self.xs.watch(f"{self.path}/backend") as events:
            async for _ in events:
                current = (await self._read_or(f"{self.path}/backend", b"")).decode()
                if current and (current != failed_backend or not await self.xs.exists(
                        f"{failed_backend}/hotplug-error")):
                    log.info("backend replaced; reconnecting", extra={"kv": {"backend": current}})
                    self.failed = None
                    self._fast.set_failed(False)
                    self._connected = trio.Event()
                    return

    @staticmethod
    def _named_backend(where: str, raw_id: bytes | None, raw_backend: bytes | None) -> tuple[int, str]:
        """The backend a directory names (its ``backend-id`` and ``backend``, as read)."""
        if raw_id is None or raw_backend is None:
            raise XenStoreError("ENOENT", f"{where}: no backend-id or backend")
        return int(raw_id), raw_backend.decode()

    async def _try_connect(self, link: _Link, known: tuple[bytes | None, ...],
                           old_backend_dead: bool = False) -> None:
        raw_id, raw_backend, raw_state, _ = known
        backend_id, backend_path = self._named_backend(self.path, raw_id, raw_backend)
        if not link.connected:  # a standby link taken over connected is used as it is
            await self._close_queues(link)  # what a handshake cut short had made
            # Initialising, unless a takeover wrote it already (switch_backends)
            await self._handshake(link, backend_id, backend_path, pool=True, initialising=(
                link.path != self.path or XenbusState.of(raw_state) != XenbusState.Initialising))
        elif self._attached is link:
            return  # switched on dom0's word already (_switch_now)
        else:
            if self._answered_unasked(link):
                # A standby backend that answered on rings no request was ever put on: it
                # would complete our replayed requests unseen. Given up on, as a backend
                # that keeps our pages mapped is, until the toolstack replaces it.
                self.bad_responses += 1
                raise _BackendFailed(f"standby backend {link.backend_id} answered before any request")
            await self._regrant(link, link.backend_id, pool=True, old_backend_dead=old_backend_dead)
        self._attach(link)

    @staticmethod
    def _answered_unasked(link: _Link) -> bool:
        return any(queue.ring.unconsumed_responses() for queue in link.queues)

    def _attach(self, link: _Link) -> None:
        """The fast path puts requests on ``link``'s rings from now on, as a new connection
        (what it had on others' rings is replayed)."""
        self.connections += 1
        self._attached = link
        self._fast.attach([queue.ring.c_ring for queue in link.queues], self.connections,
                          max_segments=self.max_segments, size=self.size,
                          read_only=self.read_only, handle=self.devid & 0xFFFF)

    def _detach(self, link: _Link) -> None:
        if self._attached is link:
            self._attached = None
            self._fast.detach()

    async def _handshake(self, link: _Link, backend_id: int, backend_path: str, *, pool: bool,
                         initialising: bool = True,
                         then: Callable[[Any], Awaitable[None]] | None = None) -> None:
        """XenBus with the backend ``backend_path`` in ``link``'s directory, until it says
        Connected: our channels, ring grants and keys (and the pool's grants, with
        ``pool``); Initialising first unless ``initialising`` is False. ``then(events)``
        runs once connected, on the handshake's watch of the backend's state (kept, not
        registered again)."""
        link.connected = False
        link.backend_path = backend_path
        if link is self._link:
            self.state = XenbusState.Initialising
        writes = [(W.Op.WRITE, W.write_payload(f"{link.path}/state", str(int(XenbusState.Initialising))), 0)
                  ] if initialising else []
        await self._regrant(link, backend_id, pool=pool)  # while the backend starts up
        log.debug(f"waiting for backend {link.backend_path} id={backend_id}")
        async with contextlib.AsyncExitStack() as stack:
            # Our channels (while the backend starts up: one per queue we would like; the
            # backend may take fewer, the rest are closed) and the watch, together.
            async def make_channels() -> None:
                link.loose_ports = await self._alloc_channels(link, max(1, min(MAX_QUEUES, os.cpu_count() or 1)))

            # The backend's keys and our own directory come with the state that says they
            # are there: a reconnection after a crash waits on each round trip. Not with
            # the watch's registration: the backend we are sent to after a crash, or a warm
            # spare just started, is starting up then and has none of them yet.
            also = [(W.Op.READ, W.join(f"{link.backend_path}/{k}"), 0) for k in FEATURE_KEYS
                    ] + [(W.Op.DIRECTORY, W.join(link.path), 0)]
            _, (backend_states, first), _ = await gather([
                make_channels(), stack.enter_async_context(
                    self.xs.watch_and(f"{link.backend_path}/state", self._state_and(link, []))),
                self.xs.pipeline(writes)])
            replies = await self._wait_for_backend(link, (XenbusState.InitWait,), backend_states, also, first)
            await self._initialise(link, replies)
            log.debug("initialised; waiting for backend to connect")
            await self._wait_for_backend(link, (XenbusState.Connected,), backend_states)
            link.connected = True
            if then is not None:
                await then(backend_states)

    async def _alloc_channels(self, link: _Link, count: int) -> list[Any]:
        """``count`` unbound channels for the backend, in one round trip: each a port, or
        the OSError that refused it (the backend's domain is gone)."""
        async def channel() -> Any:
            try:
                return await self.domain.events.alloc_unbound(link.backend_id)
            except OSError as exc:
                return exc
        return await gather([channel() for _ in range(count)])

    async def _initialise(self, link: _Link, replies: list[Any]) -> None:
        """The backend waits for us: take its features (``replies``: FEATURE_KEYS, then our
        directory), make our rings, write their keys and Initialised. The channels made
        while it started up are used; those left over are closed."""
        *read, listing = present(replies)
        values = dict(zip(FEATURE_KEYS, read))
        mine = W.strings(listing or b"")
        if values["sectors"] is None:
            raise XenStoreError("ENOENT", f"{link.backend_path}/sectors")
        link.sectors = self._disk_sectors = int(values.pop("sectors"))  # type: ignore[arg-type]
        link.read_only = int(values.pop("info") or b"0") & 4 != 0
        link.features = {key: int(value or b"0") for key, value in values.items()}
        order = max(0, min(RING_PAGE_ORDER, link.features["max-ring-page-order"]))
        count = max(1, min(link.features["multi-queue-max-queues"], MAX_QUEUES, os.cpu_count() or 1))
        try:
            ports = link.loose_ports[:count]
            if len(ports) < count or any(isinstance(port, OSError) for port in ports):
                # made too few early, or the backend's domain was not there yet: now
                await self._close_loose_ports(link)
                link.loose_ports = ports = await self._alloc_channels(link, count)
            for index, port in enumerate(ports):
                if isinstance(port, OSError):
                    continue
                pages = link.ring_pages.buffer[(index << order) * PAGE:((index + 1) << order) * PAGE]
                link.queues.append(_Queue(index, FrontRing(pages, blkif.REQUEST_SIZE,
                                                           blkif.RESPONSE_SIZE), port))
            link.loose_ports = [port for port in link.loose_ports if port not in ports]
            await self._close_loose_ports(link)
            failed = [port for port in ports if isinstance(port, OSError)]
            if failed:
                raise failed[0]  # the channels made are closed by _connect
        except OSError:
            # The backend's domain died after it announced InitWait: wait for the toolstack
            # to move the device or give up on it, then start over.
            await self._wait_for_backend_change(link, XenbusState.InitWait)
            raise _BackendMoved from None
        # The ring keys of a previous connection go first: a bigger ring's or more queues'
        # would be read instead of ours, and nodes made then keep the permissions of the
        # backend of then (created anew, they take the parent's, which the toolstack set for
        # this backend). Removals, keys, then Initialised last, in one round trip: the daemon
        # applies them in order, so a backend that sees Initialised reads our keys only.
        stale = [name for name in mine if name.startswith(("ring-ref", "queue-")) or name in (
            "ring-page-order", "multi-queue-num-queues", "event-channel", "pool-refs")]
        writes = self._queue_keys(link, order, count) + [
            (f"{link.path}/protocol", "x86_64-abi"),
            (f"{link.path}/feature-persistent", "1" if self.persistent else "0"),
            # we stand by with a warm spare the toolstack stages for us (_keep_standby)
            (f"{link.path}/feature-standby", "1"),
            *([(f"{link.path}/{TAKEOVER_KEY}", str(link.takeover_port.port))] if link.takeover_port else []),
            *([(f"{link.path}/pool-refs", " ".join(map(str, link.pool_grefs)))] if link.pool_grefs else []),
            (f"{link.path}/state", str(int(XenbusState.Initialised)))]
        present(await self.xs.pipeline(  # a stale key already gone is no error
            [(W.Op.RM, W.join(f"{link.path}/{name}"), 0) for name in stale]
            + [(W.Op.WRITE, W.write_payload(path, value), 0) for path, value in writes]))
        if link is self._link:
            self.state = XenbusState.Initialised

    def _queue_keys(self, link: _Link, order: int, count: int) -> list[tuple[str, str]]:
        """As Linux's blkfront names them: one ring page by ring-ref, several by
        ring-page-order and ring-ref0..N-1; with more than one queue, each queue's under
        queue-N/ (ring-page-order stays shared)."""
        keys = [(f"{link.path}/ring-page-order", str(order))] if order else []
        if count > 1:
            keys.append((f"{link.path}/multi-queue-num-queues", str(count)))
        for queue in link.queues:
            where = f"{link.path}/queue-{queue.index}" if count > 1 else link.path
            first = queue.index << order
            if order == 0:
                keys.append((f"{where}/ring-ref", str(link.ring_grefs[first])))
            else:
                keys += [(f"{where}/ring-ref{i}", str(link.ring_grefs[first + i])) for i in range(1 << order)]
            keys.append((f"{where}/event-channel", str(queue.port.port)))
        return keys

    async def _replay(self) -> None:
        """Everything not answered by the previous backend goes again before anything new
        (Python's requests in order; the fast path's went first, what fitted): then the
        device counts as connected."""
        if self.pending:
            self.replayed += len(self.pending)
            log.info("replaying requests", extra={"kv": {"count": len(self.pending)}})
            for pending in sorted(self.pending.values(), key=lambda p: p.id):
                await self._put(pending, replaying=True)
        fast = self._fast
        if fast.in_flight:
            log.info("replaying nbd requests", extra={"kv": {"count": fast.in_flight}})
        while fast.replay():
            self.kick(fast.notify_mask)
            await self._room.park()
        self.kick(fast.notify_mask)
        fast.open()
        self._connected.set()
        log.info("vbd connected", extra={"kv": {"devid": self.devid, "backend": self.backend_id,
                                               "sectors": self.sectors}})

    async def _end_grants(self, grefs: list[int]) -> None:
        """End these grants (one atomic try-end each, XSA-396): a page the old backend still
        has mapped is never handed to the new one nor reused for I/O. The device is given
        up on instead (as Linux's blkfront does), until the toolstack replaces the backend
        again; the grants refused are retried then, and only they."""
        with trio.CancelScope(shield=True):  # grants half ended would be lost track of
            self._unrevoked = await end_access_settled(self.domain.grant_table, grefs + self._unrevoked)
        if self._unrevoked:
            raise _BackendFailed(f"{len(self._unrevoked)} granted pages are still mapped by "
                                 f"backend {self._pool_backend}: not reused")

    async def _end_grants_of_the_dead(self, grefs: list[int]) -> None:
        with trio.CancelScope(shield=True):
            await self._after_replay()
            left = await end_access_settled(self.domain.grant_table, grefs)
        if left:  # never reused for another backend: the next change of backend fails on them
            self._unrevoked += left
            log.warning("grants of a dead backend still mapped", extra={"kv": {
                "devid": self.devid, "grants": len(left)}})

    async def _regrant(self, link: _Link, backend_id: int, *, pool: bool,
                       old_backend_dead: bool = False) -> None:
        """Grant ``link``'s ring pages to ``backend_id`` where they are granted to another.
        With ``pool`` the pool goes to it too (the device's connection); without, a standby
        link's backend gets the pool's first PREMAP_PAGES beside the connection's backend,
        to map them while it stands by (it has the disk open already: the pages give it
        nothing it could not read or write anyway), and a takeover brings those along.

        The old grants end first, all or none; or beside the new connection once dom0 has
        said that the old backend's domain is dead (``old_backend_dead``: every process of
        its sandbox has exited, so nothing can touch our pages through those grants any
        more, and the hypervisor drops them as it tears the domain down)."""
        if old_backend_dead:
            self._regrant_after_death(link, backend_id, pool=pool)
            return
        rings, moving, old = self._grants_to_end(link, backend_id, pool)
        await self._end_grants(old)
        self._grant(link, backend_id, rings=rings, moving=moving, pool=pool)

    def _regrant_after_death(self, link: _Link, backend_id: int, *, pool: bool) -> None:
        """:meth:`_regrant` once dom0 said the old backend is dead: no wait."""
        rings, moving, old = self._grants_to_end(link, backend_id, pool)
        self._background.start_soon(self._end_grants_of_the_dead, old)
        self._grant(link, backend_id, rings=rings, moving=moving, pool=pool)

    def _grants_to_end(self, link: _Link, backend_id: int, pool: bool) -> tuple[bool, bool, list[int]]:
        """Whether the ring pages and the pool go to another backend, and the grants that
        end then (forgotten here)."""
        rings = backend_id != link.backend_id or not link.ring_grefs
        moving = pool and backend_id != self._pool_backend
        old = (link.ring_grefs + link.pool_grefs if rings else []) + (self._pool_grefs if moving else [])
        if rings:
            link.ring_grefs, link.pool_grefs = [], []
        if moving:
            self._pool_grefs = []
        return rings, moving, old

    def _grant(self, link: _Link, backend_id: int, *, rings: bool, moving: bool, pool: bool) -> None:
        gt, frames = self.domain.grant_table, self._pool.frames
        if rings:
            link.backend_id = backend_id
            link.ring_grefs = gt.grant_access_many(backend_id, link.ring_pages.frames)
            if not pool:
                link.pool_grefs = gt.grant_access_many(backend_id, frames[:PREMAP_PAGES])
        if moving:
            early, link.pool_grefs = link.pool_grefs, []
            self._pool_backend = backend_id
            self._pool_grefs = early + gt.grant_access_many(backend_id, frames[len(early):])
            self._fast.set_grefs(self._pool_grefs)

    async def _read_or(self, path: str, default: bytes) -> bytes:
        try:
            return await self.xs.read(path)
        except XenStoreError:
            return default

    async def _wait_backend_restart(self) -> None:
        """Return when the backend is no longer connected to us (it closed or restarted),
        with what our directory names as the backend now (``_next_backend``)."""
        async with self.xs.watch(f"{self.backend_path}/state") as events:
            async for _ in events:
                raw_state, *named = [  # one round trip; what cannot be read is None
                    None if isinstance(value, XenStoreError) else value
                    for value in await self.xs.pipeline(self._state_and(self._active, [
                        (W.Op.READ, W.join(f"{self.path}/{key}"), 0) for key in NAMED_KEYS]))]
                if XenbusState.of(raw_state) != XenbusState.Connected:
                    self._next_backend = tuple(named)
                    log.warning("backend went away; will reconnect and replay",
                                extra={"kv": {"pending": len(self.pending)}})
                    return

    async def _disconnect(self) -> None:
        if self._connected.is_set():  # an unset one stays: its waiters wake on the next connect
            self._connected = trio.Event()
        link = self._active
        queues, link.queues = link.queues, []
        link.connected = False
        self._detach(link)  # not the link a takeover switched to already
        # The old channels close once the next connection is made, not before it nor beside
        # it (the hypervisor answers a domain's calls in order: the new channels would wait).
        self._ports_to_close += [queue.port for queue in queues]
        self._room.unpark_all()  # putters waiting for ring space wait for the next ring

    async def _close_queues(self, link: _Link) -> None:
        queues, link.queues = link.queues, []
        self._detach(link)
        await gather([_close_port(queue.port) for queue in queues])
        await self._close_loose_ports(link)

    @staticmethod
    async def _close_loose_ports(link: _Link) -> None:
        """Channels made for a connection and not (or not yet) given to a queue."""
        loose, link.loose_ports = link.loose_ports, []
        await gather([_close_port(port) for port in loose if not isinstance(port, OSError)])

    # ---- standing by with a warm spare -----------------------------------------------
    async def _keep_standby(self) -> None:
        """Stand by with the spare the toolstack names in ``standby`` (a directory of this
        device's, ``standby-N``, whose ``backend`` is the spare's): connected beforehand
        over rings of its own, so that a takeover only switches links. Nothing of the
        guest's data is granted to the spare before then: the pool's grants move at the
        switch."""
        try:
            async with self.xs.watch(f"{self.path}/standby") as events:
                async for _ in events:
                    await self._consider_standby(named_anew=True)
        except XenStoreError as exc:  # no standby links then: takeovers make a handshake
            log.warning("cannot stand by", extra={"kv": {"devid": self.devid, "error": str(exc)}})

    async def _consider_standby(self, *, named_anew: bool = False) -> None:
        """Start standing by with the spare ``standby`` names, if we do not already (and
        have ring pages for it); let go of one it no longer names. ``named_anew``: the
        toolstack wrote ``standby`` (its watch fired), so a slot whose link ended is tried
        again; otherwise (a link's pages came back) it is not."""
        if named_anew:
            self._ended_slot = None
        slot = (await self._read_or(f"{self.path}/standby", b"")).decode(errors="replace")
        standby = self._standby
        if standby is not None:
            if standby.path == slot:
                return
            self._standby = None
            standby.scope.cancel()  # its keeper tears it down
        if (standby_domid(self.path, slot) is None or slot == self._active.path
                or self._spare_pages is None or slot == self._ended_slot):
            return
        link = self._standby = _Link(slot, self._spare_pages)
        self._spare_pages = None
        self.standby_links += 1
        self._background.start_soon(self._stand_by, link)

    async def _stand_by(self, link: _Link) -> None:
        with link.scope:
            try:
                link.takeover_port, named = await gather([self._takeover_channel(), self.xs.pipeline(
                    [(W.Op.READ, W.join(f"{link.path}/{key}"), 0) for key in ("backend-id", "backend")])])

                async def hold(backend_states: Any) -> None:
                    link.settled.set()
                    log.info("standing by", extra={"kv": {"devid": self.devid, "backend": link.backend_id}})
                    async with trio.open_nursery() as nursery:
                        if link.takeover_port is not None:
                            nursery.start_soon(self._await_takeover, link)
                        if not link.promoted:  # until the spare's backend leaves Connected
                            await self._wait_for_backend_change(link, XenbusState.Connected, backend_states)
                        nursery.cancel_scope.cancel()

                await self._handshake(link, *self._named_backend(link.path, *present(named)),
                                      pool=False, then=hold)
            except (XenStoreError, OSError, ValueError, _BackendMoved, _BackendFailed) as exc:
                log.info("standby link ended", extra={"kv": {"devid": self.devid, "reason": str(exc)}})
        link.settled.set()
        port, link.takeover_port = link.takeover_port, None
        if port is not None:
            with trio.CancelScope(shield=True):
                await _close_port(port)
        if link.promoted:
            return  # the device's connection now (or being made on it)
        self._ended_slot = link.path
        if self._standby is link:
            self._standby = None
        with trio.CancelScope(shield=True):
            await self._close_queues(link)
        await self._retire_pages(link)

    async def _takeover_channel(self) -> Any:
        """A channel for dom0 on which dom0 (the hypervisor, then the toolstack) says that
        the spare takes over; None if none can be had (takeovers then wait for XenStore to
        say so)."""
        try:
            return await self.domain.events.alloc_unbound(0)
        except OSError as exc:
            log.warning("no takeover channel", extra={"kv": {"devid": self.devid, "error": str(exc)}})
            return None

    async def _await_takeover(self, link: _Link) -> None:
        """``link``'s takeover channel is notified once every process of the driver domain
        we are connected to has exited: by the hypervisor the moment it sees it (a death
        notice dom0 asked for), and by the toolstack once its supervisor has. The device
        switches to the standby link at once, without waiting for the toolstack's switch in
        XenStore (which names the spare's backend, and follows), nor for the hypervisor to
        drop the dead domain's mappings before the spare gets the pool (_regrant). Only dom0
        can bind the channel, so no other domain can move us; a notification that finds us
        not serving (reconnecting already) is left to the XenStore path. The second of the
        two is never read: the link has switched, and its keeper closes the channel."""
        await link.takeover_port.wait()
        if self._standby is not link or not link.connected or self._serving is None:
            return
        self._next_backend = (str(link.backend_id).encode(), link.backend_path.encode(), None,
                              link.path.encode())
        self._old_backend_dead = True
        self.signalled_takeovers += 1
        self._switch_now(link)  # the log line after it: the replay does not wait for a write
        log.warning("backend went away (dom0 says: takeover); switching and replaying",
                    extra={"kv": {"devid": self.devid, "pending": len(self.pending)}})
        self._serving.cancel()

    def _switch_now(self, link: _Link) -> None:
        """On dom0's word, before anything else runs: the fast path puts its unanswered
        requests (what fits) on the spare's rings and kicks them, so that the spare serves
        them while this connection is taken down and ``link`` promoted (_connect then finds
        it switched to). Python's own requests wait for that and are replayed by _replay.
        Under load, that Python is what a takeover's first read waited for."""
        if self._answered_unasked(link):
            return  # _try_connect gives the spare up
        if self._connected.is_set():
            self._connected = trio.Event()  # Python's requests go on no ring until _replay
        self._regrant_after_death(link, link.backend_id, pool=True)
        self._attach(link)
        self._fast.replay()
        self.kick(self._fast.notify_mask)

    def _promote(self, standby: _Link) -> _Link:
        """A takeover by the spare we stand by with: its link becomes the connection's (a
        handshake under way finishes first: see _connect), the one before is retired."""
        self._standby = None
        standby.promoted = True
        if standby.connected:
            standby.scope.cancel()  # its keeper only held it
        old, self._link = self._active, standby
        self.promotions += 1
        self._background.start_soon(self._retire, old)
        return standby

    async def _retire(self, link: _Link) -> None:
        """A link a takeover left behind: its channels close, its directory goes if it was
        a standby one, and its ring pages serve the next standby once its grants ended."""
        self._ports_to_close += [queue.port for queue in link.queues] + [
            port for port in link.loose_ports if not isinstance(port, OSError)]
        link.queues, link.loose_ports = [], []
        await self._after_replay()
        if link.path != self.path:
            await self._remove_quietly(link.path)
        await self._retire_pages(link)

    async def _after_replay(self) -> None:
        """Until the connection being made has replayed (or for a moment at most): the
        clean-up after a takeover waits, so that the replay does not wait behind it."""
        with trio.move_on_after(CLEANUP_DELAY_MAX):
            await self._connected.wait()

    async def _retire_pages(self, link: _Link) -> None:
        # Not shielded: a device going away does not wait for a spare to let go.
        pool = set(link.pool_grefs)
        left = await end_access_settled(self.domain.grant_table, link.ring_grefs + link.pool_grefs)
        link.ring_grefs, link.pool_grefs = [], []
        if left:
            # The ring pages are never reused. The pool's first pages go on serving I/O:
            # what a backend that keeps them mapped could see or change there, it can in
            # the disk it has open already.
            self._unrevoked_rings += left
            log.warning("pages still mapped by a backend: no more standby links", extra={"kv": {
                "devid": self.devid, "ring_grants": sum(g not in pool for g in left),
                "pool_grants": sum(g in pool for g in left)}})
            return
        self._spare_pages = link.ring_pages
        await self._consider_standby()  # a spare named meanwhile

    def _queue_with_room(self) -> _Queue | None:
        """The next queue, in turn, that has a free slot."""
        queues = self._queues
        for _ in range(len(queues)):
            self._next_queue = (self._next_queue + 1) % len(queues)
            queue = queues[self._next_queue]
            if queue.ring.free_requests():
                return queue
        return None

    async def _receive_responses(self, link: _Link, queue: _Queue, scope: trio.CancelScope) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._look_for_lost_notifications, link, queue, scope)
            # after a switch (_switch_now) queue.index names another ring
            while self._attached is link:
                if not self._take_responses(queue, scope):
                    await queue.port.wait()
                    await self.storm.woken(queue.ring.unconsumed_responses() > 0)
            nursery.cancel_scope.cancel()

    async def _look_for_lost_notifications(self, link: _Link, queue: _Queue, scope: trio.CancelScope) -> None:
        """A notification the backend owed may be lost (a broken backend, a dropped event):
        responses left on the ring for NOTIFY_GRACE with none taken meanwhile are taken as
        the notification would have had them taken. A lost one costs the guest a delay,
        never a hang, and the hot path nothing (one look a second)."""
        taken = -1
        while self._attached is link:
            await trio.sleep(NOTIFY_GRACE)
            before, taken = taken, queue.ring.statistics().responses
            if taken == before and queue.ring.unconsumed_responses() and self._take_responses(queue, scope):
                self.missed_notifications += 1

    def _take_responses(self, queue: _Queue, scope: trio.CancelScope) -> bool:
        """Complete what the backend answered on ``queue``'s ring (the NBD server's requests
        are answered in C); False if it answered nothing, or overflowed the ring (the
        connection then ends: ``scope`` is cancelled)."""
        try:
            responses = self._fast.complete(queue.index)
        except RingOverflow:
            self.bad_responses += 1
            log.error("backend overflowed the ring; reconnecting")
            scope.cancel()
            return False
        if responses is None:
            return False
        self.storm.note_work()
        for raw in responses:
            rid, operation, status = blkif.decode_response(raw)
            pending = self.pending.get(rid)
            if pending is None:  # an id we never sent, or one answered twice: nothing
                self.bad_responses += 1
                continue
            if operation not in (pending.operation, Op.INDIRECT):
                # ours, answered as another operation (corrupted on the ring, or a broken
                # backend): failed, whatever the status says, never left waiting
                self.bad_responses += 1
                status = Status.ERROR
            del self.pending[rid]
            self._complete(pending, status)
        self._after_completions()
        if self._room:
            self._room.unpark_all()
        return True

    def _after_completions(self) -> None:
        for hook in list(self.after_responses):
            hook()

    @staticmethod
    def _complete(pending: _Pending, status: int) -> None:
        pending.status = status
        pending.finished = True
        if pending.done is not None:
            pending.done.set()

    # ---- requests --------------------------------------------------------------------
    async def _put(self, pending: _Pending, *, replaying: bool = False) -> None:
        while True:
            if self.failed is not None and not replaying:
                self._complete(pending, Status.ERROR)
                self._after_completions()
                return
            if pending.finished or pending.sent_on == self.connections:
                return  # answered, or already replayed onto this ring
            if not self._queues or not (replaying or self._connected.is_set()):
                await self._connected.wait()
                continue
            queue = self._queue_with_room()
            if queue is not None:
                break
            await self._room.park()
        self._send(queue, pending)

    def _send(self, queue: _Queue, pending: _Pending) -> None:
        queue.ring.put_request_buffer(self._encode(pending), 1)  # the caller checked for room
        pending.sent_on = self.connections
        if queue.ring.push_requests():
            queue.port.notify()

    @property
    def max_segments(self) -> int:
        """Pages in one request: 11, or up to 256 with the backend's indirect requests."""
        offered = self.features.get("feature-max-indirect-segments", 0)
        return min(offered, INDIRECT_SEGMENTS) if offered > SEGMENTS else SEGMENTS

    def _encode(self, p: _Pending) -> bytes:
        if p.descriptor >= 0:
            # The segments go in a page of their own, granted like the data (a backend reads
            # it once, then validates it: blkback's _load_indirect).
            grefs, last = self._pool_grefs, len(p.pages) - 1
            segments = b"".join(blkif.SEGMENT.pack(grefs[page], 0, (p.sectors_in_last if i == last else 8) - 1)
                                for i, page in enumerate(p.pages))
            view = self._pool.buffer
            view[p.descriptor * PAGE:(p.descriptor + 1) * PAGE] = segments.ljust(PAGE, b"\0")
            return blkif.INDIRECT.pack(Op.INDIRECT, p.operation, len(p.pages), p.id, p.sector,
                                       self.devid & 0xFFFF, grefs[p.descriptor],
                                       *[0] * 7).ljust(blkif.REQUEST_SIZE, b"\0")
        if p.operation == Op.DISCARD:
            return blkif.encode_request(blkif.Request(Op.DISCARD, 0, self.devid & 0xFFFF, p.id,
                                                      p.sector, nr_sectors=p.nr_sectors))
        grefs = self._pool_grefs
        return blkif.encode_page_request(p.operation, self.devid & 0xFFFF, p.id, p.sector,
                                         [grefs[page] for page in p.pages], p.sectors_in_last)

    async def _pages(self, count: int) -> list[int]:
        while (pages := self._fast.take_pages(count)) is None:
            await self._room.park()
        return pages

    def _new_pending(self, operation: int, sector: int, pages: list[int], sectors_in_last: int = 8,
                     nr_sectors: int = 0, done: trio.Event | None = None) -> _Pending:
        """A request for these pages; more than 11 go indirect, their last page holding the
        segments (the caller took one page more for it)."""
        descriptor = pages.pop() if len(pages) > SEGMENTS else -1
        return _Pending(next(self._ids), operation, sector, pages, sectors_in_last, nr_sectors,
                        descriptor, done=done)

    def _pages_for(self, size: int) -> int:
        count = -(-size // PAGE)
        return count + 1 if count > SEGMENTS else count

    async def _submit(self, operation: int, sector: int, pages: list[int], sectors_in_last: int = 8,
                      nr_sectors: int = 0) -> None:
        if self.failed is not None:
            self.errors += 1
            raise BlockIOError(5, f"{Op(operation).name}: the backend failed ({self.failed})")
        done = trio.Event()
        pending = self._new_pending(operation, sector, list(pages), sectors_in_last, nr_sectors, done)
        self.pending[pending.id] = pending
        self.requests += 1
        await self._put(pending)
        await done.wait()
        if pending.status != Status.OKAY:
            self.errors += 1
            raise BlockIOError(5, f"{Op(operation).name} at sector {sector}: backend status {pending.status}")

    def _check(self, offset: int, length: int) -> None:
        if offset % 512 or length % 512 or offset < 0 or offset + length > self.size:
            raise ValueError(f"I/O at {offset}+{length} not sector-aligned or past {self.size}")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        step = self.max_segments * PAGE
        starts = range(offset, offset + length, step)
        chunks = [b""] * len(starts)
        await self._together([functools.partial(self._read_chunk, chunks, i, start,
                                                min(step, offset + length - start))
                              for i, start in enumerate(starts)])
        self.bytes_read += length
        return b"".join(chunks)

    @staticmethod
    async def _together(calls: list[Callable[[], Awaitable[None]]]) -> None:
        """The pieces of a large request go to the ring together; the first that failed
        is raised as itself (callers catch OSError), once all are done."""
        if len(calls) == 1:
            return await calls[0]()
        failures: list[BaseException] = []

        async def one(call: Callable[[], Awaitable[None]]) -> None:
            try:
                await call()
            except BlockIOError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(one, call)
        if failures:
            raise failures[0]

    async def _read_chunk(self, chunks: list[bytes], index: int, offset: int, size: int) -> None:
        pages = await self._pages(self._pages_for(size))
        data = pages[:-(-size // PAGE)]
        self._zero_tail(data[-1], size)
        try:
            await self._submit(Op.READ, offset // 512, pages, (size - (len(data) - 1) * PAGE) // 512)
            chunks[index] = self._gather(data, size)
        finally:
            self._release(pages)

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise BlockIOError(30, "read-only disk")
        self._check(offset, len(data))
        step = self.max_segments * PAGE
        await self._together([functools.partial(self._write_chunk, offset + start, data[start:start + step])
                              for start in range(0, len(data), step)])
        self.bytes_written += len(data)

    async def _write_chunk(self, offset: int, chunk: bytes) -> None:
        pages = await self._pages(self._pages_for(len(chunk)))
        data = pages[:-(-len(chunk) // PAGE)]
        try:
            view = self._pool.buffer
            for i, page in enumerate(data):
                piece = chunk[i * PAGE:(i + 1) * PAGE]
                view[page * PAGE:page * PAGE + len(piece)] = piece
            self._zero_tail(data[-1], len(chunk))
            last = (len(chunk) - (len(data) - 1) * PAGE) // 512
            await self._submit(Op.WRITE, offset // 512, pages, last)
        finally:
            self._release(pages)

    def _zero_tail(self, last_page: int, size: int) -> None:
        """A granted page holds the request's bytes and zeroes, nothing older (XSA-403)."""
        used = size - (size - 1) // PAGE * PAGE
        if used < PAGE:
            self._pool.buffer[last_page * PAGE + used:(last_page + 1) * PAGE] = bytes(PAGE - used)

    def _gather(self, pages: list[int], size: int) -> bytes:
        view = self._pool.buffer
        if len(pages) == 1:
            return bytes(view[pages[0] * PAGE:pages[0] * PAGE + size])
        return b"".join(view[p * PAGE:(p + 1) * PAGE] for p in pages)[:size]

    async def flush(self) -> None:
        await self._submit(Op.FLUSH_DISKCACHE, 0, [])

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        await self._submit(Op.DISCARD, offset // 512, [], nr_sectors=length // 512)

    def _release(self, pages: list[int]) -> None:
        # Synchronous: it runs in the finally of a request its client may have given up on
        # (an NBD client that disconnects mid-I/O), where an await could be cancelled and
        # lose the pages.
        self._fast.release_pages(pages)
        if self._room:
            self._room.unpark_all()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    # ---- for the NBD server's fast path ----------------------------------------------
    @property
    def _fast(self) -> DeviceFastPath:
        assert self.fastpath is not None, "run() makes the fast path"
        return self.fastpath

    def kick(self, queue_mask: int) -> None:
        """Send an event on each queue whose ring the fast path just pushed requests on."""
        if self._attached is not None:
            for queue in self._attached.queues:
                if queue_mask >> queue.index & 1:
                    queue.port.notify()

    async def wait_room(self) -> None:
        """Until a fast request may have room: a connection, free pages and ring slots."""
        if not self._connected.is_set():
            await self._connected.wait()
        else:
            await self._room.park()
