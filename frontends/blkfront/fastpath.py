"""blkfront's fast path: NBD requests from the socket to the rings and back in C.

:class:`DeviceFastPath` is the device side (``rf_bf_device``): the free list of the pool's
pages, which Python's own requests take pages from too, and the fast requests in flight,
which are replayed after a backend restart like Python's. :class:`NbdConnection`
(``rf_nbd_conn``) is one NBD client in its transmission phase: C reads and parses its
requests, starts the common ones (READ and WRITE that fit one blkif request) on the rings,
hands the others back to Python, and writes every reply, from the granted pages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ringfence.hypervisor._lib import c_counter, ffi, lib
from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io.ring import RingOverflow

HANDBACK = 64  # responses to Python's own requests taken in one call


@dataclass(frozen=True, slots=True)
class NbdRequest:
    """A request C hands back to Python (not a fast one)."""
    flags: int
    kind: int
    cookie: bytes
    offset: int
    length: int
    data: bytes   # a write's


class DeviceFastPath:
    def __init__(self, pool: Any, pool_pages: int) -> None:
        self._pool_pointer = ffi.from_buffer(pool)  # kept: C holds the address
        device = lib.rf_bf_new(ffi.cast("uint8_t *", self._pool_pointer), pool_pages)
        if device == ffi.NULL:
            raise MemoryError("blkfront fast path")
        self.c = ffi.gc(device, lib.rf_bf_free)
        self._grefs = ffi.new("uint32_t[]", pool_pages)
        self.c.grefs = self._grefs
        self._pages = ffi.new("uint16_t[]", pool_pages)
        self._handback = ffi.new("uint8_t[]", HANDBACK * blkif.RESPONSE_SIZE)
        self._handback_view = ffi.buffer(self._handback)

    # ---- pages -----------------------------------------------------------------------
    free_pages = c_counter("c", "nfree")

    def take_pages(self, count: int) -> list[int] | None:
        if not lib.rf_bf_take_pages(self.c, count, self._pages):
            return None
        return list(self._pages[0:count])

    def release_pages(self, pages: list[int]) -> None:
        lib.rf_bf_release_pages(self.c, pages, len(pages))

    # ---- connection to a backend -----------------------------------------------------
    def set_grefs(self, grefs: list[int]) -> None:
        self._grefs[0:len(grefs)] = grefs

    def attach(self, rings: list[Any], connection: int, *, max_segments: int, size: int,
               read_only: bool, handle: int) -> None:
        """The rings of a new connection; new requests wait until :meth:`open`."""
        c = self.c
        c.connected = 0
        for index, ring in enumerate(rings):
            c.rings[index] = ring
        c.nqueues, c.connection = len(rings), connection
        c.max_segments, c.size, c.read_only, c.handle = max_segments, size, int(read_only), handle

    def detach(self) -> None:
        self.c.connected = 0
        self.c.nqueues = 0

    def open(self) -> None:
        self.c.connected = 1

    def set_failed(self, failed: bool) -> None:
        """No backend will come: fast requests in flight fail with EIO, new ones go to Python
        (which fails them too), until a backend comes again."""
        self.c.failed = int(failed)
        if failed:
            lib.rf_bf_fail_all(self.c)

    def replay(self) -> int:
        """Put what the last backend left unanswered on the new rings: how many still wait."""
        return int(lib.rf_bf_replay(self.c))

    notify_mask = c_counter("c", "notify_mask", doc="queues whose requests, just pushed, need an event")

    def complete(self, queue: int) -> list[bytes] | None:
        """Take queue's responses: fast ones are answered in C; Python's come back raw.
        None: there were none (the final check is done: wait for an event)."""
        before = self.c.batches
        n = lib.rf_bf_complete(self.c, queue, self._handback, HANDBACK)
        if n < 0:
            raise RingOverflow("backend published more responses than there are requests")
        if self.c.batches == before:
            return None
        size = blkif.RESPONSE_SIZE
        view = self._handback_view
        return [view[i * size:(i + 1) * size] for i in range(n)]

    in_flight = c_counter("c", "in_flight")

    def counters(self) -> dict[str, int]:
        c = self.c
        return {"requests": c.requests, "replayed": c.replayed, "bad_responses": c.bad_responses,
                "errors": c.errors, "bytes_read": c.bytes_read, "bytes_written": c.bytes_written}


class NbdConnection:
    """Results of :meth:`pump`, as named in nbdfront.h."""
    WAIT, ROOM, FULL, BUDGET = lib.RF_NBD_WAIT, lib.RF_NBD_ROOM, lib.RF_NBD_FULL, lib.RF_NBD_BUDGET
    HANDBACK, EOF, DISC = lib.RF_NBD_HANDBACK, lib.RF_NBD_EOF, lib.RF_NBD_DISC
    BAD_MAGIC, TOO_BIG = lib.RF_NBD_BAD_MAGIC, lib.RF_NBD_TOO_BIG

    def __init__(self, device: DeviceFastPath | None, fd: int, already_read: bytes = b"") -> None:
        self.device = device
        self.c = lib.rf_nbd_open(device.c if device is not None else ffi.NULL, fd)
        if self.c == ffi.NULL:
            raise MemoryError("nbd connection")
        self._request = ffi.new("rf_nbd_request *")
        if already_read and lib.rf_nbd_feed(self.c, already_read, len(already_read)) < 0:
            raise MemoryError("nbd connection")

    def pump(self, budget: int) -> int:
        return int(lib.rf_nbd_pump(self.c, self._request, budget))

    def handed_back(self) -> NbdRequest:
        """The request the last pump returned HANDBACK for (its data copied now)."""
        r = self._request
        data = bytes(ffi.buffer(r.data, r.length)) if r.data != ffi.NULL else b""
        return NbdRequest(r.flags, r.type, bytes(ffi.buffer(r.cookie)), r.offset, r.length, data)

    def queue_reply(self, reply: bytes) -> bool:
        """True: some of it waits for the socket (flush when writable)."""
        return bool(lib.rf_nbd_queue_reply(self.c, reply, len(reply)))

    def flush(self) -> int:
        """0 all sent, 1 the socket is full, -1 the client is gone."""
        return int(lib.rf_nbd_flush(self.c))

    queued_bytes = c_counter("c", "queued_bytes")

    @property
    def broken(self) -> bool:
        return bool(self.c.broken)

    outstanding = c_counter("c", "outstanding", doc="fast requests of this connection not answered yet")

    def counters(self) -> dict[str, int]:
        c = self.c
        return {"read": c.reads, "write": c.writes, "bytes_read": c.bytes_read,
                "bytes_written": c.bytes_written, "errors": c.errors}

    def close(self) -> None:
        """C frees it once its last fast request is answered."""
        if self.c != ffi.NULL:
            lib.rf_nbd_close(self.c)
            self.c = ffi.NULL
