"""blkfront's NBD fast path (nbdfront.c) with a real socket pair and a real ring in local
memory: the test plays the NBD client and the backend."""
from __future__ import annotations

import errno

import os
import socket
import struct

from hypothesis import given, settings, strategies as st

from ringfence.frontends.blkfront.fastpath import DeviceFastPath, NbdConnection
from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io.blkif import Op
from ringfence.hypervisor.io.ring import BackRing, FrontRing

PAGE = 4096
DISK = 1 << 20
REQUEST = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">II8s")
READ, WRITE, DISC, FLUSH = 0, 1, 2, 3


def nbd(kind: int, cookie: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> bytes:
    return REQUEST.pack(0x25609513, flags, kind, cookie, offset, length) + data


class Harness:
    """One device with one ring, one NBD connection; the test is client and backend."""

    def __init__(self, pages: int = 64, max_segments: int = 11) -> None:
        self.pool = bytearray(pages * PAGE)
        self.fast = DeviceFastPath(self.pool, pages)
        self.disk = bytearray(os.urandom(DISK))
        self.max_segments = max_segments
        self.client, self.server = socket.socketpair()
        self.server.setblocking(False)
        self.conn = NbdConnection(self.fast, self.server.fileno())
        self.connection = 0
        self.connect(grefs=[1000 + i for i in range(pages)])
        self.fast.open()

    def connect(self, grefs: list[int]) -> None:
        self.grefs = grefs
        self.fast.set_grefs(grefs)
        self.shared = bytearray(PAGE)
        self.front = FrontRing(self.shared, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE)
        self.back = BackRing(self.shared, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE)
        self.connection += 1
        self.fast.attach([self.front.c_ring], self.connection, max_segments=self.max_segments,
                         size=DISK, read_only=False, handle=7)

    def page(self, gref: int) -> memoryview:
        index = self.grefs.index(gref)
        return memoryview(self.pool)[index * PAGE:(index + 1) * PAGE]

    def segments(self, req: blkif.Request) -> tuple[int, list[tuple[int, int, int]]]:
        if req.operation == Op.INDIRECT:
            table = self.page(req.indirect_grefs[0])
            return req.indirect_op, [blkif.SEGMENT.unpack_from(table, i * 8)
                                     for i in range(req.nr_segments)]
        return req.operation, [(s.gref, s.first_sect, s.last_sect) for s in req.segments]

    def serve(self, answer: bool = True) -> list[blkif.Request]:
        """Take what is on the ring; do it against the disk and answer OKAY."""
        requests = [blkif.decode_request(raw) for raw in self.back.take_requests()]
        if answer:
            self.back.put_responses([self.do(req) for req in requests])
            self.back.push_responses()
        return requests

    def do(self, req: blkif.Request) -> bytes:
        op, segments = self.segments(req)
        at = req.sector_number * 512
        for gref, first, last in segments:
            page, size = self.page(gref), (last - first + 1) * 512
            if op == Op.READ:
                page[first * 512:first * 512 + size] = self.disk[at:at + size]
            else:
                self.disk[at:at + size] = page[first * 512:first * 512 + size]
            at += size
        return blkif.encode_response(req.id, req.operation, 0)

    def reply(self, payload: int = 0) -> tuple[int, int, bytes]:
        self.client.settimeout(5)
        head = self._exactly(REPLY.size)
        magic, error, cookie = REPLY.unpack(head)
        assert magic == 0x67446698
        return error, int.from_bytes(cookie, "big"), self._exactly(payload) if payload else b""

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self.client.recv(n - len(data))
        return data


def test_reads_and_writes_go_through_the_ring_and_come_back_byte_for_byte():
    h = Harness()
    data = os.urandom(3 * PAGE)
    h.client.sendall(nbd(WRITE, 11, 8 * PAGE, len(data), data) + nbd(READ, 12, 20 * PAGE, 5 * PAGE))
    assert h.conn.pump(64) == NbdConnection.WAIT
    assert h.fast.notify_mask == 1 and h.fast.in_flight == 2
    requests = h.serve()
    assert [r.operation for r in requests] == [Op.WRITE, Op.READ]
    assert all(r.id >> 63 and r.handle == 7 for r in requests)
    assert requests[0].sector_number == 64 and len(requests[1].segments) == 5
    assert h.fast.complete(0) == []
    assert h.reply() == (0, 11, b"")
    assert h.reply(5 * PAGE) == (0, 12, bytes(h.disk[20 * PAGE:25 * PAGE]))
    assert bytes(h.disk[8 * PAGE:11 * PAGE]) == data
    assert h.fast.in_flight == 0 and h.fast.free_pages == 64
    assert h.conn.counters() == {"read": 1, "write": 1, "bytes_read": 5 * PAGE,
                                 "bytes_written": 3 * PAGE, "errors": 0}
    assert h.fast.complete(0) is None  # nothing more: wait for an event


def test_a_request_larger_than_eleven_pages_goes_indirect():
    h = Harness(pages=128, max_segments=64)
    h.client.sendall(nbd(READ, 1, 0, 40 * PAGE + 1024))
    assert h.conn.pump(64) == NbdConnection.WAIT
    (req,) = h.serve()
    assert req.operation == Op.INDIRECT and req.indirect_op == Op.READ and req.nr_segments == 41
    h.fast.complete(0)
    assert h.reply(40 * PAGE + 1024) == (0, 1, bytes(h.disk[:40 * PAGE + 1024]))
    assert h.fast.free_pages == 128  # the descriptor page too


def test_a_granted_page_holds_only_the_requests_bytes():
    """ATTACKS A5 (XSA-403): outside each segment's sectors a page is zero, and so is the
    rest of an indirect request's descriptor page, whatever the pool held before."""
    h = Harness(pages=64, max_segments=32)
    h.pool[:] = b"\xa5" * len(h.pool)  # what earlier I/O left behind
    h.client.sendall(nbd(READ, 1, 0, 1024) + nbd(WRITE, 2, 0, 1536, os.urandom(1536))
                     + nbd(READ, 3, 0, 12 * PAGE + 512))
    h.conn.pump(64)
    requests = h.serve(answer=False)
    assert len(requests) == 3
    for req in requests:
        _, segments = h.segments(req)
        for gref, first, last in segments:
            page = h.page(gref)
            assert page[(last + 1) * 512:] == bytes(PAGE - (last + 1) * 512)
        if req.operation == Op.INDIRECT:
            table = h.page(req.indirect_grefs[0])
            assert table[len(segments) * 8:] == bytes(PAGE - len(segments) * 8)


def test_requests_python_must_serve_are_handed_back_whole():
    h = Harness()
    write = os.urandom(PAGE)
    cases = [nbd(FLUSH, 1, 0, 0), nbd(WRITE, 2, 0, PAGE, write, flags=1),  # FUA
             nbd(READ, 3, 100, 512), nbd(READ, 4, DISK - 512, 1024),     # unaligned, past the end
             nbd(READ, 5, 0, 12 * PAGE), nbd(9, 6, 0, 0)]                 # too big, unknown
    h.client.sendall(b"".join(cases))
    seen = []
    while (result := h.conn.pump(64)) == NbdConnection.HANDBACK:
        request = h.conn.handed_back()
        seen.append((request.kind, int.from_bytes(request.cookie, "big"), request.flags, request.data))
    assert result == NbdConnection.WAIT
    assert seen == [(FLUSH, 1, 0, b""), (WRITE, 2, 1, write), (READ, 3, 0, b""), (READ, 4, 0, b""),
                    (READ, 5, 0, b""), (9, 6, 0, b"")]
    assert h.fast.in_flight == 0 and not h.serve()


def test_a_backends_wrong_answers_complete_nothing_or_fail():
    """ATTACKS A4 on the fast path: an id never issued and one answered twice complete
    nothing; a request answered as another operation (corrupted on the ring, or a broken
    backend) fails rather than waits for ever. All are counted."""
    h = Harness()
    h.client.sendall(b"".join(nbd(READ, cookie, cookie * PAGE, PAGE) for cookie in (1, 2, 3)))
    h.conn.pump(64)
    a, b, _ = h.serve(answer=False)
    # (a backend answers only as many as it was asked: each wrong answer takes a slot)
    h.back.put_responses([h.do(a), h.do(a), blkif.encode_response(b.id, Op.WRITE, 0)])
    h.back.push_responses()
    h.fast.complete(0)
    assert h.reply(PAGE)[:2] == (0, 1)
    assert h.reply()[:2] == (errno.EIO, 2)  # b, answered as a write
    h.client.sendall(nbd(READ, 4, 0, PAGE))
    h.conn.pump(64)
    (d,) = h.serve(answer=False)
    h.back.put_responses([blkif.encode_response(d.id + 1024, Op.READ, 0)])  # never issued
    h.back.push_responses()
    h.fast.complete(0)
    assert h.fast.counters()["bad_responses"] == 3 and h.fast.in_flight == 2
    h.client.setblocking(False)
    try:
        assert h.client.recv(100) == b""
    except BlockingIOError:
        pass  # no other reply went out


def test_unanswered_requests_are_replayed_on_the_next_backends_ring_with_its_grants():
    h = Harness()
    data = os.urandom(2 * PAGE)
    h.client.sendall(nbd(WRITE, 1, 0, len(data), data) + nbd(READ, 2, 4 * PAGE, PAGE))
    h.conn.pump(64)
    old = h.serve(answer=False)
    h.fast.detach()
    h.client.sendall(nbd(READ, 3, 0, PAGE))
    assert h.conn.pump(64) == NbdConnection.ROOM  # no ring: it waits (a pause, not an error)
    h.connect(grefs=[5000 + i for i in range(64)])
    assert h.fast.replay() == 0 and h.fast.notify_mask == 1
    h.fast.open()
    assert h.conn.pump(64) == NbdConnection.WAIT
    replayed = h.serve()
    assert [r.id for r in replayed[:2]] == [r.id for r in old]
    assert all(s.gref >= 5000 for r in replayed for s in r.segments)
    h.fast.complete(0)
    replies = {h.reply()[1] for _ in range(1)}
    assert replies == {1}
    assert h.reply(PAGE)[:2] == (0, 2) and h.reply(PAGE)[:2] == (0, 3)
    assert bytes(h.disk[:2 * PAGE]) == data
    assert h.fast.counters()["replayed"] == 2


def test_no_backend_coming_fails_what_is_in_flight_with_eio():
    h = Harness()
    h.client.sendall(nbd(READ, 1, 0, PAGE))
    h.conn.pump(64)
    h.fast.set_failed(True)
    assert h.reply() == (5, 1, b"")
    h.client.sendall(nbd(READ, 2, 0, PAGE))
    assert h.conn.pump(64) == NbdConnection.HANDBACK  # Python fails it too
    assert h.fast.in_flight == 0 and h.fast.free_pages == 64


def test_protocol_violations_end_the_connection():
    h = Harness()
    h.client.sendall(b"\0" * 28)
    assert h.conn.pump(64) == NbdConnection.BAD_MAGIC
    h2 = Harness()
    h2.client.sendall(nbd(WRITE, 1, 0, 64 << 20))
    assert h2.conn.pump(64) == NbdConnection.TOO_BIG
    h3 = Harness()
    h3.client.sendall(nbd(DISC, 1, 0, 0))
    assert h3.conn.pump(64) == NbdConnection.DISC
    h3.client.close()
    assert h3.conn.pump(64) == NbdConnection.EOF


def test_a_client_that_does_not_read_holds_at_most_half_the_pool():
    h = Harness(pages=64)
    h.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for cookie in range(5):
        h.client.sendall(nbd(READ, cookie, cookie * 11 * PAGE, 11 * PAGE))
        h.conn.pump(64)
        h.serve()
        h.fast.complete(0)
    assert h.fast.free_pages >= 32 and h.conn.queued_bytes > 0
    h.client.setblocking(False)
    received = b""
    while h.conn.flush() != 0 or len(received) < 5 * (16 + 11 * PAGE):  # now it reads
        try:
            received += h.client.recv(1 << 20)
        except BlockingIOError:
            pass
    for cookie in range(5):  # every reply, whole and in order
        reply = received[cookie * (16 + 11 * PAGE):(cookie + 1) * (16 + 11 * PAGE)]
        assert REPLY.unpack(reply[:16])[1:] == (0, cookie.to_bytes(8, "big"))
        assert reply[16:] == bytes(h.disk[cookie * 11 * PAGE:(cookie + 1) * 11 * PAGE])
    assert h.fast.free_pages == 64 and h.conn.outstanding == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([READ, WRITE, FLUSH]), st.integers(0, 255),
                          st.integers(1, 16)), min_size=1, max_size=12),
       st.lists(st.integers(1, 9000), min_size=1, max_size=20))
def test_any_split_of_the_byte_stream_starts_the_same_requests(requests, cuts):
    stream = b"".join(nbd(kind, i, block * PAGE, pages * 512 * (8 if kind != FLUSH else 0),
                          os.urandom(pages * 4096) if kind == WRITE else b"")
                      for i, (kind, block, pages) in enumerate(requests))
    h = Harness(pages=256)
    to_python, on_ring, at = [], [], 0
    h.client.setblocking(False)
    cuts = iter(cuts)
    while at < len(stream):
        try:
            at += h.client.send(stream[at:at + next(cuts, len(stream))])
        except BlockingIOError:
            pass
        while (result := h.conn.pump(64)) == NbdConnection.HANDBACK:
            to_python.append(int.from_bytes(h.conn.handed_back().cookie, "big"))
        assert result == NbdConnection.WAIT
        on_ring += [req.sector_number for req in h.serve()]
        h.fast.complete(0)
    fast = [kind != FLUSH and pages <= 11 and block + pages <= DISK // PAGE
            for kind, block, pages in requests]
    assert to_python == [i for i, ok in enumerate(fast) if not ok]
    assert on_ring == [block * 8 for (_, block, _), ok in zip(requests, fast) if ok]
