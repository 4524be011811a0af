"""blkback's C fast path never serves what the Python validator would refuse.

Random requests (good, hostile and in between) go through a real ring to ``rf_blk_serve``
over a real file: each is either served — then the validator plans it identically and the
bytes moved are the right ones — or handed back byte for byte, for Python to decide.
"""
from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings, strategies as st

from ringfence.backends.blkback.datapath import Geometry, Plan, Validator
from ringfence.backends.blkback.fastpath import GREF_LIMIT, FastPath
from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io.blkif import Op, Segment
from ringfence.hypervisor.io.ring import BackRing, FrontRing

SECTORS = 64  # a 32 KiB disk


class _Page:
    def __init__(self, readonly: bool = False) -> None:
        self.storage = bytearray(4096)
        self.buffer = memoryview(self.storage).toreadonly() if readonly else memoryview(self.storage)


def _disk() -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, bytes(i % 251 for i in range(SECTORS * 512)))
    return fd


segment = st.builds(Segment, st.sampled_from([1, 2, 3, 4, GREF_LIMIT, 2**32 - 1]),
                    st.integers(0, 9), st.integers(0, 9))
DESCRIPTOR = 5  # the gref of the page holding indirect segments
direct = st.builds(
    lambda op, nseg, sector, segs: (blkif.encode_request(
        blkif.Request(op, nseg, 0, 7, sector, tuple(segs[:min(nseg, 11)]))), None),
    st.sampled_from([Op.READ, Op.WRITE, Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER, 0x77]),
    st.integers(0, 13), st.one_of(st.integers(0, SECTORS + 2), st.just(2**64 - 1)),
    st.lists(segment, min_size=11, max_size=11))
indirect = st.builds(
    lambda op, nseg, sector, segs, gref: (blkif.encode_request(blkif.Request(
        Op.INDIRECT, nseg, 0, 7, sector, indirect_op=op, indirect_grefs=(gref,))),
        b"".join(blkif.SEGMENT.pack(s.gref, s.first_sect, s.last_sect) for s in segs)),
    st.sampled_from([Op.READ, Op.WRITE, Op.DISCARD]), st.integers(0, 260),
    st.integers(0, SECTORS + 2), st.lists(segment, min_size=1, max_size=24),
    st.sampled_from([DESCRIPTOR, DESCRIPTOR, 4]))
request = st.one_of(direct, indirect)


@settings(max_examples=300, deadline=None)
@given(st.lists(request, min_size=1, max_size=40), st.booleans())
def test_fast_path_serves_only_what_the_validator_plans(raws, read_only):
    fd = _disk()
    try:
        pages = {1: _Page(), 2: _Page(), 3: _Page(readonly=True)}  # gref 4: not mapped
        descriptor = _Page()
        fast = FastPath(fd, SECTORS, read_only)
        for gref, page in pages.items():
            fast.remember(gref, page)
        fast.remember(DESCRIPTOR, descriptor)
        shared = bytearray(4096)
        front = FrontRing(shared, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE)
        back = BackRing(shared, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE)
        validator = Validator(Geometry(SECTORS, read_only))
        for raw, segments in raws:
            if segments is not None:
                descriptor.storage[:] = segments.ljust(4096, b"\0")
            disk_before = os.pread(fd, SECTORS * 512, 0)
            pages_before = {g: bytes(p.storage) for g, p in pages.items()}
            assert front.put_requests([raw]) == 1
            front.push_requests()
            handed_back, _ = fast.serve(back)
            responses = front.take_responses()
            plan = validator.plan(raw)
            if isinstance(plan, Plan) and plan.indirect_grefs:
                pages_of = {**pages, DESCRIPTOR: descriptor}
                plan = validator.indirect_segments(
                    plan, [bytes(pages_of[g].storage) if g in pages_of else bytes(4096)
                           for g in plan.indirect_grefs], blkif.decode_request(raw).nr_segments)
            if handed_back:
                assert handed_back == [raw] and not responses
                back.put_responses([blkif.encode_response(7, raw[0], 0)])
                back.push_responses()
                front.take_responses()
                continue
            assert len(responses) == 1 and blkif.decode_response(responses[0]) == (7, raw[0], 0)
            assert isinstance(plan, Plan) and plan.kind in (Op.READ, Op.WRITE), plan
            # what the request must have done, simulated segment by segment, in order
            disk, expected = bytearray(disk_before), {g: bytearray(b) for g, b in pages_before.items()}
            position = plan.offset
            for seg in plan.segments:
                if plan.kind == Op.READ:
                    expected[seg.gref][seg.offset:seg.offset + seg.length] = \
                        disk[position:position + seg.length]
                else:
                    disk[position:position + seg.length] = \
                        expected[seg.gref][seg.offset:seg.offset + seg.length]
                position += seg.length
            assert os.pread(fd, SECTORS * 512, 0) == disk
            assert {g: bytes(p.storage) for g, p in pages.items()} == expected
        stats = fast.statistics()
        assert stats.served + stats.handed_back == len(raws)
    finally:
        os.close(fd)


def test_forgotten_grant_goes_back_to_python():
    fd = _disk()
    try:
        fast = FastPath(fd, SECTORS, False)
        page = _Page()
        fast.remember(1, page)
        shared = bytearray(4096)
        front = FrontRing(shared, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE)
        back = BackRing(shared, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE)
        raw = blkif.encode_request(blkif.Request(Op.READ, 1, 0, 1, 8, (Segment(1, 0, 7),)))
        front.put_requests([raw])
        front.push_requests()
        assert fast.serve(back) == ([], True) and bytes(page.storage) == os.pread(fd, 4096, 4096)
        fast.forget(1)
        front.take_responses()
        front.put_requests([raw])
        front.push_requests()
        assert fast.serve(back)[0] == [raw]
        assert fast.statistics().cached_grants == 0
    finally:
        os.close(fd)
