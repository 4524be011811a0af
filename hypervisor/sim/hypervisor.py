"""The sim hypervisor: the domain table, grant tables and event channels (DESIGN.md §2).

One trio task per control connection. A domain is identified by its connection, never by
anything it says: the listening socket is dom0; CREATE_DOMAIN hands dom0 one end of a fresh
socketpair that is bound to the new domid, and the process given that end becomes the domain
when it says HELLO (its pid comes from kernel-checked SCM_CREDENTIALS).

Memory model (the isolation invariant):
* a domain's RAM is one sealed memfd that the hypervisor maps too; grant copy on RAM frames is
  a ``process_vm_readv/writev`` between that mapping and the caller, batched;
* pages meant to be mapped are one-page sealed memfds the hypervisor creates and the domain
  holds; a successful map takes the granter's fd with ``pidfd_getfd``, checks its inode,
  and passes it (reopened read-only for read-only grants) to the mapper, which maps it and
  closes it; the hypervisor keeps no fd per page;
* unmapping is checked: the hypervisor refuses to drop a pin while the mapper can still
  reach the page (a mapping or an fd), so a granter that ends access reuses a page nobody
  else can touch.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import socket
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from ringfence._unixsock import listen_unix

from ringfence.hypervisor._lib import ffi, lib
from ringfence.hypervisor.sim import protocol as P
from ringfence.hypervisor.sim.exits import (ExitListener, ExitListenerStatistics, sandbox_init,
                                            sole_process_exiting)
from ringfence.hypervisor.sim.protocol import GNTST, Op

log = logging.getLogger(__name__)

DOMID_FIRST = 1
DOMID_LAST = 0x7FEF
PAGE = P.PAGE_SIZE
MAPPABLE_FRAME_BASE = 1 << 24  # frames below are RAM, from here on one-page memfds
CREDS = struct.Struct("<iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-domain quotas; the defaults follow Xen's (max_grant_frames 32 → 16384 entries)."""
    grant_entries: int = 16384
    ram_pages: int = 16384            # 64 MiB, sparse until touched
    mappable_pages: int = 4096
    maptrack: int = 65536
    ports: int = 1024
    unbound_ports: int = 64           # each holds two eventfds in the hypervisor until bound
    domains: int = 1000


@dataclass(frozen=True, slots=True)
class HypervisorStatistics:
    domains: int
    domains_created: int
    domains_destroyed: int
    connections: int
    protocol_errors: int
    maps: int
    unmaps: int
    copies: int
    copy_bytes: int
    channels_bound: int
    death_notices: int  # dom0's ports notified of a domain's death (NOTIFY_ON_DEATH)
    # of them, notified as the domain's process began to exit (exits.py), before it was gone
    early_death_notices: int
    exit_records: ExitListenerStatistics | None  # None: deaths are seen through pidfds only
    grant_errors: dict[str, int]
    revokes_refused: int        # grants the fault harness tried to end under a mapping
    revoked_under_mapping: int  # of those, ended all the same: must stay 0 (XSA-396)


@dataclass(frozen=True, slots=True)
class DomainStatistics:
    domid: int
    name: str
    state: str
    pid: int
    mappable_pages: int
    mappings_held: int
    pins_granted: int
    ports: int


@dataclass(slots=True)
class _Page:
    inode: tuple[int, int]
    fd_number: int = -1   # where the domain keeps it; -1 until registered


@dataclass(slots=True)
class _Mapping:
    granter: Domain  # the domain itself: its domid may come back as another's
    gref: int
    readonly: bool
    inode: tuple[int, int]


@dataclass(slots=True)
class _Channel:
    port: int
    remote: int
    peer_port: int = 0            # 0 while unbound
    held: tuple[int, int] | None = None  # (owner notifies, owner waits) until bound
    # The owner's end of a channel for dom0 once bound: kept so that the channel goes back
    # to unbound when its binder closes or dies (a restarted xenstored binds it again).
    bound: tuple[int, int] | None = None
    bound_by: Domain | None = None  # on the owner's end: who bound it
    binder: bool = False            # this end was made by binding


@dataclass(eq=False)
class Domain:
    domid: int
    name: str
    limits: Limits
    state: str = "created"  # created → running → dying
    pid: int = 0
    pidfd: int = -1
    gnttab: mmap.mmap | None = None
    gnttab_fd: int = -1
    ram: mmap.mmap | None = None
    ram_fd: int = -1
    ram_ptr: Any = None
    pages: dict[int, _Page] = field(default_factory=dict)
    next_frame: int = MAPPABLE_FRAME_BASE
    maptrack: dict[int, _Mapping] = field(default_factory=dict)
    next_handle: int = 1
    pins: dict[int, list[int]] = field(default_factory=dict)  # gref -> [readers, writers]
    ports: dict[int, _Channel] = field(default_factory=dict)
    store_port: int = 0  # its XenStore ring's port, once announced (STORE_RING)
    connection: trio.socket.SocketType | None = None
    cancel_scope: trio.CancelScope | None = None

    def entry(self, gref: int) -> Any:
        assert self.gnttab is not None
        return ffi.cast("rf_grant_entry_v1 *", ffi.from_buffer(self.gnttab)) + gref

    def statistics(self) -> DomainStatistics:
        return DomainStatistics(self.domid, self.name, self.state, self.pid, len(self.pages),
                                len(self.maptrack), len(self.pins), len(self.ports))


