"""Crash survival for xenstored: a snapshot plus an append-only journal in ``--state-dir``.

Every change is appended to the journal and made durable (``fdatasync``) before the reply
that reports it is queued, so whatever a client was told happened survives ``kill -9``. On
start the snapshot is loaded, the journal replayed (a torn last record is ignored: it was
never acknowledged), and a fresh snapshot written so the journal starts empty again. Records
are length-prefixed, CRC-checked ``marshal`` tuples: fast to load (10k nodes in a few ms).

The C engine that serves dom0's socket appends its own writes' records (``("S", path,
value)``: a new value for a node that exists) in the same format, before their replies.

Kept: the tree with permissions, introduced domains, and the watches of domain connections
(their owner is known by domid, so they are given back when the domain reconnects). Not
kept: dom0 socket clients' watches (a reconnecting socket client is a new client) and open
transactions (they end with EAGAIN, and clients retry).
"""
from __future__ import annotations

import logging
import marshal
import os
import struct
import zlib
from typing import Any

from ringfence.xenbus.store import Node, Store, parent_of

log = logging.getLogger(__name__)

SNAPSHOT, JOURNAL = "xenstore.snapshot", "xenstore.journal"
RECORD = struct.Struct("<II")  # length, crc32
VERSION = 1
COMPACT_AFTER = 100_000        # journal records before a new snapshot is written


def _frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return RECORD.pack(len(data), zlib.crc32(data)) + data


def _records(blob: bytes) -> list[Any]:
    out, offset = [], 0
    while offset + RECORD.size <= len(blob):
        length, crc = RECORD.unpack_from(blob, offset)
        data = blob[offset + RECORD.size: offset + RECORD.size + length]
        if len(data) < length or zlib.crc32(data) != crc:
            break  # torn tail: never acknowledged
        out.append(marshal.loads(data))
        offset += RECORD.size + length
    return out


class Journal:
    """Every change is written to the journal before its reply is sent, so a restarted
    daemon (kill -9, crash) finds it: the kernel holds the write. With ``fsync`` each write
    is also flushed to the disk, for a state directory that must outlive the host itself;
    guests do not outlive their host, so by default it is not (a flush costs a disk round
    trip per change)."""

    def __init__(self, directory: str, server: Any, *, fsync: bool = False) -> None:
        self.directory = directory
        self.server = server
        self.fsync = fsync
        self.fd = -1
        self.records = 0
        self.restore_ms = 0.0
        self.syncs = 0

    @classmethod
    def open(cls, directory: str, server: Any, *, fsync: bool = False) -> Journal:
        import time
        journal = cls(directory, server, fsync=fsync)
        started = time.perf_counter()
        journal._load()
        journal.restore_ms = (time.perf_counter() - started) * 1000
        journal._compact()
        server.journal = journal
        server.restored = True
        log.info("xenstore restored", extra={"kv": {"nodes": len(server.store.nodes),
                                                   "ms": round(journal.restore_ms, 1)}})
        return journal

    # ---- loading ---------------------------------------------------------------------
    def _load(self) -> None:
        store: Store = self.server.store
        for name in (SNAPSHOT, JOURNAL):
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                continue
            for record in _records(blob):
                self._apply(store, record)
        store.nodes.setdefault("/", Node(b"", ((0, "n"),)))
        # children lists and ownership counts follow from the paths
        for node in store.nodes.values():
            node.children = ()
        store._relink()
        store.owned.clear()
        for node in store.nodes.values():
            store.owned[node.owner] += 1

    def _apply(self, store: Store, record: tuple[Any, ...]) -> None:
        kind = record[0]
        if kind == "V":
            if record[1] != VERSION:
                raise RuntimeError(f"state directory has version {record[1]}, expected {VERSION}")
        elif kind == "N":  # bulk nodes (snapshot)
            for path, value, perms in record[1]:
                store.nodes[path] = Node(value, tuple(tuple(p) for p in perms))
        elif kind == "P":
            _, path, value, perms = record
            perms = tuple(tuple(p) for p in perms)
            store.nodes[path] = Node(value, perms)
            # parents the write implied, as the store created them: empty, same permissions
            parent = parent_of(path)
            while parent != "/" and parent not in store.nodes:
                store.nodes[parent] = Node(b"", perms)
                parent = parent_of(parent)
        elif kind == "S":  # a new value for a node that exists (the C engine's writes)
            node = store.nodes.get(record[1])
            if node is not None:
                store.nodes[record[1]] = Node(record[2], node.perms)
        elif kind == "D":
            path = record[1]
            prefix = path + "/"
            for key in [k for k in store.nodes if k == path or k.startswith(prefix)]:
                del store.nodes[key]
        elif kind == "I":
            self.server.domains[record[1]] = dict(record[2])
        elif kind == "R":
            self.server.domains.pop(record[1], None)
            self.server.saved_watches.pop(record[1], None)
        elif kind == "W":
            self.server.saved_watches.setdefault(record[1], []).append((record[2], record[3]))
        elif kind == "U":
            watches = self.server.saved_watches.get(record[1], [])
            if (record[2], record[3]) in watches:
                watches.remove((record[2], record[3]))

    # ---- writing ---------------------------------------------------------------------
    def _compact(self) -> None:
        store: Store = self.server.store
        nodes = [(path, n.value, n.perms) for path, n in store.nodes.items()]
        parts = [_frame(("V", VERSION)), _frame(("N", nodes))]
        parts += [_frame(("I", domid, info)) for domid, info in self.server.domains.items()]
        for domid, watches in self.server.saved_watches.items():
            parts += [_frame(("W", domid, path, token)) for path, token in watches]
        tmp = os.path.join(self.directory, SNAPSHOT + ".new")
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, SNAPSHOT))
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(os.path.join(self.directory, JOURNAL),
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._tell_engine()
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.records = 0

    def append(self, records: list[tuple[Any, ...]]) -> None:
        """Make records durable now (before the caller replies)."""
        if not records or self.fd < 0:  # nothing to do, or shutting down
            return
        os.write(self.fd, b"".join(_frame(r) for r in records))
        if self.fsync:
            os.fdatasync(self.fd)
            self.syncs += 1
        self.records += len(records)
        if self.records > COMPACT_AFTER:
            self._compact()

    def nodes_changed(self, changes: list[tuple[str, bool]]) -> None:
        # Children lists follow from the paths at load time, so each changed node is enough
        # (the parents a write implied are created again when it is loaded).
        nodes = self.server.store.nodes
        records: list[tuple[Any, ...]] = []
        for path, removed in changes:
            node = None if removed else nodes.get(path)
            records.append(("D", path) if node is None else ("P", path, node.value, node.perms))
        self.append(records)

    def _tell_engine(self) -> None:
        """The C engine appends dom0's writes here too (hypervisor/csrc/xsd.c)."""
        engine = getattr(self.server, "engine", None)
        if engine is not None:
            engine.set_journal(self)

    def count_engine_records(self, count: int) -> None:
        self.records += count
        if self.records > COMPACT_AFTER:
            self._compact()

    def close(self) -> None:
        if self.fd >= 0:
            with self.server.locked():  # not while the engine writes
                os.close(self.fd)
                self.fd = -1
                self._tell_engine()
