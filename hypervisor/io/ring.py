"""Front and back ends of a shared ring (Xen's io/ring.h), over any writable buffer.

The C core does the work (``hypervisor/csrc/ring.c``); these classes own a private batch
buffer each way, so that a batch of requests or responses costs one C call and every slot
is copied out of shared memory exactly once before Python looks at it.

    front = FrontRing(pages.buffer, req_size=112, rsp_size=16)      # initialises the header
    front.put_requests([req1, req2]); front.push_requests(port.notify_fd)
    back = BackRing(mapped.buffer, req_size=112, rsp_size=16)
    for req in back.take_requests(): ...
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ringfence.hypervisor._lib import ffi, lib

PAGE_SIZE = 4096
HEADER_SIZE = 64
# Bound once: the batch path is a handful of calls per batch and attribute lookups show.
_front_submit = lib.rf_front_submit
_front_take = lib.rf_front_take_responses
_front_wait = lib.rf_front_wait_responses
_back_take = lib.rf_back_take_requests
_back_respond = lib.rf_back_respond
_back_wait = lib.rf_back_wait_requests
_front_exchange = lib.rf_front_exchange
_back_exchange = lib.rf_back_exchange
MAX_RING_PAGE_ORDER = 4


class RingOverflow(Exception):
    """The other end published an index the ring cannot hold: it is broken or hostile."""


@dataclass(frozen=True, slots=True)
class RingStatistics:
    role: str
    slots: int
    requests: int
    responses: int
    batches: int
    notifications_sent: int
    notifications_suppressed: int
    overflows: int
    in_flight: int


def ring_slots(ring_bytes: int, slot_size: int) -> int:
    """Slots in a ring of ``ring_bytes`` (a power of two, as __RING_SIZE)."""
    return int(lib.rf_ring_slots(ring_bytes, slot_size))


class _Ring:
    role = ""

    def __init__(self, buffer: Any, req_size: int, rsp_size: int, slot_size: int | None = None) -> None:
        view = memoryview(buffer)
        if view.readonly:
            raise ValueError("a ring needs a writable buffer")
        if view.nbytes % PAGE_SIZE or not 0 < view.nbytes <= PAGE_SIZE << MAX_RING_PAGE_ORDER:
            raise ValueError(f"ring of {view.nbytes} bytes: must be 1..{1 << MAX_RING_PAGE_ORDER} pages")
        self._keep = buffer
        self._shared = ffi.from_buffer(view, require_writable=True)
        self._ring = ffi.new("rf_ring *")
        slot = slot_size or max(req_size, rsp_size)
        if lib.rf_ring_init(self._ring, self._shared, view.nbytes, req_size, rsp_size, slot) < 0:
            raise ValueError(f"bad ring geometry req={req_size} rsp={rsp_size} slot={slot}")
        self.req_size, self.rsp_size = req_size, rsp_size
        self.size = int(self._ring.nr_ents)
        # private batch buffers: a whole ring's worth each way
        self._req_buf = ffi.new("uint8_t[]", self.size * req_size)
        self._rsp_buf = ffi.new("uint8_t[]", self.size * rsp_size)
        # Zero-allocation batch path: the caller fills ``staging`` and reads ``received``.
        mine, theirs = (self._req_buf, self._rsp_buf) if self.role == "front" else (self._rsp_buf, self._req_buf)
        self.staging = memoryview(ffi.buffer(mine))
        self.received = memoryview(ffi.buffer(theirs))

    @property
    def c_ring(self) -> Any:
        """The ``rf_ring *`` for C code that serves this ring itself (blkback's fast path)."""
        return self._ring

    @property
    def sring(self) -> Any:
        """The shared header (for tests and fault injection)."""
        return self._ring.sring

    def _stats(self, in_flight: int) -> RingStatistics:
        r = self._ring
        return RingStatistics(self.role, self.size, int(r.requests), int(r.responses),
                              int(r.batches), int(r.notifies_sent), int(r.notifies_suppressed),
                              int(r.overflows), in_flight)

    def _watch(self, field: str) -> Any:
        return ffi.addressof(self._ring.sring, field)


def _pack(items: Iterable[bytes], size: int, limit: int, buf: Any) -> int:
    n = 0
    view = ffi.buffer(buf)
    for item in items:
        if n == limit:
            break
        if len(item) != size:
            raise ValueError(f"item of {len(item)} bytes, expected {size}")
        view[n * size:(n + 1) * size] = item
        n += 1
    return n


class FrontRing(_Ring):
    role = "front"

    def __init__(self, buffer: Any, req_size: int, rsp_size: int, slot_size: int | None = None,
                 *, init: bool = True, start: int = 0) -> None:
        super().__init__(buffer, req_size, rsp_size, slot_size)
        if init:
            lib.rf_front_init(self._ring, start & 0xFFFFFFFF)
        else:
            lib.rf_front_attach(self._ring, start & 0xFFFFFFFF)

    def free_requests(self) -> int:
        return int(lib.rf_front_free_requests(self._ring))

    def put_requests(self, requests: Sequence[bytes]) -> int:
        """Copy requests into free slots (not yet visible); returns how many fit."""
        n = _pack(requests, self.req_size, self.free_requests(), self._req_buf)
        return int(lib.rf_front_put_requests(self._ring, self._req_buf, n))

    def put_request_buffer(self, data: Any, count: int) -> int:
        """Batch path: ``count`` requests packed back to back in ``data``."""
        return int(lib.rf_front_put_requests(self._ring, ffi.from_buffer(data), count))

    def push_requests(self, notify_fd: int = -1) -> bool:
        """Publish; notify (write the eventfd) only if the backend asked; True if it did."""
        return bool(lib.rf_front_push_requests(self._ring, notify_fd))

    def take_responses(self, max_count: int | None = None) -> list[bytes]:
        n = self._take(max_count)
        raw = ffi.buffer(self._rsp_buf, n * self.rsp_size)[:]
        return [raw[i * self.rsp_size:(i + 1) * self.rsp_size] for i in range(n)]

    def take_response_buffer(self, max_count: int | None = None) -> memoryview:
        """Batch path: the responses back to back in a private buffer (valid until the next take)."""
        n = self._take(max_count)
        return memoryview(ffi.buffer(self._rsp_buf, n * self.rsp_size))

    def _take(self, max_count: int | None) -> int:
        n = lib.rf_front_take_responses(self._ring, self._rsp_buf,
                                        self.size if max_count is None else min(max_count, self.size))
        if n < 0:
            raise RingOverflow("backend published more responses than there are requests")
        return int(n)

    def submit_staged(self, count: int, notify_fd: int = -1) -> int:
        """Put the first ``count`` requests of ``staging`` and push them, in one C call."""
        return _front_submit(self._ring, self._req_buf, count, notify_fd)  # type: ignore[no-any-return]

    def take_responses_into(self) -> int:
        """Copy responses into ``received``; returns how many."""
        n: int = _front_take(self._ring, self._rsp_buf, self.size)
        if n < 0:
            raise RingOverflow("backend published more responses than there are requests")
        return n

    def wait_for_responses(self, wait_fd: int, spin_ns: int = 0) -> None:
        """Return once a response is there: poll for ``spin_ns`` (yielding the CPU), then
        re-arm the event index and block on the eventfd (GIL released)."""
        if _front_wait(self._ring, wait_fd, spin_ns) < 0:
            raise OSError("waiting for responses failed")

    def exchange(self, count: int, notify_fd: int, wait_fd: int, spin_ns: int = 0,
                 gather: int = 1) -> int:
        """Submit ``count`` staged requests, wait, take the responses into ``received``:
        the synchronous-request loop as one C call (GIL released while waiting). With
        ``gather`` > 1 it polls up to ``spin_ns`` for that many responses (coalescing)."""
        n: int = _front_exchange(self._ring, self._req_buf, count, self._rsp_buf, notify_fd,
                                 wait_fd, spin_ns, gather)
        if n < 0:
            raise RingOverflow("backend published more responses than there are requests") \
                if n == -75 else OSError(-n, "ring exchange failed")
        return n

    def final_check_for_responses(self) -> bool:
        return bool(lib.rf_front_final_check_for_responses(self._ring))

    def check_for_half_the_responses(self) -> bool:
        """As :meth:`final_check_for_responses`, with the event asked for once half the
        requests in flight are answered (responses that only give buffers back)."""
        return bool(lib.rf_front_check_for_half_the_responses(self._ring))

    def unconsumed_responses(self) -> int:
        return int(lib.rf_front_unconsumed_responses(self._ring))

    def wait(self, wait_fd: int, spin_ns: int = 0) -> int:
        """Block in C (GIL released) until a notification, or spin until a response is there."""
        return int(lib.rf_wait_event(wait_fd, self._watch("rsp_prod"), self._ring.rsp_cons, spin_ns))

    @property
    def in_flight(self) -> int:
        return int(self._ring.req_prod_pvt - self._ring.rsp_cons) & 0xFFFFFFFF

    def statistics(self) -> RingStatistics:
        return self._stats(self.in_flight)


class BackRing(_Ring):
    role = "back"

    def __init__(self, buffer: Any, req_size: int, rsp_size: int, slot_size: int | None = None,
                 *, start: int = 0) -> None:
        super().__init__(buffer, req_size, rsp_size, slot_size)
        lib.rf_back_attach(self._ring, start & 0xFFFFFFFF)

    # ---- faults a broken or hostile frontend would make (the fault-injection harness) ----
    def forge_request_index(self) -> int:
        """Write into the shared ring a request index past what the ring can hold, as a
        broken frontend would publish it: the next take fails with RingOverflow."""
        bogus = (self._ring.req_cons + self.size + 1) & 0xFFFFFFFF
        self._ring.sring.req_prod = bogus
        return bogus

    def next_request_slot(self) -> memoryview | None:
        """The shared slot of the next request not taken yet (None if there is none), to
        corrupt it in place as a broken frontend would have written it."""
        if not self.unconsumed_requests():
            return None
        slot = self._ring.slot_size
        offset = (self._ring.req_cons % self.size) * slot
        return memoryview(ffi.buffer(self._ring.slots + offset, self.req_size))

    def take_requests(self, max_count: int | None = None) -> list[bytes]:
        n = self._take(max_count)
        raw = ffi.buffer(self._req_buf, n * self.req_size)[:]
        return [raw[i * self.req_size:(i + 1) * self.req_size] for i in range(n)]

    def take_request_buffer(self, max_count: int | None = None) -> memoryview:
        n = self._take(max_count)
        return memoryview(ffi.buffer(self._req_buf, n * self.req_size))

    def _take(self, max_count: int | None) -> int:
        n = lib.rf_back_take_requests(self._ring, self._req_buf,
                                      self.size if max_count is None else min(max_count, self.size))
        if n < 0:
            raise RingOverflow("frontend published more requests than the ring holds")
        return int(n)

    def put_responses(self, responses: Sequence[bytes]) -> int:
        n = _pack(responses, self.rsp_size, self.size, self._rsp_buf)
        return int(lib.rf_back_put_responses(self._ring, self._rsp_buf, n))

    def put_response_buffer(self, data: Any, count: int) -> int:
        return int(lib.rf_back_put_responses(self._ring, ffi.from_buffer(data), count))

    def push_responses(self, notify_fd: int = -1) -> bool:
        return bool(lib.rf_back_push_responses(self._ring, notify_fd))

    def take_requests_into(self) -> int:
        """Copy requests into ``received``; returns how many."""
        n: int = _back_take(self._ring, self._req_buf, self.size)
        if n < 0:
            raise RingOverflow("frontend published more requests than the ring holds")
        return n

    def respond_staged(self, count: int, notify_fd: int = -1) -> int:
        """Put the first ``count`` responses of ``staging`` and push them, in one C call."""
        return _back_respond(self._ring, self._rsp_buf, count, notify_fd)  # type: ignore[no-any-return]

    def wait_for_requests(self, wait_fd: int, spin_ns: int = 0) -> None:
        if _back_wait(self._ring, wait_fd, spin_ns) < 0:
            raise OSError("waiting for requests failed")

    def exchange(self, count: int, notify_fd: int, wait_fd: int, spin_ns: int = 0,
                 budget: int = 0) -> int:
        """Respond with ``count`` staged responses, wait for requests, take them into
        ``received`` (at most ``budget``, 0 for all): a backend's serving loop as one C call."""
        n: int = _back_exchange(self._ring, self._rsp_buf, count, self._req_buf, notify_fd,
                                wait_fd, spin_ns, budget)
        if n < 0:
            raise RingOverflow("frontend published more requests than the ring holds") \
                if n == -75 else OSError(-n, "ring exchange failed")
        return n

    def final_check_for_requests(self) -> bool:
        return bool(lib.rf_back_final_check_for_requests(self._ring))

    def unconsumed_requests(self) -> int:
        return int(lib.rf_back_unconsumed_requests(self._ring))

    def wait(self, wait_fd: int, spin_ns: int = 0) -> int:
        return int(lib.rf_wait_event(wait_fd, self._watch("req_prod"), self._ring.req_cons, spin_ns))

    @property
    def in_flight(self) -> int:
        return int(self._ring.req_cons - self._ring.rsp_prod_pvt) & 0xFFFFFFFF

    def statistics(self) -> RingStatistics:
        return self._stats(self.in_flight)


__all__ = ["FrontRing", "BackRing", "RingOverflow", "RingStatistics", "ring_slots"]