def _sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # A granter must not be able to SIGBUS its mapper by shrinking the page.
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        # Without this a non-owner could reopen a read-only handle read-write via /proc.
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Hypervisor:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.domains: dict[int, Domain] = {}
        self._next_domid = DOMID_FIRST
        self._subscribers: list[trio.MemorySendChannel[tuple[bytes, int]]] = []
        self._store: trio.MemorySendChannel[tuple[bytes, int]] | None = None
        self._unbound_held = 0
        # domid -> (dom0 connection, its port): notified when that domain's process exits
        self._death_notices: dict[int, set[tuple[Domain, int]]] = {}
        self._counters: Counter[str] = Counter()
        self._grant_errors: Counter[str] = Counter()
        self._nursery: trio.Nursery | None = None
        self._exits: ExitListener | None = None
        # pid -> domain, for those whose process is its pid namespace's first: the domains
        # whose exit records count (exits.sandbox_init)
        self._sandbox_inits: dict[int, Domain] = {}

    # ---- statistics -------------------------------------------------------------------
    def statistics(self) -> HypervisorStatistics:
        c = self._counters
        return HypervisorStatistics(
            domains=len(self.domains), domains_created=c["created"],
            domains_destroyed=c["destroyed"], connections=c["connections"],
            protocol_errors=c["protocol_errors"], maps=c["maps"], unmaps=c["unmaps"],
            copies=c["copies"], copy_bytes=c["copy_bytes"], channels_bound=c["bound"],
            death_notices=c["death_notices"], early_death_notices=c["early_death_notices"],
            exit_records=self._exits.statistics() if self._exits is not None else None,
            grant_errors=dict(self._grant_errors), revokes_refused=c["revokes_refused"],
            revoked_under_mapping=c["revoked_under_mapping"])

    def _grant_error(self, status: int) -> int:
        self._grant_errors[GNTST(status).name] += 1
        return status

    # ---- serving ----------------------------------------------------------------------
    async def serve(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The socket is dom0's: nobody else may connect.
        listener = await listen_unix(path, kind=socket.SOCK_SEQPACKET)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._exits = ExitListener.open()
            if self._exits is not None:
                nursery.start_soon(self._watch_exits, self._exits)
            task_status.started()
            try:
                while True:
                    conn, _ = await listener.accept()
                    pid, _, _ = CREDS.unpack(conn.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, CREDS.size))
                    nursery.start_soon(self._serve_dom0, conn, pid)
            finally:
                listener.close()
                if self._exits is not None:
                    self._exits.close()
                for domain in list(self.domains.values()):
                    self.destroy(domain, reason="hypervisor shutdown")

    async def _serve_dom0(self, conn: trio.socket.SocketType, pid: int) -> None:
        self._counters["connections"] += 1
        dom0 = Domain(0, "dom0", self.limits, state="running", pid=pid)
        dom0.connection = conn
        async with trio.open_nursery() as nursery:
            try:
                await self._message_loop(dom0, nursery)
            finally:
                nursery.cancel_scope.cancel()
                self._release_mappings(dom0)
                self._close_all_ports(dom0)
                for notices in self._death_notices.values():
                    notices.difference_update([n for n in notices if n[0] is dom0])
                conn.close()

    async def _serve_domain(self, domain: Domain, conn: trio.socket.SocketType) -> None:
        self._counters["connections"] += 1
        with trio.CancelScope() as scope:
            domain.cancel_scope = scope
            async with trio.open_nursery() as nursery:
                try:
                    await self._message_loop(domain, nursery)
                finally:
                    nursery.cancel_scope.cancel()
        if domain.pidfd < 0:
            self.destroy(domain, reason="control connection closed before HELLO")
            return
        # The process lives on without a control connection (it can no longer map, copy
        # or bind); its death, seen through the pidfd, destroys the domain.
        log.info("domain disconnected", extra={"kv": {"domid": domain.domid}})
        if domain.connection is not None:
            domain.connection.close()

    async def _message_loop(self, domain: Domain, nursery: trio.Nursery) -> None:
        conn = domain.connection
        assert conn is not None
        ancbuf = socket.CMSG_SPACE(CREDS.size) + socket.CMSG_SPACE(16 * 4)
        while True:
            try:
                data, ancdata, flags, _ = await conn.recvmsg(P.MAX_MESSAGE + 1, ancbuf)
            except OSError as exc:
                log.info("connection error", extra={"kv": {"domid": domain.domid, "error": exc}})
                return
            if not data and not ancdata:
                return  # EOF
            creds: tuple[int, int, int] | None = None
            fds_received = False
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds_received = True
                    n = len(cdata) // 4
                    for fd in struct.unpack(f"<{n}i", cdata[: n * 4]):
                        os.close(fd)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    creds = CREDS.unpack_from(cdata)
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise P.ProtocolError("truncated datagram or control data")
                if fds_received:
                    raise P.ProtocolError("unexpected file descriptors")
                msg = P.decode(data)
                reply, fds = self._dispatch(domain, msg, creds, nursery)
            except P.ProtocolError as exc:
                self._counters["protocol_errors"] += 1
                log.warning("closing connection after bad message",
                            extra={"kv": {"domid": domain.domid, "reason": str(exc)}})
                return
            except Exception:
                # A bug must cost one connection, never the daemon.
                self._counters["protocol_errors"] += 1
                log.exception("internal error handling message",
                              extra={"kv": {"domid": domain.domid}})
                return
            try:
                if fds:
                    await conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  struct.pack(f"<{len(fds)}i", *fds))])
                else:
                    await conn.send(reply)
            except OSError as exc:
                log.info("reply failed; closing connection",
                         extra={"kv": {"domid": domain.domid, "error": exc}})
                return
            finally:
                for fd in fds:
                    os.close(fd)

    # ---- dispatch ---------------------------------------------------------------------
    def _dispatch(self, domain: Domain, msg: P.Message, creds: tuple[int, int, int] | None,
                  nursery: trio.Nursery) -> tuple[bytes, list[int]]:
        op = msg.op
        is_dom0 = domain.domid == 0
        if op == Op.HELLO:
            P.decode_empty(msg.payload, "hello")
            return self._hello(domain, msg, creds, nursery)
        if domain.state != "running":
            raise P.ProtocolError(f"op {op} before HELLO")
        if op == Op.ALLOC_PAGES and not is_dom0:
            count = P.decode_count(msg.payload, "alloc", P.MAX_FDS_PER_MESSAGE)
            return self._alloc_pages(domain, msg, count)
        if op == Op.REGISTER_PAGES and not is_dom0:
            return self._register_pages(domain, msg, P.decode_register(msg.payload)), []
        if op == Op.FREE_PAGES and not is_dom0:
            for frame in P.decode_frames(msg.payload):
                domain.pages.pop(frame, None)
            return P.reply(msg, 0), []
        if op == Op.GNT_MAP:
            items = P.decode_map(msg.payload)
            if len(items) > P.MAX_FDS_PER_MESSAGE:
                raise P.ProtocolError("map: batch larger than one message's fds")
            return self._map(domain, msg, items)
        if op == Op.GNT_UNMAP:
            return self._unmap(domain, msg, P.decode_handles(msg.payload)), []
        if op == Op.GNT_COPY:
            return self._copy(domain, msg, P.decode_copy(msg.payload)), []
        if op == Op.EVT_ALLOC_UNBOUND:
            return self._alloc_unbound(domain, msg, P.decode_domid(msg.payload, "alloc_unbound"))
        if op == Op.EVT_BIND_INTERDOMAIN:
            return self._bind(domain, msg, *P.decode_bind(msg.payload))
        if op == Op.EVT_CLOSE:
            return self._close_port(domain, msg, P.decode_port(msg.payload)), []
        if op == Op.STORE_CONNECT and not is_dom0:
            P.decode_empty(msg.payload, "store_connect")
            return self._store_connect(domain, msg)
        if op == Op.STORE_RING and not is_dom0:
            return self._store_ring(domain, msg, P.decode_port(msg.payload)), []
        if op == Op.STORE_CONNECT:  # dom0 dials for a domain, as a kernel's xenbus device would
            target = self.domains.get(P.decode_domid(msg.payload, "store_connect"))
            if target is None or target.domid == 0:
                return P.reply(msg, -errno.ESRCH), []
            return self._store_connect(target, msg)
        if op == Op.STATISTICS:
            P.decode_empty(msg.payload, "statistics")
            body: Any = ({"hypervisor": asdict(self.statistics()),
                          "domains": [asdict(d.statistics()) for d in self.domains.values()]}
                         if is_dom0 else asdict(domain.statistics()))
            return P.reply(msg, 0, json.dumps(body).encode()), []
        if is_dom0:
            if op == Op.CREATE_DOMAIN:
                return self._create(msg, P.decode_name(msg.payload), nursery)
            if op == Op.DESTROY_DOMAIN:
                target = self.domains.get(P.decode_domid(msg.payload, "destroy"))
                if target is None:
                    return P.reply(msg, -errno.ESRCH), []
                self.destroy(target, reason="destroyed by dom0")
                return P.reply(msg, 0), []
            if op == Op.RENAME_DOMAIN:
                domid, name = P.decode_rename(msg.payload)
                target = self.domains.get(domid)
                if target is None:
                    return P.reply(msg, -errno.ESRCH), []
                if any(d.name == name and d is not target for d in self.domains.values()):
                    return P.reply(msg, -errno.EEXIST), []
                log.info("domain renamed", extra={"kv": {"domid": domid, "old": target.name, "new": name}})
                target.name = name
                return P.reply(msg, 0), []
            if op == Op.NOTIFY_ON_DEATH:
                watched, port = P.decode_death_notice(msg.payload)
                if watched not in self.domains or watched == 0:
                    return P.reply(msg, -errno.ESRCH), []
                channel = domain.ports.get(port)
                if channel is None or not channel.binder:
                    return P.reply(msg, -errno.EINVAL), []
                notices = self._death_notices.setdefault(watched, set())
                if len(notices) >= self.limits.ports:
                    return P.reply(msg, -errno.ENOSPC), []
                notices.add((domain, port))
                return P.reply(msg, 0), []
            if op == Op.REVOKE_MAPPED:
                target = self.domains.get(P.decode_domid(msg.payload, "revoke"))
                if target is None or target.gnttab is None:
                    return P.reply(msg, -errno.ESRCH), []
                return P.reply(msg, 0, json.dumps(self._revoke_mapped(target)).encode()), []
            if op == Op.LIST_DOMAINS:
                P.decode_empty(msg.payload, "list")
                rows = [{"domid": d.domid, "name": d.name, "state": d.state, "pid": d.pid}
                        for d in self.domains.values()]
                return P.reply(msg, 0, json.dumps(rows).encode()), []
            if op in (Op.SUBSCRIBE, Op.STORE_REGISTER):
                P.decode_empty(msg.payload, "subscribe")
                send, receive = trio.open_memory_channel[tuple[bytes, int]](256)
                if op == Op.SUBSCRIBE:
                    self._subscribers.append(send)
                else:
                    if self._store is not None:  # a restarted xenstored takes over
                        self._store.close()
                    self._store = send
                    for known in self.domains.values():
                        if known.store_port:  # its rings, to be served again
                            self._announce_ring(known, replayed=True)
                nursery.start_soon(self._forward_events, domain, receive,
                                   send if op == Op.STORE_REGISTER else None)
                return P.reply(msg, 0), []
        raise P.ProtocolError(f"op {op} not allowed here")

    async def _forward_events(self, dom0: Domain,
                              receive: trio.MemoryReceiveChannel[tuple[bytes, int]],
                              store: trio.MemorySendChannel[tuple[bytes, int]] | None) -> None:
        assert dom0.connection is not None
        try:
            async for event, fd in receive:
                try:
                    if fd >= 0:
                        await dom0.connection.sendmsg(
                            [event], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", fd))])
                    else:
                        await dom0.connection.send(event)
                except OSError:
                    return  # the subscriber is gone; its connection's loop cleans up
                finally:
                    if fd >= 0:
                        os.close(fd)
        finally:
            # A dead xenstored must not be handed connections nobody will ever serve: later
            # STORE_CONNECTs fail with ENOTCONN and the domains keep redialling.
            if store is not None and self._store is store:
                self._store = None
            # fds queued behind a failed send must not leak
            while True:
                try:
                    _, fd = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if fd >= 0:
                    os.close(fd)
            receive.close()

    def _store_connect(self, domain: Domain, msg: P.Message) -> tuple[bytes, list[int]]:
        if self._store is None:
            return P.reply(msg, -errno.ENOTCONN), []
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        event = P.encode(P.EVENT | P.EventKind.STORE_CONNECTION, 0,
                         P.EVENT_BODY.pack(P.EventKind.STORE_CONNECTION, domain.domid))
        try:
            self._store.send_nowait((event, ours.detach()))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            ours.close()
            theirs.close()
            return P.reply(msg, -errno.EAGAIN), []
        return P.reply(msg, 0), [theirs.detach()]

    def _store_ring(self, domain: Domain, msg: P.Message, port: int) -> bytes:
        """The domain has put its XenStore ring page at the reserved gref and allocated an
        unbound port for dom0: tell xenstored, as Xen's toolstack introduces a domain."""
        channel = domain.ports.get(port)
        if channel is None or channel.remote != 0 or channel.binder:
            return P.reply(msg, -errno.EINVAL)
        if domain.store_port:
            return P.reply(msg, -errno.EEXIST)
        domain.store_port = port
        self._announce_ring(domain, replayed=False)
        return P.reply(msg, 0)

    def _announce_ring(self, domain: Domain, *, replayed: bool) -> None:
        if self._store is None:
            return  # announced when a xenstored registers
        event = P.encode(P.EVENT | P.EventKind.STORE_RING, 0,
                         P.EVENT_BODY.pack(P.EventKind.STORE_RING, domain.domid)
                         + P.STORE_RING_BODY.pack(domain.store_port, int(replayed)))
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._store.send_nowait((event, -1))

    def _announce(self, kind: P.EventKind, domid: int) -> None:
        event = P.encode(P.EVENT | kind, 0, P.EVENT_BODY.pack(kind, domid))
        for send in list(self._subscribers):
            try:
                send.send_nowait((event, -1))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                # A subscriber that does not keep up loses its subscription, not the daemon.
                self._subscribers.remove(send)
                send.close()

    # ---- domains ----------------------------------------------------------------------
    def _allocate_domid(self) -> int | None:
        for _ in range(DOMID_LAST - DOMID_FIRST + 1):
            domid = self._next_domid
            self._next_domid = DOMID_FIRST if domid == DOMID_LAST else domid + 1
            if domid not in self.domains:
                return domid
        return None

    def _create(self, msg: P.Message, name: str, nursery: trio.Nursery) -> tuple[bytes, list[int]]:
        if any(d.name == name for d in self.domains.values()):
            return P.reply(msg, -errno.EEXIST), []
        if len(self.domains) >= self.limits.domains:
            return P.reply(msg, -errno.ENOSPC), []
        domid = self._allocate_domid()
        if domid is None:
            return P.reply(msg, -errno.ENOSPC), []
        domain = Domain(domid, name, self.limits)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            domain.gnttab_fd = _sealed_memfd(f"rf-gnttab-{domid}",
                                             _round_page(self.limits.grant_entries * 8))
            domain.ram_fd = _sealed_memfd(f"rf-ram-{domid}", self.limits.ram_pages * PAGE)
            domain.gnttab = mmap.mmap(domain.gnttab_fd, _round_page(self.limits.grant_entries * 8))
            domain.ram = mmap.mmap(domain.ram_fd, self.limits.ram_pages * PAGE)
            domain.ram_ptr = ffi.from_buffer(domain.ram)
        except BaseException:
            ours.close()
            theirs.close()
            self._free(domain)
            raise
        domain.connection = trio.socket.from_stdlib_socket(ours)
        self.domains[domid] = domain
        self._counters["created"] += 1
        log.info("domain created", extra={"kv": {"domid": domid, "name": name}})
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_domain, domain, domain.connection)
        self._announce(P.EventKind.INTRODUCED, domid)
        fd = theirs.detach()
        return P.reply(msg, 0, P.U16.pack(domid)), [fd]

    def _hello(self, domain: Domain, msg: P.Message, creds: tuple[int, int, int] | None,
               nursery: trio.Nursery) -> tuple[bytes, list[int]]:
        if domain.state != "created":
            raise P.ProtocolError("HELLO replayed")
        if domain.domid == 0:
            domain.state = "running"
            return P.reply(msg, 0, P.HELLO_REPLY.pack(0, 0, 0)), []
        if creds is None or creds[0] <= 0:
            raise P.ProtocolError("HELLO without credentials")
        pidfd = lib.rf_pidfd_open(creds[0])
        if pidfd < 0:
            raise P.ProtocolError(f"HELLO from a vanished pid: {os.strerror(-pidfd)}")
        domain.pid, domain.pidfd, domain.state = creds[0], pidfd, "running"
        if self._exits is not None and sandbox_init(domain.pid):
            self._sandbox_inits[domain.pid] = domain
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_death, domain)
        fds = [os.dup(domain.gnttab_fd), os.dup(domain.ram_fd)]
        # The domain has its own handles now; ours would only count against the fd limit.
        os.close(domain.gnttab_fd)
        os.close(domain.ram_fd)
        domain.gnttab_fd = domain.ram_fd = -1
        log.info("domain running", extra={"kv": {"domid": domain.domid, "pid": domain.pid}})
        return P.reply(msg, 0, P.HELLO_REPLY.pack(domain.domid, self.limits.grant_entries,
                                                  self.limits.ram_pages)), fds

    async def _watch_death(self, domain: Domain) -> None:
        try:
            await trio.lowlevel.wait_readable(domain.pidfd)
        except trio.ClosedResourceError:
            return  # destroyed by other means first
        # Nothing of the domain runs any more (its process was its sandbox's pid 1, whose
        # exit waits for every other): the ports dom0 named hear of it first.
        self._send_death_notices(domain)
        self.destroy(domain, reason="domain process exited")

    async def _watch_exits(self, exits: ExitListener) -> None:
        """The death notices of a domain go the moment its process has begun to exit,
        alone in its sandbox (exits.py), some milliseconds before it is gone: from then on
        it does no more I/O and runs no code of its own, and that is all a takeover waits
        for. Its mappings and channels go when it is gone (_watch_death): until then the
        frontends' grants to it stay mapped, and they end them once they no longer are."""
        while True:
            try:
                pids = await exits.groups_exiting()
            except (OSError, trio.ClosedResourceError) as exc:
                if not isinstance(exc, trio.ClosedResourceError):
                    log.warning("no more exit records: deaths seen through pidfds only",
                                extra={"kv": {"error": str(exc)}})
                return
            for pid in pids:
                domain = self._sandbox_inits.get(pid)
                if domain is not None and domain.domid in self._death_notices and sole_process_exiting(pid):
                    self._counters["early_death_notices"] += 1
                    self._send_death_notices(domain)

    def _send_death_notices(self, domain: Domain) -> None:
        for dom0, port in self._death_notices.pop(domain.domid, ()):
            channel = dom0.ports.get(port)
            if channel is None or not channel.binder:
                continue  # closed meanwhile
            theirs = self._owner_end(dom0, channel)
            if theirs is not None and theirs.bound is not None:
                os.eventfd_write(theirs.bound[1], 1)  # what the owner waits on: as dom0's notify
                self._counters["death_notices"] += 1

    def destroy(self, domain: Domain, *, reason: str) -> None:
        if self.domains.get(domain.domid) is not domain or domain.state == "dying":
            return
        domain.state = "dying"
        if domain.pidfd >= 0:
            lib.rf_pidfd_send_signal(domain.pidfd, 9)
        self._release_mappings(domain)
        self._close_all_ports(domain)
        del self.domains[domain.domid]
        self._death_notices.pop(domain.domid, None)  # destroyed, not dead by itself: none sent
        if domain.cancel_scope is not None:
            domain.cancel_scope.cancel()
        self._free(domain)
        self._counters["destroyed"] += 1
        log.info("domain destroyed", extra={"kv": {"domid": domain.domid, "reason": reason}})
        self._announce(P.EventKind.RELEASED, domain.domid)

    def _free(self, domain: Domain) -> None:
        if self._sandbox_inits.get(domain.pid) is domain:
            del self._sandbox_inits[domain.pid]
        if domain.connection is not None:
            domain.connection.close()
        if domain.pidfd >= 0:
            trio.lowlevel.notify_closing(domain.pidfd)
        for fd in (domain.pidfd, domain.gnttab_fd, domain.ram_fd):
            if fd >= 0:
                os.close(fd)
        domain.pidfd = domain.gnttab_fd = domain.ram_fd = -1
        if domain.ram_ptr is not None:
            ffi.release(domain.ram_ptr)
            domain.ram_ptr = None
        # Other cdata views of the grant table are short-lived; close once they are gone.
        for area in (domain.gnttab, domain.ram):
            if area is not None:
                try:
                    area.close()
                except BufferError:
                    pass

    def _release_mappings(self, mapper: Domain) -> None:
        """The mapper is gone: its mappings went with its process, so drop their pins."""
        for mapping in mapper.maptrack.values():
            self._unpin_mapping(mapping)
        mapper.maptrack.clear()

    # ---- pages ------------------------------------------------------------------------
    def _alloc_pages(self, domain: Domain, msg: P.Message, count: int) -> tuple[bytes, list[int]]:
        if len(domain.pages) + count > self.limits.mappable_pages:
            return P.reply(msg, -errno.ENOMEM), []
        frames, fds = [], []
        try:
            for _ in range(count):
                fd = _sealed_memfd(f"rf-page-{domain.domid}", PAGE)
                fds.append(fd)
                frame = domain.next_frame
                domain.next_frame += 1
                domain.pages[frame] = _Page(_file_id(fd))
                frames.append(frame)
        except OSError:
            for fd in fds:
                os.close(fd)
            for frame in frames:
                domain.pages.pop(frame, None)
            return P.reply(msg, -errno.ENOMEM), []
        return P.reply(msg, 0, P.pack_items(P.COUNT, [(f,) for f in frames])), fds

    def _register_pages(self, domain: Domain, msg: P.Message, items: list[tuple[int, int]]) -> bytes:
        for frame, fd_number in items:
            page = domain.pages.get(frame)
            if page is None or fd_number < 0:
                return P.reply(msg, -errno.EINVAL)
            page.fd_number = fd_number
        return P.reply(msg, 0)

    def _page_fd(self, granter: Domain, frame: int) -> int | None:
        """Take the granter's fd for one of its pages, checking it is still that page."""
        page = granter.pages.get(frame)
        if page is None or page.fd_number < 0 or granter.pidfd < 0:
            return None
        fd = lib.rf_pidfd_getfd(granter.pidfd, page.fd_number)
        if fd < 0:
            return None
        if _file_id(fd) != page.inode:
            os.close(fd)
            return None
        return fd

    # ---- grants -----------------------------------------------------------------------
    def _revoke_mapped(self, granter: Domain) -> dict[str, int]:
        """The fault harness's ``revoke``: end, as the granter would (atomically), every grant
        of its that another domain holds mapped. Each must be refused while the mapping
        lasts (XSA-396); one ended would be a use-after-free, and is counted as such."""
        mapped = [gref for gref, (readers, writers) in granter.pins.items() if readers or writers]
        ended = [gref for gref in mapped if lib.rf_grant_end_access(granter.entry(gref))]
        self._counters["revokes_refused"] += len(mapped) - len(ended)
        if ended:
            self._counters["revoked_under_mapping"] += len(ended)
            log.error("grants ended under a mapping", extra={"kv": {"domid": granter.domid, "grefs": len(ended)}})
        log.warning("fault made", extra={"kv": {"fault": "revoke", "domid": granter.domid,
                                                "tried": len(mapped), "ended": len(ended)}})
        return {"tried": len(mapped), "refused": len(mapped) - len(ended), "ended": len(ended)}

    def _pin(self, mapper: Domain, granter_id: int, gref: int, readonly: bool) -> tuple[int, Domain | None, int]:
        granter = self.domains.get(granter_id)
        if granter is None or granter.state != "running" or granter is mapper:
            return GNTST.bad_domain, None, 0
        if not 0 <= gref < self.limits.grant_entries:
            return GNTST.bad_gntref, None, 0
        frame = ffi.new("uint32_t *")
        status = lib.rf_grant_pin(granter.entry(gref), mapper.domid, int(readonly), frame)
        if status:
            return status, None, 0
        counts = granter.pins.setdefault(gref, [0, 0])
        counts[0] += 1
        counts[1] += 0 if readonly else 1
        return GNTST.okay, granter, frame[0]

    def _unpin_mapping(self, mapping: _Mapping) -> None:
        if self._granter_alive(mapping):
            self._unpin(mapping.granter.domid, mapping.gref, mapping.readonly)

    def _granter_alive(self, mapping: _Mapping) -> bool:
        return self.domains.get(mapping.granter.domid) is mapping.granter

    def _unpin(self, granter_id: int, gref: int, readonly: bool) -> None:
        granter = self.domains.get(granter_id)
        if granter is None or gref not in granter.pins:
            return
        counts = granter.pins[gref]
        counts[0] -= 1
        counts[1] -= 0 if readonly else 1
        lib.rf_grant_unpin(granter.entry(gref), int(counts[0] == 0), int(counts[1] == 0))
        if counts[0] == 0:
            del granter.pins[gref]

    def _map(self, mapper: Domain, msg: P.Message,
             items: list[tuple[int, bool, int]]) -> tuple[bytes, list[int]]:
        results: list[tuple[int, int]] = []
        fds: list[int] = []
        for granter_id, readonly, gref in items:
            if len(mapper.maptrack) >= self.limits.maptrack:
                results.append((self._grant_error(GNTST.no_space), 0))
                continue
            status, granter, frame = self._pin(mapper, granter_id, gref, readonly)
            if status:
                results.append((self._grant_error(status), 0))
                continue
            assert granter is not None
            fd = self._page_fd(granter, frame)
            if fd is not None and readonly:
                # A read-only open of the same page: mmap(PROT_WRITE, MAP_SHARED) fails on it.
                ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                os.close(fd)
                fd = ro
            if fd is None:
                self._unpin(granter_id, gref, readonly)
                results.append((self._grant_error(GNTST.bad_page), 0))
                continue
            handle = mapper.next_handle
            mapper.next_handle += 1
            mapper.maptrack[handle] = _Mapping(granter, gref, readonly, _file_id(fd))
            fds.append(fd)
            results.append((GNTST.okay, handle))
            self._counters["maps"] += 1
        return P.reply(msg, 0, P.pack_items(P.MAP_RESULT, results)), fds

    def _unmap(self, mapper: Domain, msg: P.Message, handles: list[int]) -> bytes:
        # Whether a page is still in reach matters only while its granter lives and could
        # reuse it: a dead domain's pages go to no one (and a mapper unmapping the rings of
        # a domain just destroyed, as xenstored does, is spared the scan of its files).
        pinned = any(self._granter_alive(m) for m in map(mapper.maptrack.get, handles) if m is not None)
        reachable = _reachable_inodes(mapper.pid) if pinned else set()
        results = []
        for handle in handles:
            mapping = mapper.maptrack.get(handle)  # again: a handle may come twice
            if mapping is None:
                results.append((self._grant_error(GNTST.bad_handle),))
            elif mapping.inode in reachable and self._granter_alive(mapping):
                # Still mapped or still open: dropping the pin would let the granter reuse
                # a page this domain can still touch.
                results.append((self._grant_error(GNTST.general_error),))
            else:
                del mapper.maptrack[handle]
                self._unpin_mapping(mapping)
                self._counters["unmaps"] += 1
                results.append((GNTST.okay,))
        return P.reply(msg, 0, P.pack_items(P.STATUS, results))

    def _copy(self, caller: Domain, msg: P.Message, segments: list[P.CopySegment]) -> bytes:
        statuses = [int(GNTST.okay)] * len(segments)
        pins: list[tuple[int, int, bool]] = []
        transient: dict[tuple[int, int], tuple[mmap.mmap, Any]] = {}
        remote_ops: list[tuple[int, Any, int, int, bool]] = []  # index, local ptr, addr, len, to_remote
        try:
            for i, seg in enumerate(segments):
                resolved = []
                for side, writing in ((seg.source, False), (seg.dest, True)):
                    if not side.is_gref:
                        resolved.append(None)
                        continue
                    if side.offset + seg.length > PAGE:
                        statuses[i] = GNTST.bad_copy_arg
                        break
                    status, granter, frame = self._pin(caller, side.domid, side.gref, not writing)
                    if status:
                        statuses[i] = status
                        break
                    assert granter is not None
                    pins.append((side.domid, side.gref, not writing))
                    ptr = self._frame_pointer(granter, frame, transient)
                    if ptr is None:
                        statuses[i] = GNTST.bad_page
                        break
                    resolved.append(ptr + side.offset)
                if statuses[i]:
                    continue
                src, dst = resolved
                if src is None and dst is None:
                    statuses[i] = GNTST.bad_copy_arg  # a copy must involve a grant
                elif src is not None and dst is not None:
                    ffi.memmove(dst, src, seg.length)
                elif caller.pid <= 0:
                    statuses[i] = GNTST.bad_virt_addr
                elif src is not None:
                    remote_ops.append((i, src, seg.dest.offset, seg.length, True))
                else:
                    remote_ops.append((i, dst, seg.source.offset, seg.length, False))
            if remote_ops:
                ops = ffi.new("rf_remote_copy[]", len(remote_ops))
                for k, (_, ptr, addr, length, to_remote) in enumerate(remote_ops):
                    ops[k].local, ops[k].remote, ops[k].len = ptr, addr, length
                    ops[k].to_remote = int(to_remote)
                lib.rf_remote_copy_batch(caller.pid, ops, len(remote_ops))
                for k, (i, *_rest) in enumerate(remote_ops):
                    if ops[k].status:
                        statuses[i] = GNTST.bad_virt_addr
        finally:
            for granter_id, gref, readonly in pins:
                self._unpin(granter_id, gref, readonly)
            for area, ptr in transient.values():
                ffi.release(ptr)
                area.close()
        for i, status in enumerate(statuses):
            if status:
                self._grant_error(status)
            else:
                self._counters["copies"] += 1
                self._counters["copy_bytes"] += segments[i].length
        return P.reply(msg, 0, P.pack_items(P.STATUS, [(s,) for s in statuses]))

    def _frame_pointer(self, granter: Domain, frame: int,
                       transient: dict[tuple[int, int], tuple[mmap.mmap, Any]]) -> Any:
        if frame < MAPPABLE_FRAME_BASE:
            if frame >= self.limits.ram_pages or granter.ram_ptr is None:
                return None
            return granter.ram_ptr + frame * PAGE
        key = (granter.domid, frame)
        if key not in transient:
            fd = self._page_fd(granter, frame)
            if fd is None:
                return None
            try:
                area = mmap.mmap(fd, PAGE)
            finally:
                os.close(fd)
            transient[key] = (area, ffi.from_buffer(area))
        return transient[key][1]

    # ---- event channels ---------------------------------------------------------------
    def _new_port(self, domain: Domain) -> int | None:
        if len(domain.ports) >= self.limits.ports:
            return None
        port = 1
        while port in domain.ports:
            port += 1
        return port

    def _alloc_unbound(self, domain: Domain, msg: P.Message, remote: int) -> tuple[bytes, list[int]]:
        unbound = sum(1 for c in domain.ports.values() if c.held is not None)
        port = self._new_port(domain)
        if (port is None or unbound >= self.limits.unbound_ports
                or self._unbound_held >= 4000):
            return P.reply(msg, -errno.ENOSPC), []
        if remote != 0 and remote not in self.domains:
            return P.reply(msg, -errno.ESRCH), []
        notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        wait = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        domain.ports[port] = _Channel(port, remote, held=(notify, wait))
        self._unbound_held += 1
        return P.reply(msg, 0, P.PORT.pack(port)), [os.dup(notify), os.dup(wait)]

    def _bind(self, domain: Domain, msg: P.Message, remote: int, remote_port: int) -> tuple[bytes, list[int]]:
        owner = self.domains.get(remote)
        channel = owner.ports.get(remote_port) if owner else None
        if channel is None or owner is domain:
            return P.reply(msg, -errno.EINVAL), []
        if channel.held is None or channel.remote != domain.domid:
            return P.reply(msg, -errno.EINVAL if channel.held is None else -errno.EACCES), []
        port = self._new_port(domain)
        if port is None:
            return P.reply(msg, -errno.ENOSPC), []
        owner_notifies, owner_waits = channel.held
        # The binder notifies what the owner waits on, and waits on what the owner notifies.
        fds = [os.dup(owner_waits), os.dup(owner_notifies)]
        if channel.remote == 0:
            # A channel opened for dom0 (the XenStore ring's) goes back to unbound when its
            # dom0 end closes, as Xen's evtchn_close, so a restarted xenstored binds it
            # again. Channels between domains are rebuilt by their drivers' handshake, and
            # keeping their eventfds would cost the daemon two fds each.
            channel.bound, channel.held, channel.bound_by = channel.held, None, domain
            self._unbound_held -= 1
        else:
            self._drop_held(channel)
        channel.peer_port = port
        domain.ports[port] = _Channel(port, remote, peer_port=remote_port, binder=True)
        self._counters["bound"] += 1
        return P.reply(msg, 0, P.PORT.pack(port)), fds

    def _drop_held(self, channel: _Channel) -> None:
        if channel.held is not None:
            for fd in channel.held:
                os.close(fd)
            channel.held = None
            self._unbound_held -= 1
        if channel.bound is not None:
            for fd in channel.bound:
                os.close(fd)
            channel.bound = None
        channel.bound_by = None

    def _owner_end(self, binder: Domain, channel: _Channel) -> _Channel | None:
        """The owner's end of the channel ``binder`` bound (``channel``, the binder's end), if
        it is still bound to it."""
        owner = self.domains.get(channel.remote)
        theirs = owner.ports.get(channel.peer_port) if owner is not None else None
        if theirs is None or theirs.bound_by is not binder or theirs.peer_port != channel.port:
            return None
        return theirs

    def _unbind(self, binder: Domain, channel: _Channel) -> None:
        """The binder's end is gone: the owner's end is unbound again, for the same remote."""
        theirs = self._owner_end(binder, channel)
        if theirs is None:
            return
        theirs.held, theirs.bound, theirs.bound_by, theirs.peer_port = theirs.bound, None, None, 0
        self._unbound_held += 1

    def _close_channel(self, domain: Domain, channel: _Channel) -> None:
        if channel.binder:
            self._unbind(domain, channel)
        self._drop_held(channel)

    def _close_all_ports(self, domain: Domain) -> None:
        for channel in domain.ports.values():
            self._close_channel(domain, channel)
        domain.ports.clear()

    def _close_port(self, domain: Domain, msg: P.Message, port: int) -> bytes:
        channel = domain.ports.pop(port, None)
        if channel is None:
            return P.reply(msg, -errno.EINVAL)
        self._close_channel(domain, channel)
        if port == domain.store_port:
            domain.store_port = 0
        return P.reply(msg, 0)


def _round_page(size: int) -> int:
    return (size + PAGE - 1) // PAGE * PAGE


def _file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _reachable_inodes(pid: int) -> set[tuple[int, int]]:
    """Files (device, inode) a process can still reach: its mappings and its open files."""
    inodes: set[tuple[int, int]] = set()
    if pid <= 0:
        return inodes
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) >= 5 and fields[4] != b"0":
                    major, minor = (int(x, 16) for x in fields[3].split(b":"))
                    inodes.add((os.makedev(major, minor), int(fields[4])))
        fd_dir = f"/proc/{pid}/fd"
        for name in os.listdir(fd_dir):
            try:
                st = os.stat(f"{fd_dir}/{name}")
                inodes.add((st.st_dev, st.st_ino))
            except OSError:
                pass
    except (FileNotFoundError, ProcessLookupError):
        pass
    return inodes
