"""The XenStore daemon: connections, request dispatch and watches, over trio.

Transports: a Unix socket for dom0 tools (``XENSTORED_PATH``; every connection there is
privileged, domid 0) and one socket per sim domain handed over by the hypervisor with the
domid it vouches for (:meth:`XenStoreServer.serve_domain_connection`). The tree itself is the
sans-IO :class:`~ringfence.xenbus.store.Store`.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from ringfence._rawsock import RawSocket
from ringfence._unixsock import listen_unix

from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.xs_wire import Op, XenStoreError
from ringfence.xenbus.store import (Caller, Quotas, Store, Transaction, canonical, domain_path,
                                    format_perms, parse_perms)

log = logging.getLogger(__name__)

MAX_QUEUED_OUTPUT = 1 << 20  # a client that reads nothing for this long is dropped
# Conflict credit (XSA-206, oxenstored's conflict-burst-limit): a guest whose writes make
# another domain's transaction fail waits before it is served again, twice as long at each
# repeat within STRIKES_FORGOTTEN seconds, so that dom0's transactions commit.
PENALTY_FIRST, PENALTY_MAX, STRIKES_FORGOTTEN = 0.01, 1.0, 5.0
MAX_TRACKED_WRITERS = 100_000
PATH_CACHE = 4096
INTRODUCE, RELEASE = "@introduceDomain", "@releaseDomain"
_watch_ids = itertools.count(1)


@dataclass(eq=False)
class Watch:
    connection: Connection
    path: str       # as registered (relative paths fire relative events)
    absolute: str
    token: bytes
    id: int = field(default_factory=lambda: next(_watch_ids))


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    connections: int
    connections_total: int
    requests: int
    errors: int
    watches: int
    watch_events: int
    transactions_open: int
    conflicts: int
    nodes: int
    protocol_violations: int
    dropped_slow_clients: int
    domains: int
    conflicts_charged: int  # transactions failed by a guest's writes, charged to that guest
    injected_faults: dict[str, int]  # faults the harness asked for (XS_CONTROL inject), made


INJECTABLE = ("eagain", "lose-watch")  # XS_CONTROL inject: faults of a domain's requests
REPLY_CHUNK = 8  # replies per write to a dom0 client (see _reader)

class _StreamTransport:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def recv(self) -> bytes:
        return await self.stream.receive_some(65536)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def transport_for(link: Any) -> RawSocket | _StreamTransport:
    if isinstance(link, trio.SocketStream):
        return RawSocket(link.socket)
    if isinstance(link, trio.abc.Stream):
        return _StreamTransport(link)
    return RawSocket(link)


@dataclass(eq=False)
class Connection:
    server: XenStoreServer
    caller: Caller
    transport: Any
    name: str
    watches: list[Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    closed: bool = False
    out: bytearray = field(default_factory=bytearray)
    flushing: bool = False

    def __post_init__(self) -> None:
        self.wake = trio.Event()

    def queue(self, data: bytes) -> None:
        """Queue output; replies go out when the request batch is done, events at once."""
        if self.closed:
            return
        self.out += data
        if len(self.out) > MAX_QUEUED_OUTPUT:
            self.server.counters["dropped_slow_clients"] += 1
            log.warning("dropping a client that does not read", extra={"kv": {"conn": self.name}})
            self.out.clear()  # the memory goes now, not when its tasks notice
            self.close()
            return
        current = self.server.current
        if current is None:
            self.server.in_loop(self.wake.set)  # not inside a request batch: the writer sends it
        elif current is not self:
            self.server.dirty.add(self)  # sent when the batch ends

    async def flush(self) -> None:
        if self.flushing:
            return  # the running flush picks up what was added
        self.flushing = True
        try:
            while self.out and not self.closed:
                data = bytes(self.out)
                del self.out[:len(data)]  # not clear(): the engine's thread may have added more
                await self.transport.send(data)
        finally:
            self.flushing = False

    def flush_nowait(self) -> None:
        """Push queued output (watch events) straight out if the socket takes it, so a
        watcher hears at once; what is left goes to this connection's writer task."""
        if self.flushing or not self.out or self.closed:
            return
        sender = getattr(self.transport, "send_nowait", None)
        if sender is not None:
            try:
                sent = sender(bytes(self.out))
            except OSError:
                sent = 0
            del self.out[:sent]
        if self.out:
            self.wake.set()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.in_loop(self.wake.set)


