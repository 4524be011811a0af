"""The sim platform as a domain sees it: GrantTable, EventChannel and Memory over the
hypervisor's control socket (see ``hypervisor.py`` for the daemon side).

Granting and ending access are local writes to the domain's grant table, as on Xen; mapping,
unmapping, copying and event-channel set-up are one request to the hypervisor per batch;
notifying is one ``write`` to an eventfd, never a daemon round trip.
"""
from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ringfence.hypervisor._lib import ffi, lib
from ringfence.hypervisor.platform import PAGE_SIZE, GrantCopy, PortStatistics
from ringfence.hypervisor.sim import protocol as P
from ringfence.hypervisor.sim.protocol import GNTST, Op

DOMAIN_FD_ENV = "RINGFENCE_DOMAIN_FD"
RESERVED_GREFS = 8  # as Xen's GNTTAB_NR_RESERVED_ENTRIES (console, xenstore)


class HypervisorError(OSError):
    """The hypervisor refused a request (errno-style status)."""


class GrantError(OSError):
    """A grant operation failed with a GNTST status."""

    def __init__(self, status: int, what: str) -> None:
        name = GNTST(status).name if status in GNTST._value2member_map_ else str(status)
        super().__init__(errno.EPERM, f"{what}: GNTST_{name}")
        self.status = status


class ControlConnection:
    """Request/reply over the SEQPACKET control socket, with replies matched by id."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._next_id = 1
        self._pending: dict[int, trio.MemorySendChannel[tuple[int, bytes, list[int]]]] = {}
        # (kind, domid, fd or -1): domain announcements and, for xenstored, connections
        self._events_send, self.events = trio.open_memory_channel[tuple[int, int, int, bytes]](1024)
        self._closed = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        ancbuf = socket.CMSG_SPACE(P.MAX_FDS_PER_MESSAGE * 4)
        try:
            while True:
                try:
                    data, ancdata, flags, _ = await self._sock.recvmsg(
                        P.MAX_MESSAGE, ancbuf, socket.MSG_CMSG_CLOEXEC)
                except ConnectionResetError:
                    # The hypervisor closed the link with our messages still unread (after
                    # one it refused): as much the end of it as EOF.
                    break
                fds: list[int] = []
                for level, kind, cdata in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        n = len(cdata) // 4
                        fds.extend(struct.unpack(f"<{n}i", cdata[: n * 4]))
                if not data:
                    break
                msg = P.decode(data)
                if msg.op & P.EVENT and not msg.op & P.REPLY:
                    kind, domid = P.EVENT_BODY.unpack_from(msg.payload)
                    extra = msg.payload[P.EVENT_BODY.size:]
                    try:
                        self._events_send.send_nowait((kind, domid, fds[0] if fds else -1, extra))
                    except trio.WouldBlock:
                        for fd in fds:
                            os.close(fd)
                    continue
                status, body = P.split_reply(msg.payload)
                waiter = self._pending.pop(msg.req_id, None)
                if waiter is None:
                    for fd in fds:
                        os.close(fd)
                    continue
                waiter.send_nowait((status, body, fds))
        finally:
            self._closed = True
            self._events_send.close()
            for waiter in self._pending.values():
                waiter.close()

    async def call(self, op: int, payload: bytes = b"",
                   ancillary: list[tuple[int, int, bytes]] | None = None) -> tuple[int, bytes, list[int]]:
        if self._closed:
            raise HypervisorError(errno.ECONNRESET, "hypervisor connection closed")
        req_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        send, receive = trio.open_memory_channel[tuple[int, bytes, list[int]]](1)
        self._pending[req_id] = send
        await self._sock.sendmsg([P.encode(op, req_id, payload)], ancillary or [])
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            raise HypervisorError(errno.ECONNRESET, "hypervisor connection closed") from None

    async def checked(self, op: int, payload: bytes = b"", what: str = "") -> tuple[bytes, list[int]]:
        status, body, fds = await self.call(op, payload)
        if status < 0:
            for fd in fds:
                os.close(fd)
            raise HypervisorError(-status, f"{what or Op(op).name.lower()}: {os.strerror(-status)}")
        return body, fds

    def close(self) -> None:
        self._sock.close()


# ---- event channels ----------------------------------------------------------------------

class SimPort:
    """One end of an interdomain channel: notify writes the peer's eventfd."""

    def __init__(self, owner: SimEventChannel, port: int, remote_domid: int,
                 notify_fd: int, wait_fd: int) -> None:
        self._owner = owner
        self.port = port
        self.remote_domid = remote_domid
        self.notify_fd = notify_fd
        self.wait_fd = wait_fd
        self._sent = self._wakeups = self._received = 0

    def notify(self) -> None:
        os.eventfd_write(self.notify_fd, 1)
        self._sent += 1

    async def wait(self) -> int:
        """Wait for at least one notification; returns how many arrived since the last wait."""
        while True:
            try:
                count = os.eventfd_read(self.wait_fd)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.wait_fd)
                continue
            self._wakeups += 1
            self._received += count
            return count

    def pending(self) -> int:
        """Consume notifications without blocking (0 if none)."""
        try:
            count = os.eventfd_read(self.wait_fd)
        except BlockingIOError:
            return 0
        self._received += count
        return count

    async def close(self) -> None:
        if self.notify_fd < 0:
            return
        trio.lowlevel.notify_closing(self.wait_fd)
        os.close(self.notify_fd)
        os.close(self.wait_fd)
        self.notify_fd = self.wait_fd = -1
        with contextlib.suppress(HypervisorError):
            await self._owner.connection.call(Op.EVT_CLOSE, P.PORT.pack(self.port))

    def statistics(self) -> PortStatistics:
        return PortStatistics(self.port, self.remote_domid, self._sent, self._wakeups,
                              self._received)


