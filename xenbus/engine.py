"""dom0's connections, served by the C engine (``hypervisor/csrc/xsd.c``).

The engine is a thread of the daemon's process that owns the dom0 Unix socket: it accepts
and frames messages, and answers dom0's two commonest requests itself, without Python:

- a plain read (no transaction, an absolute path that exists), from its copy of the values;
- a plain write of a node that exists, when every watch it fires is one of dom0's on the
  engine's own connections: the engine appends it to the daemon's journal (if one is kept,
  without ``--fsync``), changes its copy, sends the events and keeps the write for the daemon, which replays it into the tree the next time
  it enters it (:meth:`XenStoreServer.locked`). While the daemon is in the tree the engine
  writes nothing, so both see the writes in the same order.

Every other request goes to :meth:`XenStoreServer.handle` through a callback on the
engine's thread, inside ``server.locked()``, which the trio side holds around its own
handling too. Why: a trio wakeup costs about 45 us of CPU on these machines, a Python write
about 60 us, and Xen's C xenstored answers either in 12 us.

The copy of the values follows the store's ``value_log`` (every node's new value, as
``_put`` makes it), sent to the engine in one batch before watches fire and before a reply
goes, so a watcher that reads on an event sees the value that fired it.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ringfence.hypervisor._lib import ffi, lib
from ringfence.hypervisor.io import xs_wire as W
from ringfence.xenbus.server import MAX_QUEUED_OUTPUT, Connection, XenStoreServer
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.xenbus.store import Caller, Transaction

if TYPE_CHECKING:
    from ringfence.xenbus.server import Watch

log = logging.getLogger(__name__)

_RECORD = struct.Struct("<II")
_GONE = 0xFFFFFFFF
DOM0 = Caller(0)
_CLOSE_REASONS = {lib.RF_XSD_CLOSED_EOF: "eof", lib.RF_XSD_CLOSED_VIOLATION: "protocol violation",
                  lib.RF_XSD_CLOSED_SLOW: "does not read", lib.RF_XSD_CLOSED_BY_DAEMON: "closed"}


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    connections: int
    connections_total: int
    fast_reads: int        # answered in C
    forwarded: int         # handed to the Python daemon
    protocol_violations: int
    dropped_slow_clients: int
    values: int            # nodes in the engine's copy
    fast_writes: int       # made in C
    watch_events: int      # sent in C for them
    transactions_open: int  # the engine's own
    transactions: int      # committed in C
    conflicts: int         # of the engine's, failed with EAGAIN
    adopted: int           # handed to the daemon part way
    journal_records: int   # written by the engine


def encode_values(changes: list[tuple[str, bytes | None]]) -> bytes:
    """The engine's batch format: u32 path length, u32 value length (0xFFFFFFFF: gone),
    path, value."""
    parts = []
    for path, value in changes:
        raw = path.encode("ascii")
        if value is None:
            parts.append(_RECORD.pack(len(raw), _GONE) + raw)
        else:
            parts.append(_RECORD.pack(len(raw), len(value)) + raw + value)
    return b"".join(parts)


def decode_values(batch: bytes) -> list[tuple[str, bytes | None]]:
    """The records of a batch (in a transaction's log, None is a read)."""
    out, offset = [], 0
    while offset < len(batch):
        path_len, value_len = _RECORD.unpack_from(batch, offset)
        offset += _RECORD.size
        path = batch[offset:offset + path_len].decode("ascii")
        offset += path_len
        if value_len == _GONE:
            out.append((path, None))
        else:
            out.append((path, batch[offset:offset + value_len]))
            offset += value_len
    return out


@dataclass(eq=False)
class EngineConnection(Connection):
    """A dom0 connection whose bytes the engine moves: output goes straight to it."""
    engine: Any = None
    engine_id: int = 0

    def queue(self, data: bytes) -> None:
        if not self.closed:
            lib.rf_xsd_send(self.engine.c, self.engine_id, data, len(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            lib.rf_xsd_close(self.engine.c, self.engine_id)


class Dom0Engine:
    def __init__(self, server: XenStoreServer, listen_fd: int) -> None:
        self.server = server
        self._handle = ffi.new_handle(self)
        self.c = lib.rf_xsd_new(listen_fd, self._handle, MAX_QUEUED_OUTPUT)
        if self.c == ffi.NULL:
            raise OSError(ffi.errno, "cannot start the xenstored engine")
        self.connections: dict[int, EngineConnection] = {}
        self._inbox = ffi.new("uint8_t[]", 65536)  # the engine's writes, for enter()
        self.journal: Any = None

    def start(self) -> None:
        server = self.server
        with server.locked():
            server.store.value_log = []
            self.reload()
            for watch in server.watches:
                self.watch_added(watch)
            self.set_journal(server.journal)
            server.engine = self
        rc = lib.rf_xsd_start(self.c)
        if rc < 0:
            raise OSError(-rc, "cannot start the xenstored engine's thread")

    def stop(self) -> None:
        lib.rf_xsd_stop(self.c)  # joins the thread: no callback runs after this
        with self.server.locked():
            for conn in self.connections.values():
                conn.closed = True
                self.server._drop(conn)
            self.connections.clear()
            self.server.engine = None
            self.server.store.value_log = None
        lib.rf_xsd_free(self.c)
        self.c = ffi.NULL

    def reload(self) -> None:
        """Copy every node's value afresh (after the tree was loaded from a journal)."""
        lib.rf_xsd_clear_values(self.c)
        self.publish([(path, node.value) for path, node in self.server.store.nodes.items()])

    def publish(self, changes: list[tuple[str, bytes | None]]) -> None:
        batch = encode_values(changes)
        if lib.rf_xsd_apply(self.c, batch, len(batch)) < 0:
            raise MemoryError("xenstored engine: cannot copy the tree's values")

    def enter(self) -> None:
        """The daemon enters the tree: the engine's writes since last time go in first."""
        length = lib.rf_xsd_enter(self.c, self._inbox, len(self._inbox))
        if length < 0:
            self._inbox = ffi.new("uint8_t[]", -length * 2)
            length = lib.rf_xsd_enter(self.c, self._inbox, len(self._inbox))
        if length:
            store = self.server.store
            log, store.value_log = store.value_log, None  # the engine has these values
            try:
                for path, value in decode_values(ffi.buffer(self._inbox, length)[:]):
                    assert value is not None
                    store.write(DOM0, path, value)  # its watches fired in the engine
            finally:
                store.value_log = log
        if self.journal is not None:  # after the replay: a compaction's snapshot has them
            self.journal.count_engine_records(lib.rf_xsd_take_journaled(self.c))

    def adopt(self, conn: Connection, tx_id: int) -> Transaction | None:
        """Take over a transaction the engine started on ``conn`` (it asked for something
        the engine does not do): replay what it read and wrote into a transaction of the
        store's, which fails at commit if the engine saw a conflict."""
        if not isinstance(conn, EngineConnection) or conn.engine is not self:
            return None
        doomed = ffi.new("int *")
        length = lib.rf_xsd_adopt(self.c, conn.engine_id, tx_id, self._inbox, len(self._inbox), doomed)
        if length < 0:
            return None
        store = self.server.store
        tx = store.start_transaction(DOM0, tx_id)
        tx.doomed = bool(doomed[0])
        for path, value in decode_values(ffi.buffer(self._inbox, length)[:]):
            try:
                if value is None:
                    store.read(DOM0, path, tx)
                else:
                    store.write(DOM0, path, value, tx)
            except XenStoreError:
                tx.doomed = True  # gone since: the engine's view was stale
        conn.transactions[tx_id] = tx
        return tx

    def leave(self) -> None:
        lib.rf_xsd_leave(self.c)

    def allow_writes(self, allowed: bool) -> None:
        lib.rf_xsd_set_fast_writes(self.c, int(allowed))

    def set_journal(self, journal: Any) -> None:
        """Append the engine's writes to ``journal`` (a persistence.Journal, or None); with
        ``--fsync`` every write is the daemon's (the engine does not flush)."""
        self.journal = journal
        lib.rf_xsd_set_journal(self.c, journal.fd if journal is not None else -1)
        self.allow_writes(journal is None or (not journal.fsync and journal.fd >= 0))

    def watch_added(self, watch: Watch) -> None:
        conn = watch.connection
        own = isinstance(conn, EngineConnection) and conn.engine is self
        servable = own and conn.caller.privileged and watch.path == watch.absolute
        path = watch.absolute.encode("ascii")
        if lib.rf_xsd_watch(self.c, watch.id, conn.engine_id if own else 0, int(servable),
                            path, len(path), watch.token, len(watch.token)) < 0:
            raise MemoryError("xenstored engine: cannot copy a watch")

    def watch_removed(self, watch: Watch) -> None:
        lib.rf_xsd_unwatch(self.c, watch.id)

    def statistics(self) -> EngineStatistics:
        out = ffi.new("rf_xsd_stats *")
        lib.rf_xsd_statistics(self.c, out)
        return EngineStatistics(out.connections, out.connections_total, out.fast_reads,
                                out.forwarded, out.protocol_violations,
                                out.dropped_slow_clients, out.values, out.fast_writes,
                                out.watch_events, out.transactions_open, out.transactions,
                                out.conflicts, out.adopted, out.journal_records)

    # ---- called on the engine's thread -------------------------------------------------
    def opened(self, engine_id: int) -> None:
        server = self.server
        with server.locked():
            conn = EngineConnection(server, Caller(0), None, "dom0", engine=self, engine_id=engine_id)
            self.connections[engine_id] = conn
            server.connections.add(conn)
            server.counters["connections"] += 1

    def request(self, engine_id: int, data: bytes) -> None:
        """Requests the engine could not answer: whole messages back to back (it framed
        them, and checked their lengths), handled in order as one batch."""
        conn = self.connections.get(engine_id)
        if conn is None:
            return
        self.server.handle_batch(conn, W.MessageReader().feed(data))

    def closed(self, engine_id: int, reason: int) -> None:
        server = self.server
        with server.locked():
            conn = self.connections.pop(engine_id, None)
            if conn is None:
                return
            conn.closed = True
            # (counted by the engine, before the client could see the connection end)
            if reason == lib.RF_XSD_CLOSED_VIOLATION:
                log.warning("closing connection: protocol violation",
                            extra={"kv": {"conn": conn.name, "reason": "payload length over 4096"}})
            elif reason == lib.RF_XSD_CLOSED_SLOW:
                log.warning("dropping a client that does not read", extra={"kv": {"conn": conn.name}})
            server._drop(conn)


def _callback_failed(exc_type: type, exc: BaseException, tb: Any) -> None:
    log.error("xenstored engine callback failed", exc_info=(exc_type, exc, tb))


@ffi.def_extern(onerror=_callback_failed)
def rf_xsd_on_open(ctx: Any, engine_id: int) -> None:
    ffi.from_handle(ctx).opened(engine_id)


@ffi.def_extern(onerror=_callback_failed)
def rf_xsd_on_request(ctx: Any, engine_id: int, message: Any, length: int) -> None:
    ffi.from_handle(ctx).request(engine_id, ffi.buffer(message, length)[:])


@ffi.def_extern(onerror=_callback_failed)
def rf_xsd_on_close(ctx: Any, engine_id: int, reason: int) -> None:
    ffi.from_handle(ctx).closed(engine_id, reason)


__all__ = ["Dom0Engine", "EngineConnection", "EngineStatistics", "decode_values", "encode_values"]