class XenStoreServer:
    def __init__(self, quotas: Quotas | None = None, store: Store | None = None) -> None:
        self.store = store or Store(quotas)
        self.connections: set[Connection] = set()
        self.watches: list[Watch] = []
        self._watches_by_path: dict[str, list[Watch]] = {}  # absolute path -> its watches
        self.domains: dict[int, dict[str, int]] = {}  # introduced domains: mfn, port, target
        self.counters: Counter[str] = Counter()
        self.faults: Counter[tuple[str, int]] = Counter()  # (kind, domid): how many more to make
        self.current: Connection | None = None  # whose requests are being handled
        self.dirty: set[Connection] = set()     # others with output queued meanwhile
        self._journal: Any = None  # set by persistence.Journal.open()
        self.restored = False
        # watches of domain connections, by domid, given back when a domain reconnects
        self.saved_watches: dict[int, list[tuple[str, bytes]]] = {}
        self.writers: dict[str, int] = {}  # the guest that last changed a node
        self._paths: dict[tuple[int, bytes, bool], str | tuple[str, str]] = {}  # see _canonical
        self.penalties: dict[int, tuple[float, int]] = {}  # domid -> (served again at, strikes)
        # dom0's connections are served by the C engine's thread (engine.py): everything
        # that handles requests or changes the daemon's state holds this lock.
        self.lock = threading.RLock()
        self._lock_depth = 0
        self.engine: Any = None
        self._loop: tuple[int, trio.lowlevel.TrioToken] | None = None

    @property
    def journal(self) -> Any:
        return self._journal

    @journal.setter
    def journal(self, journal: Any) -> None:
        with self.locked():
            self._journal = journal
            if self.engine is not None:
                self.engine.reload()  # a journal restores nodes straight into the tree
                self.engine.set_journal(journal)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the daemon's state: no other thread handles a request meanwhile, and the
        engine makes no write (those it made before are in the tree first)."""
        with self.lock:
            self._lock_depth += 1
            engine = self.engine if self._lock_depth == 1 else None
            try:
                if engine is not None:
                    engine.enter()
                yield
            finally:
                self._lock_depth -= 1
                if engine is not None:
                    engine.leave()

    # ---- statistics ------------------------------------------------------------------
    def statistics(self) -> ServerStatistics:
        c = self.counters
        stats = self.engine.statistics() if self.engine is not None else None

        def engine(name: str) -> int:  # what the engine counted itself (none without it)
            return getattr(stats, name, 0)
        return ServerStatistics(
            len(self.connections), c["connections"],
            c["requests"] + engine("fast_reads") + engine("fast_writes"),
            c["errors"], len(self.watches), c["watch_events"] + engine("watch_events"),
            len(self.store.transactions) + engine("transactions_open"),
            self.store.counters["conflicts"] + engine("conflicts"), len(self.store.nodes),
            c["protocol_violations"] + engine("protocol_violations"),
            c["dropped_slow_clients"] + engine("dropped_slow_clients"),
            len(self.domains), c["conflicts_charged"],
            {kind: c[f"injected {kind}"] for kind in INJECTABLE if c[f"injected {kind}"]})

    # ---- transports ------------------------------------------------------------------
    async def serve_unix(self, path: str, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve dom0 tools on ``path`` (mode 0600: only dom0 may connect), through the C
        engine's thread."""
        from ringfence.xenbus.engine import Dom0Engine  # it builds on this module
        sock = await listen_unix(path, backlog=128)
        self._loop = (threading.get_ident(), trio.lowlevel.current_trio_token())
        try:
            engine = Dom0Engine(self, sock.fileno())
            try:
                engine.start()
                task_status.started()
                await trio.sleep_forever()
            finally:
                engine.stop()
        finally:
            self._loop = None  # its trio run ends with it
            sock.close()

    def in_loop(self, function: Any) -> None:
        """Run ``function`` on trio's thread: at once if this is it, else soon."""
        if self._loop is None or self._loop[0] == threading.get_ident():
            function()
        else:
            self._loop[1].run_sync_soon(function)

    async def serve_domain_connection(self, link: Any, domid: int) -> None:
        """A domain's connection (a socket or a stream); its identity comes from whoever
        handed it to us (the hypervisor), never from the domain."""
        await self.serve_connection(link, Caller(domid, self.domains.get(domid, {}).get("target")),
                                    f"dom{domid}")

    async def serve_connection(self, link: Any, caller: Caller, name: str) -> None:
        conn = Connection(self, caller, transport_for(link), name)
        with self.locked():
            self.connections.add(conn)
            if caller.domid and caller.domid in self.saved_watches:
                # A domain reconnecting after a daemon restart gets its watches back, and
                # each fires once, as on registration, so it re-reads what it watches.
                for raw, token in self.saved_watches.pop(caller.domid):
                    with contextlib.suppress(XenStoreError):
                        self._watch(conn, raw, token)
            self.counters["connections"] += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn, nursery.cancel_scope)
                await self._reader(conn)
                nursery.cancel_scope.cancel()
        finally:
            with self.locked():
                self._drop(conn)
            await conn.transport.aclose()

    async def _reader(self, conn: Connection) -> None:
        reader = W.MessageReader()
        while not conn.closed:
            penalty = self.penalties.get(conn.caller.domid)
            if penalty is not None and penalty[0] > time.monotonic():
                await trio.sleep(penalty[0] - time.monotonic())
            try:
                data = await conn.transport.recv()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            try:
                messages = reader.feed(data)
            except W.ProtocolViolation as exc:
                self.counters["protocol_violations"] += 1
                log.warning("closing connection: protocol violation",
                            extra={"kv": {"conn": conn.name, "reason": str(exc)}})
                return
            # A guest has at most `outstanding` requests answered and not yet sent (the C
            # daemon's quota, 20): its next ones wait until its socket takes those replies,
            # so a guest that never reads holds a bounded amount of the daemon's memory.
            # dom0's replies go out REPLY_CHUNK at a time: a client with many requests in
            # flight starts on the first answers while the daemon works on the rest (one
            # write for a whole batch left both sides taking turns: 20 % fewer reads/s).
            step = max(REPLY_CHUNK if conn.caller.privileged else self.store.quotas.outstanding, 1)
            for start in range(0, len(messages), step):
                self.handle_batch(conn, messages[start:start + step])
                if conn.closed:
                    return
                # then all replies to this batch in one write (a client that does not read
                # stalls only itself)
                try:
                    await conn.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return

    async def _writer(self, conn: Connection, scope: trio.CancelScope) -> None:
        """Sends what other connections cause (watch events) while this one is idle."""
        try:
            while not conn.closed:
                await conn.wake.wait()
                conn.wake = trio.Event()
                await conn.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    def _drop(self, conn: Connection) -> None:
        conn.close()
        self.connections.discard(conn)
        if self.journal is not None and conn.caller.domid and conn.watches:
            self.journal.append([("U", conn.caller.domid, w.path, w.token) for w in conn.watches])
        self._drop_watches(lambda w: w.connection is conn)
        for tx in conn.transactions.values():
            self.store.end_transaction(tx, commit=False)
        conn.transactions.clear()

    # ---- dispatch --------------------------------------------------------------------
    def handle_batch(self, conn: Connection, messages: list[W.Message]) -> None:
        """Handle requests in order, then send the watch events they caused to the other
        connections at once, so watchers hear as early as possible."""
        with self.locked():
            self.current = conn
            try:
                for msg in messages:
                    self.handle(conn, msg)
                    if conn.closed:
                        break
            finally:
                self.current = None
                self._publish_values()
            dirty, self.dirty = self.dirty, set()
        for other in dirty:
            self.in_loop(other.flush_nowait)

    def _publish_values(self) -> None:
        """Give the engine the nodes' new values (one batch: a transaction's commit is seen
        whole or not at all)."""
        changes = self.store.value_log
        if changes:
            self.store.value_log = []
            self.engine.publish(changes)

    def handle(self, conn: Connection, msg: W.Message) -> None:
        self.counters["requests"] += 1
        try:
            if msg.type == Op.READ and not msg.tx_id:
                # Most requests are plain reads: answered without the general dispatch.
                raw_path = msg.payload[:-1] if msg.payload.endswith(b"\0") else msg.payload
                reply_type, payload = Op.READ, self.store.read(
                    conn.caller, self._canonical(conn.caller, raw_path))
            else:
                reply_type, payload = self._dispatch(conn, msg)
        except XenStoreError as exc:
            self.counters["errors"] += 1
            reply_type, payload = Op.ERROR, W.error_payload(exc.name)
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            self.counters["errors"] += 1
            log.debug("bad request", extra={"kv": {"conn": conn.name, "error": exc}})
            reply_type, payload = Op.ERROR, W.error_payload("EINVAL")
        conn.queue(W.encode(reply_type, msg.req_id, msg.tx_id, payload))

    def _canonical(self, caller: Caller, raw: bytes, special: bool = False) -> str:
        """:func:`canonical` of a request's path, remembered: the same few paths come back
        all the time, and checking one costs more than the read it names."""
        key = (caller.domid, raw, special)
        cached = self._paths.get(key)
        if cached is None:
            try:
                cached = canonical(caller, raw.decode("ascii"), allow_special=special)
            except XenStoreError as exc:
                cached = (exc.name, str(exc).partition(": ")[2])
            except UnicodeDecodeError:
                cached = ("EINVAL", "path not ASCII")
            if len(raw) <= 256:  # memory: a hostile client's long paths are not kept
                if len(self._paths) >= PATH_CACHE:
                    self._paths.clear()
                self._paths[key] = cached
        if isinstance(cached, tuple):
            raise XenStoreError(*cached)
        return cached

    def _dispatch(self, conn: Connection, msg: W.Message) -> tuple[int, bytes]:
        op, caller, store = msg.type, conn.caller, self.store
        args = msg.args()
        tx = None
        if msg.tx_id and op not in (Op.TRANSACTION_END,):
            tx = conn.transactions.get(msg.tx_id) or self._adopt(conn, msg.tx_id)
            if tx is None:
                # after a restart, transactions from before it are over: retry
                raise XenStoreError("EAGAIN" if self.restored else "ENOENT", "no such transaction")

        def path(i: int = 0, special: bool = False) -> str:
            return self._canonical(caller, args[i], special)

        if op == Op.READ:
            return op, store.read(caller, path(), tx)
        if op == Op.WRITE:
            # The value is everything after the path's NUL, NULs included.
            raw_path, _, value = msg.payload.partition(b"\0")
            target = self._canonical(caller, raw_path)
            self._changed(store.write(caller, target, value, tx), conn)
            return op, b"OK\0"
        if op == Op.MKDIR:
            self._changed(store.mkdir(caller, path(), tx), conn)
            return op, b"OK\0"
        if op == Op.RM:
            self._changed(store.rm(caller, path(), tx), conn)
            return op, b"OK\0"
        if op == Op.DIRECTORY:
            return op, b"".join(c.encode() + b"\0" for c in store.directory(caller, path(), tx))
        if op == Op.DIRECTORY_PART:
            return op, self._directory_part(caller, path(), int(args[1]), tx)
        if op == Op.GET_PERMS:
            return op, format_perms(store.get_perms(caller, path(), tx))
        if op == Op.SET_PERMS:
            self._changed(store.set_perms(caller, path(), parse_perms(args[1:]), tx), conn)
            return op, b"OK\0"
        if op == Op.WATCH:
            self._watch(conn, args[0].decode("ascii"), args[1] if len(args) > 1 else b"")
            return op, b"OK\0"
        if op == Op.UNWATCH:
            self._unwatch(conn, args[0].decode("ascii"), args[1] if len(args) > 1 else b"")
            return op, b"OK\0"
        if op == Op.RESET_WATCHES:
            self._drop_watches(lambda w: w.connection is conn)
            conn.watches.clear()
            return op, b"OK\0"
        if op == Op.TRANSACTION_START:
            if msg.tx_id:
                raise XenStoreError("EBUSY", "nested transaction")
            new = store.start_transaction(caller)
            conn.transactions[new.id] = new
            return op, f"{new.id}".encode() + b"\0"
        if op == Op.TRANSACTION_END:
            ending = conn.transactions.pop(msg.tx_id, None)
            if ending is None and self._adopt(conn, msg.tx_id) is not None:
                ending = conn.transactions.pop(msg.tx_id)
            if ending is None:
                raise XenStoreError("EAGAIN" if self.restored else "ENOENT", "no such transaction")
            if not args or args[0] not in (b"T", b"F"):
                store.end_transaction(ending, commit=False)
                raise XenStoreError("EINVAL")
            if args[0] == b"T" and self._fault_due("eagain", caller.domid):
                store.end_transaction(ending, commit=False)
                raise XenStoreError("EAGAIN", "injected")
            try:
                self._changed(store.end_transaction(ending, commit=args[0] == b"T"), conn)
            except XenStoreError:
                if ending.conflict is not None:
                    self._charge_conflict(self.writers.get(ending.conflict), caller)
                raise
            return op, b"OK\0"
        if op == Op.GET_DOMAIN_PATH:
            return op, domain_path(_domid(args[0])).encode() + b"\0"
        if op == Op.IS_DOMAIN_INTRODUCED:
            self._privileged(caller)
            return op, b"T\0" if _domid(args[0]) in self.domains or _domid(args[0]) == 0 else b"F\0"
        if op == Op.INTRODUCE:
            self._privileged(caller)
            domid = _domid(args[0])
            self.introduce_domain(domid, mfn=int(args[1]), port=int(args[2]))
            return op, b"OK\0"
        if op == Op.RELEASE:
            self._privileged(caller)
            domid = _domid(args[0])
            if domid not in self.domains:
                raise XenStoreError("ENOENT")
            self.release_domain(domid)
            return op, b"OK\0"
        if op == Op.RESUME:
            self._privileged(caller)
            if _domid(args[0]) not in self.domains:
                raise XenStoreError("ENOENT")
            return op, b"OK\0"
        if op == Op.SET_TARGET:
            self._privileged(caller)
            domid, target = _domid(args[0]), _domid(args[1])
            if domid not in self.domains:
                raise XenStoreError("ENOENT")
            self.domains[domid]["target"] = target
            return op, b"OK\0"
        if op == Op.CONTROL:
            self._privileged(caller)
            return op, self._control(args)
        if op in (Op.GET_QUOTA, Op.SET_QUOTA):
            self._privileged(caller)
            return op, self._quota(op == Op.SET_QUOTA, args)
        if op in (Op.GET_FEATURE, Op.SET_FEATURE):
            self._privileged(caller)
            return op, b"0\0" if op == Op.GET_FEATURE else b"OK\0"
        raise XenStoreError("ENOSYS")  # as Xen's C daemon answers any unknown type

    def _adopt(self, conn: Connection, tx_id: int) -> Transaction | None:
        """A transaction the engine started and cannot go on with, from now on ours."""
        if self.engine is None:
            return None
        return self.engine.adopt(conn, tx_id)

    @staticmethod
    def _privileged(caller: Caller) -> None:
        if not caller.privileged:
            raise XenStoreError("EACCES")

    def _directory_part(self, caller: Caller, path: str, offset: int, tx: Transaction | None) -> bytes:
        children = self.store.directory(caller, path, tx)
        gen = self.store.generation(caller, path, tx)
        blob = b"".join(c.encode() + b"\0" for c in children)
        if offset > len(blob):
            raise XenStoreError("EINVAL")
        head = f"{gen}".encode() + b"\0"
        room = W.PAYLOAD_MAX - len(head) - 1
        chunk = blob[offset:offset + room]
        if offset + room < len(blob):  # cut at a child boundary
            chunk = chunk[:chunk.rfind(b"\0") + 1]
            return head + chunk
        return head + chunk + b"\0"

    def _control(self, args: list[bytes]) -> bytes:
        command = args[0].decode() if args else "help"
        if command == "quota":
            return self._quota(len(args) > 2, args[1:])
        if command == "check":
            return b"OK\0"
        if command == "inject":
            return self._inject(args[1:])
        if command == "help":
            return (b"check\nquota [name [value]]\ninject [eagain|lose-watch DOMID COUNT]\n"
                    b"help\n\0")
        raise XenStoreError("EINVAL", f"unknown control command {command}")

    def _inject(self, args: list[bytes]) -> bytes:
        """``inject KIND DOMID COUNT``: the next COUNT transaction commits of a domain's fail
        with EAGAIN (``eagain``), or its next COUNT watch events are lost (``lose-watch``);
        without arguments, what is still to be made. Dom0's own requests are never taken
        (its daemons and tools are not what is tested)."""
        if not args:
            return "".join(f"{kind} {domid} {left}\n" for (kind, domid), left in sorted(self.faults.items())
                           if left).encode() + b"\0"
        try:
            kind, domid, count = args[0].decode(), _domid(args[1]), int(args[2])
        except (IndexError, ValueError, UnicodeDecodeError):
            raise XenStoreError("EINVAL", "inject KIND DOMID COUNT") from None
        if kind not in INJECTABLE or domid == 0 or not 0 <= count <= 1_000_000:
            raise XenStoreError("EINVAL", f"inject {' | '.join(INJECTABLE)} DOMID (not 0) COUNT")
        self.faults[(kind, domid)] = count
        log.warning("fault injection", extra={"kv": {"fault": kind, "domid": domid, "count": count}})
        return b"OK\0"

    def _quota(self, setting: bool, args: list[bytes]) -> bytes:
        names = {"nodes": "nodes", "watches": "watches", "transactions": "transactions",
                 "node-size": "node_size", "outstanding": "outstanding", "permissions": "permissions"}
        quotas = self.store.quotas
        if not args:
            return " ".join(f"{k}={getattr(quotas, v)}" for k, v in names.items()).encode() + b"\0"
        key = args[0].decode()
        if key not in names:
            raise XenStoreError("EINVAL", "unknown quota")
        if setting:
            from dataclasses import replace
            self.store.quotas = replace(quotas, **{names[key]: int(args[1])})
            return b"OK\0"
        return f"{getattr(quotas, names[key])}".encode() + b"\0"

    # ---- watches ---------------------------------------------------------------------
    def _watch(self, conn: Connection, raw: str, token: bytes) -> None:
        absolute = canonical(conn.caller, raw, allow_special=True)
        if any(w.path == raw and w.token == token for w in conn.watches):
            raise XenStoreError("EEXIST")
        if not conn.caller.privileged and len(conn.watches) >= self.store.quotas.watches:
            raise XenStoreError("E2BIG", "too many watches")
        watch = Watch(conn, raw, absolute, token)
        conn.watches.append(watch)
        self.watches.append(watch)
        self._watches_by_path.setdefault(absolute, []).append(watch)
        if self.engine is not None:
            self.engine.watch_added(watch)
        if self.journal is not None and conn.caller.domid:
            self.journal.append([("W", conn.caller.domid, raw, token)])
        self._fire_one(watch, raw)  # the initial event every watch gets

    def _drop_watches(self, which: Any) -> None:
        keep = []
        for watch in self.watches:
            if which(watch):
                self._forget(watch)
            else:
                keep.append(watch)
        self.watches = keep

    def _unwatch(self, conn: Connection, raw: str, token: bytes) -> None:
        for watch in conn.watches:
            if watch.path == raw and watch.token == token:
                conn.watches.remove(watch)
                self.watches.remove(watch)
                self._forget(watch)
                if self.journal is not None and conn.caller.domid:
                    self.journal.append([("U", conn.caller.domid, raw, token)])
                return
        raise XenStoreError("ENOENT")

    def _charge_conflict(self, writer: int | None, victim: Caller) -> None:
        if writer is None or writer == victim.domid:
            return
        now = time.monotonic()
        until, strikes = self.penalties.get(writer, (now, 0))
        strikes = strikes + 1 if now - until < STRIKES_FORGOTTEN else 1
        self.penalties[writer] = (now + min(PENALTY_FIRST * 2 ** (strikes - 1), PENALTY_MAX), strikes)
        self.counters["conflicts_charged"] += 1

    def _changed(self, changes: list[tuple[str, bool]], conn: Connection | None = None) -> None:
        self._publish_values()  # before any watch fires: a watcher may read at once
        if self.journal is not None and changes:
            self.journal.nodes_changed(changes)  # durable before the reply is queued
        if conn is not None and not conn.caller.privileged and changes:
            if len(self.writers) > MAX_TRACKED_WRITERS:
                self.writers.clear()  # attribution is best effort; memory is not
            for changed, _ in changes:
                self.writers[changed] = conn.caller.domid
        for changed, removed in changes:
            # A removal also fires the watches below it; anything else only those on the
            # path and its ancestors, looked up rather than scanned.
            for watch in self.watches if removed else self._watches_above(changed):
                target = watch.absolute
                if changed == target or changed.startswith(target + "/") or (
                        removed and target.startswith(changed + "/")):
                    # a removed ancestor takes the watched node with it
                    event = changed if changed.startswith(target) else target
                    if not watch.connection.caller.privileged:
                        node = self.store.nodes.get(event)
                        if node is not None and not self.store.can(watch.connection.caller, node, "r"):
                            continue
                    self._fire_one(watch, self._as_registered(watch, event))

    def _watches_above(self, path: str) -> list[Watch]:
        """The watches on ``path`` and on its ancestors, in registration order."""
        found: list[Watch] = []
        by_path = self._watches_by_path
        while True:
            found += by_path.get(path, ())
            if len(path) <= 1:
                break
            path = path.rsplit("/", 1)[0] or "/"
        if len(found) > 1:
            found.sort(key=lambda watch: watch.id)
        return found

    def _forget(self, watch: Watch) -> None:
        """A watch that went from self.watches leaves the index and the engine too."""
        same = self._watches_by_path.get(watch.absolute)
        if same is not None:
            same.remove(watch)
            if not same:
                del self._watches_by_path[watch.absolute]
        if self.engine is not None:
            self.engine.watch_removed(watch)

    @staticmethod
    def _as_registered(watch: Watch, absolute: str) -> str:
        if watch.path.startswith("/") or watch.path.startswith("@"):
            return absolute
        prefix = domain_path(watch.connection.caller.domid) + "/"
        return absolute[len(prefix):] if absolute.startswith(prefix) else absolute

    def _fire_one(self, watch: Watch, path: str) -> None:
        payload = path.encode() + b"\0" + watch.token + b"\0"
        if len(payload) > W.PAYLOAD_MAX:  # XSA-324: dropped, never sent oversized
            self.counters["watch_events_dropped"] += 1
            return
        if self._fault_due("lose-watch", watch.connection.caller.domid):
            return
        self.counters["watch_events"] += 1
        watch.connection.queue(W.encode(Op.WATCH_EVENT, 0, 0, payload))

    def _fault_due(self, kind: str, domid: int) -> bool:
        """Whether a fault the harness asked for (XS_CONTROL inject) takes this request or
        event of ``domid``'s."""
        if not self.faults[(kind, domid)]:
            return False
        self.faults[(kind, domid)] -= 1
        self.counters[f"injected {kind}"] += 1
        if not self.faults[(kind, domid)]:  # one line per injection, however many it takes
            log.warning("fault made", extra={"kv": {"fault": kind, "domid": domid}})
        return True

    def _fire_special(self, name: str) -> None:
        # Which domains come and go is dom0's business (XSA-115): an unprivileged watcher
        # gets only the initial event of its registration.
        for watch in self.watches:
            if watch.absolute == name and watch.connection.caller.privileged:
                self._fire_one(watch, name)

    # ---- domains ---------------------------------------------------------------------
    def introduce_domain(self, domid: int, *, mfn: int = 0, port: int = 0) -> None:
        if domid == 0:
            raise XenStoreError("EINVAL")
        with self.locked():
            self.domains[domid] = {"mfn": mfn, "port": port}
            if self.journal is not None:
                self.journal.append([("I", domid, self.domains[domid])])
            self._fire_special(INTRODUCE)

    def release_domain(self, domid: int) -> None:
        """The domain is gone: drop its connections, watches and transactions."""
        with self.locked():
            self.domains.pop(domid, None)
            for conn in list(self.connections):
                if conn.caller.domid == domid:
                    conn.close()
            self._drop_watches(lambda w: w.connection.caller.domid == domid)
            self.store.abort_all(domid)
            self.saved_watches.pop(domid, None)
            self.penalties.pop(domid, None)
            self.writers = {path: d for path, d in self.writers.items() if d != domid}
            changed = self.store.forget_domain(domid)
            if self.journal is not None:
                self.journal.nodes_changed([(path, False) for path in changed])
                self.journal.append([("R", domid)])
            self._fire_special(RELEASE)


def _domid(raw: bytes) -> int:
    value = int(raw)
    if not 0 <= value < 0x7FF0:
        raise XenStoreError("EINVAL", "bad domid")
    return value


__all__ = ["XenStoreServer", "Connection", "ServerStatistics"]