class SimEventChannel:
    def __init__(self, connection: ControlConnection) -> None:
        self.connection = connection

    async def alloc_unbound(self, remote_domid: int) -> SimPort:
        body, fds = await self.connection.checked(Op.EVT_ALLOC_UNBOUND, P.U16.pack(remote_domid))
        (port,) = P.PORT.unpack(body)
        return SimPort(self, port, remote_domid, fds[0], fds[1])

    async def bind_interdomain(self, remote_domid: int, remote_port: int) -> SimPort:
        body, fds = await self.connection.checked(
            Op.EVT_BIND_INTERDOMAIN, P.EVT_BIND.pack(remote_domid, remote_port))
        (port,) = P.PORT.unpack(body)
        return SimPort(self, port, remote_domid, fds[0], fds[1])


# ---- grants ------------------------------------------------------------------------------

class _Mapped:
    """Pages mapped contiguously at ``address`` (ours or a peer's)."""

    def __init__(self, fds: list[int], writable: bool) -> None:
        fd_array = ffi.new("int[]", fds)
        ptr = lib.rf_map_fds(fd_array, len(fds), int(writable))
        if ptr == ffi.NULL:
            raise OSError(ffi.errno, f"mapping pages: {os.strerror(ffi.errno)}")
        self.length = len(fds) * PAGE_SIZE
        self._ptr = ptr
        self._view: memoryview | None = memoryview(ffi.buffer(ptr, self.length))
        if not writable:
            self._view = self._view.toreadonly()

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise ValueError("pages are unmapped")
        return self._view

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self._ptr))

    def _unmap(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
            lib.rf_unmap(self._ptr, self.length)


class SimMappedPages(_Mapped):
    def __init__(self, domid: int, grefs: Sequence[int], readonly: bool, handles: list[int],
                 fds: list[int]) -> None:
        super().__init__(fds, not readonly)
        self.domid = domid
        self.grefs = tuple(grefs)
        self.readonly = readonly
        self.handles = handles


@dataclass(frozen=True, slots=True)
class GrantTableStatistics:
    entries: int
    granted: int
    maps: int
    unmaps: int
    mapped_pages: int
    copies: int
    copy_bytes: int
    failures: int


class SimGrantTable:
    persistent_maps = True

    def __init__(self, connection: ControlConnection, table_fd: int, entries: int) -> None:
        self.connection = connection
        self.entries = entries
        self.domid = 0
        size = (entries * 8 + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        self._table = mmap.mmap(table_fd, size) if entries else None
        os.close(table_fd) if table_fd >= 0 else None
        self._base = (ffi.cast("rf_grant_entry_v1 *", ffi.from_buffer(self._table))
                      if self._table is not None else None)
        # Grefs never granted yet are those from _fresh on; ended ones wait in _free and go
        # first. (Not a list of every free gref: 16 k of them cost each domain start 0.5 ms.)
        self._fresh = RESERVED_GREFS if entries else 0
        self._free: list[int] = []
        self._maps = self._unmaps = self._mapped = self._copies = self._copy_bytes = 0
        self._failures = 0

    def grant_reserved(self, gref: int, domid: int, frame: int) -> None:
        """Fill one of the reserved entries (1: the XenStore page), as a domain builder does."""
        if not 0 <= gref < RESERVED_GREFS or self._base is None:
            raise ValueError(f"gref {gref} is not a reserved entry")
        lib.rf_grant_set(self._base + gref, domid, frame, 0)

    def _take(self, count: int) -> list[int]:
        """``count`` free grefs: the last ended first, then never granted ones."""
        if count > len(self._free) + self.entries - self._fresh or self._base is None:
            raise OSError(errno.ENOSPC, "grant table full")
        reused = min(count, len(self._free))
        grefs = self._free[len(self._free) - reused:][::-1]
        del self._free[len(self._free) - reused:]
        grefs += range(self._fresh, self._fresh + count - reused)
        self._fresh += count - reused
        return grefs

    def grant_access(self, domid: int, frame: int, readonly: bool = False) -> int:
        (gref,) = self._take(1)
        lib.rf_grant_set(self._base + gref, domid, frame, int(readonly))
        return gref

    def grant_access_many(self, domid: int, frames: Sequence[int], readonly: bool = False) -> list[int]:
        """:meth:`grant_access` for many frames in one C call."""
        grefs = self._take(len(frames))
        lib.rf_grant_set_many(self._base, ffi.new("uint32_t[]", grefs), domid,
                              ffi.new("uint32_t[]", list(frames)), len(grefs), int(readonly))
        return grefs

    def end_access_many(self, grefs: Sequence[int]) -> list[int]:
        """:meth:`end_access` for many grefs in one C call; returns those it could not end
        (still mapped by the grantee)."""
        assert self._base is not None
        if any(not RESERVED_GREFS <= gref < self.entries for gref in grefs):
            raise ValueError("gref out of range")
        ended = ffi.new("uint8_t[]", len(grefs))
        lib.rf_grant_end_access_many(self._base, ffi.new("uint32_t[]", list(grefs)), len(grefs), ended)
        self._free += [gref for gref, done in zip(grefs, ended) if done]
        return [gref for gref, done in zip(grefs, ended) if not done]

    def end_access(self, gref: int) -> bool:
        """Revoke a grant; False while the grantee still has it mapped (retry later)."""
        assert self._base is not None
        if not RESERVED_GREFS <= gref < self.entries:
            raise ValueError(f"gref {gref} out of range")
        if not lib.rf_grant_end_access(self._base + gref):
            return False
        self._free.append(gref)
        return True

    def flags(self, gref: int) -> int:
        assert self._base is not None
        return int(lib.rf_grant_flags(self._base + gref))

    async def map(self, domid: int, grefs: Sequence[int], readonly: bool = False) -> SimMappedPages:
        return (await self._map(domid, grefs, readonly, each=False))[0]

    async def map_each(self, domid: int, grefs: Sequence[int], readonly: bool = False) -> list[SimMappedPages]:
        """:meth:`map` of each gref as a mapping of its own (unmapped on its own), all in
        one call to the hypervisor."""
        return await self._map(domid, grefs, readonly, each=True)

    async def _map(self, domid: int, grefs: Sequence[int], readonly: bool, *, each: bool) -> list[SimMappedPages]:
        if not 0 < len(grefs) <= P.MAX_FDS_PER_MESSAGE:
            raise ValueError(f"map {len(grefs)} pages: 1..{P.MAX_FDS_PER_MESSAGE} per call")
        flags = P.MAP_READONLY if readonly else 0
        body, fds = await self.connection.checked(
            Op.GNT_MAP, P.pack_items(P.MAP_ITEM, [(domid, flags, g) for g in grefs]))
        results = _unpack_items(body, P.MAP_RESULT)
        handles = [handle for status, handle in results if status == GNTST.okay]
        failed = [status for status, _ in results if status != GNTST.okay]
        pages: list[SimMappedPages] = []
        try:
            if failed:
                self._failures += 1
                raise GrantError(failed[0], f"map of {len(grefs)} grefs from dom{domid}")
            if each:
                for gref, handle, fd in zip(grefs, handles, fds):
                    pages.append(SimMappedPages(domid, [gref], readonly, [handle], [fd]))
            else:
                pages.append(SimMappedPages(domid, grefs, readonly, handles, fds))
        except BaseException:
            for made in pages:
                made._unmap()
            for fd in fds:
                os.close(fd)
            if handles:
                await self.connection.call(Op.GNT_UNMAP, P.pack_items(P.COUNT, [(h,) for h in handles]))
            raise
        for fd in fds:
            os.close(fd)
        self._maps += 1
        self._mapped += len(grefs)
        return pages

    async def unmap(self, pages: SimMappedPages) -> None:
        pages._unmap()
        body, _ = await self.connection.checked(
            Op.GNT_UNMAP, P.pack_items(P.COUNT, [(h,) for h in pages.handles]))
        statuses = [s for (s,) in _unpack_items(body, P.STATUS)]
        self._unmaps += 1
        self._mapped -= len(pages.handles)
        bad = [s for s in statuses if s]
        if bad:
            self._failures += 1
            raise GrantError(bad[0], "unmap")

    async def copy(self, segments: Sequence[GrantCopy]) -> list[int]:
        """Batched grant copy; returns one GNTST status per segment."""
        keep = []
        wire = []
        for seg in segments:
            sides = []
            for gref, local, writable in ((seg.source_gref, seg.source_local, False),
                                          (seg.dest_gref, seg.dest_local, True)):
                if gref is not None:
                    sides.append(P.CopySide(True, gref[0], gref[1], gref[2]))
                else:
                    view = memoryview(local)
                    if writable and view.readonly:
                        raise ValueError("copy destination is read-only")
                    if view.nbytes < seg.length:
                        raise ValueError("local buffer shorter than the copy")
                    cdata = ffi.from_buffer(view, require_writable=writable)
                    keep.append(cdata)
                    sides.append(P.CopySide(False, 0, 0, int(ffi.cast("uintptr_t", cdata))))
            wire.append(P.CopySegment(sides[0], sides[1], seg.length))
        statuses: list[int] = []
        for start in range(0, len(wire), P.MAX_BATCH):
            body, _ = await self.connection.checked(
                Op.GNT_COPY, P.encode_copy(wire[start:start + P.MAX_BATCH]))
            statuses.extend(s for (s,) in _unpack_items(body, P.STATUS))
        del keep
        self._copies += 1
        self._copy_bytes += sum(seg.length for seg, s in zip(segments, statuses) if s == 0)
        self._failures += any(statuses)
        return statuses

    def statistics(self) -> GrantTableStatistics:
        granted = self._fresh - RESERVED_GREFS - len(self._free) if self.entries else 0
        return GrantTableStatistics(self.entries, granted, self._maps, self._unmaps,
                                    self._mapped, self._copies, self._copy_bytes, self._failures)


# ---- memory ------------------------------------------------------------------------------

class SimPageRange(_Mapped):
    def __init__(self, frames: list[int], fds: list[int]) -> None:
        super().__init__(fds, True)
        self.frames = tuple(frames)
        self._fds = fds  # held so the hypervisor can hand the pages to mappers

    def _close(self) -> None:
        self._unmap()
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class SimMemory:
    def __init__(self, connection: ControlConnection, ram_fd: int, ram_pages: int) -> None:
        self.connection = connection
        self.ram_pages = ram_pages
        self.ram = mmap.mmap(ram_fd, ram_pages * PAGE_SIZE) if ram_pages else None
        if ram_fd >= 0:
            os.close(ram_fd)
        self.allocated = 0

    def ram_page(self, frame: int) -> memoryview:
        if self.ram is None or not 0 <= frame < self.ram_pages:
            raise ValueError(f"frame {frame} is not RAM")
        return memoryview(self.ram)[frame * PAGE_SIZE:(frame + 1) * PAGE_SIZE]

    async def alloc_pages(self, count: int) -> SimPageRange:
        frames: list[int] = []
        fds: list[int] = []
        try:
            while len(frames) < count:
                chunk = min(count - len(frames), P.MAX_FDS_PER_MESSAGE)
                body, got = await self.connection.checked(Op.ALLOC_PAGES, P.COUNT.pack(chunk))
                new_frames = [f for (f,) in _unpack_items(body, P.COUNT)]
                if len(got) != len(new_frames):
                    raise HypervisorError(errno.EPROTO, "page fds missing from reply")
                frames += new_frames
                fds += got
                await self.connection.checked(
                    Op.REGISTER_PAGES, P.pack_items(P.REGISTER_ITEM, list(zip(new_frames, got))))
            pages = SimPageRange(frames, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.allocated += count
        return pages

    async def free_pages(self, pages: SimPageRange) -> None:
        frames = list(pages.frames)
        pages._close()
        self.allocated -= len(frames)
        await self.connection.checked(Op.FREE_PAGES, P.pack_items(P.COUNT, [(f,) for f in frames]))


def _unpack_items(body: bytes, item: struct.Struct) -> list[tuple[int, ...]]:
    (count,) = P.COUNT.unpack_from(body)
    return [item.unpack_from(body, P.COUNT.size + i * item.size) for i in range(count)]


# ---- opening -----------------------------------------------------------------------------

@dataclass
class SimDomain:
    """Everything a domain process uses: its identity and the four platform interfaces."""
    domid: int
    connection: ControlConnection
    grant_table: SimGrantTable
    events: SimEventChannel
    memory: SimMemory

    async def statistics(self) -> dict[str, Any]:
        body, _ = await self.connection.checked(Op.STATISTICS)
        return json.loads(body)

    async def announce_store_ring(self, port: int) -> None:
        """Our XenStore ring page is at the reserved gref and ``port`` is unbound for dom0:
        have xenstored serve it."""
        await self.connection.checked(Op.STORE_RING, P.PORT.pack(port), "store ring")

    async def store_connection(self) -> socket.socket:
        """A fresh XenStore connection on which xenstored knows us by our domid."""
        _, fds = await self.connection.checked(Op.STORE_CONNECT)
        return socket.socket(fileno=fds[0])


@contextlib.asynccontextmanager
async def open_domain(fd: int | None = None) -> AsyncIterator[SimDomain]:
    """Become the domain whose control socket is ``fd`` (default: $RINGFENCE_DOMAIN_FD)."""
    if fd is None:
        try:
            fd = int(os.environ[DOMAIN_FD_ENV])
        except (KeyError, ValueError):
            raise HypervisorError(errno.EBADF, f"no domain control socket (${DOMAIN_FD_ENV})") from None
    raw = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    sock = trio.socket.from_stdlib_socket(raw)
    connection = ControlConnection(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        creds = struct.pack("<iII", os.getpid(), os.getuid(), os.getgid())
        status, body, fds = await connection.call(
            Op.HELLO, ancillary=[(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
        if status < 0 or len(fds) != 2:
            for f in fds:
                os.close(f)
            connection.close()
            raise HypervisorError(-status or errno.EPROTO, "hypervisor refused HELLO")
        domid, entries, ram_pages = P.HELLO_REPLY.unpack(body)
        grant_table = SimGrantTable(connection, fds[0], entries)
        grant_table.domid = domid
        domain = SimDomain(domid, connection, grant_table, SimEventChannel(connection),
                           SimMemory(connection, fds[1], ram_pages))
        try:
            yield domain
        finally:
            nursery.cancel_scope.cancel()
            connection.close()


@dataclass(frozen=True)
class StoreConnection:
    domid: int  # as the hypervisor vouches
    sock: socket.socket


@dataclass(frozen=True)
class StoreRing:
    """A domain's XenStore ring: the page at its reserved gref 1, the port it allocated for
    dom0; ``replayed`` when announced again to a newly registered xenstored."""
    domid: int
    port: int
    replayed: bool


@dataclass
class Dom0:
    """The host side: domain lifecycle, plus map/copy/bind as domid 0."""
    connection: ControlConnection
    grant_table: SimGrantTable
    events: SimEventChannel

    async def create_domain(self, name: str) -> tuple[int, int]:
        """Create a domain; returns its domid and the control-socket fd for its process."""
        body, fds = await self.connection.checked(Op.CREATE_DOMAIN, name.encode(), "create")
        (domid,) = P.U16.unpack(body)
        return domid, fds[0]

    async def destroy_domain(self, domid: int) -> None:
        await self.connection.checked(Op.DESTROY_DOMAIN, P.U16.pack(domid), "destroy")

    async def notify_on_death(self, domid: int, port: int) -> None:
        """Have the hypervisor notify our bound ``port`` the moment ``domid``'s process has
        exited (every process of its sandbox, as its pid 1), before it tears the domain
        down: once, and not when we destroy the domain ourselves (its process may still
        run then). For a warm spare's takeover channels: the frontends switch without
        waiting for the toolstack to hear of the death."""
        await self.connection.checked(Op.NOTIFY_ON_DEATH, P.DEATH_NOTICE.pack(domid, port), "notify_on_death")

    async def rename_domain(self, domid: int, name: str) -> None:
        await self.connection.checked(Op.RENAME_DOMAIN, P.U16.pack(domid) + name.encode(), "rename")

    async def store_connection_for(self, domid: int) -> socket.socket:
        """A XenStore connection on which xenstored knows the caller as ``domid`` (what a
        domain's xenbus device gives its processes)."""
        _, fds = await self.connection.checked(Op.STORE_CONNECT, P.U16.pack(domid))
        return socket.socket(fileno=fds[0])

    async def revoke_mapped(self, domid: int) -> dict[str, int]:
        """The fault harness's ``revoke``: the hypervisor ends, as ``domid`` would, each of
        its grants another domain holds mapped; each must be refused (``tried``,
        ``refused``, ``ended``)."""
        body, _ = await self.connection.checked(Op.REVOKE_MAPPED, P.U16.pack(domid), "revoke")
        return dict(json.loads(body))

    async def list_domains(self) -> list[dict[str, Any]]:
        body, _ = await self.connection.checked(Op.LIST_DOMAINS)
        return list(json.loads(body))

    async def statistics(self) -> dict[str, Any]:
        body, _ = await self.connection.checked(Op.STATISTICS)
        return dict(json.loads(body))

    async def subscribe(self) -> None:
        """Ask for domain introductions and releases from now on (see :meth:`next_event`)."""
        await self.connection.checked(Op.SUBSCRIBE)

    async def next_event(self) -> tuple[P.EventKind, int]:
        """The next domain introduction or release (after :meth:`subscribe`)."""
        kind, domid, fd, _ = await self._next()
        if fd >= 0:
            os.close(fd)
        return P.EventKind(kind), domid

    async def register_store(self) -> None:
        """Become the XenStore daemon: domains' connections and rings arrive via
        :meth:`next_store_event` (the rings of domains that exist already, at once)."""
        await self.connection.checked(Op.STORE_REGISTER)

    async def next_store_event(self) -> StoreConnection | StoreRing:
        """A domain's new XenStore socket, or its ring page ready to be served."""
        while True:
            kind, domid, fd, extra = await self._next()
            if kind == P.EventKind.STORE_CONNECTION and fd >= 0:
                return StoreConnection(domid, socket.socket(fileno=fd))
            if fd >= 0:
                os.close(fd)
            if kind == P.EventKind.STORE_RING and len(extra) == P.STORE_RING_BODY.size:
                port, replayed = P.STORE_RING_BODY.unpack(extra)
                return StoreRing(domid, port, bool(replayed))

    async def _next(self) -> tuple[int, int, int, bytes]:
        try:
            return await self.connection.events.receive()
        except trio.EndOfChannel:
            raise HypervisorError(errno.ECONNRESET, "hypervisor connection closed") from None


@contextlib.asynccontextmanager
async def open_dom0(path: str) -> AsyncIterator[Dom0]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.connect(path)
    except OSError:
        sock.close()
        raise
    connection = ControlConnection(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        try:
            yield Dom0(connection, SimGrantTable(connection, -1, 0), SimEventChannel(connection))
        finally:
            nursery.cancel_scope.cancel()
            connection.close()
