"""blkback's validator: every hostile request class gets an error response and a counter."""
from __future__ import annotations

from hypothesis import given, strategies as st

from ringfence.backends.blkback.datapath import Geometry, Plan, Rejection, Validator
from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io.blkif import Op, Segment, Status

GEO = Geometry(sectors=2048, read_only=False)


def req(op=Op.READ, nseg=1, sector=0, segs=None, **kw):
    segs = segs if segs is not None else tuple(Segment(10 + i, 0, 7) for i in range(min(nseg, 11)))
    return blkif.encode_request(blkif.Request(op, nseg, 0, 99, sector, segs, **kw))


def test_good_read_plans_each_page():
    plan = Validator(GEO).plan(req(nseg=2, sector=8))
    assert isinstance(plan, Plan) and plan.offset == 4096 and plan.length == 8192
    assert [s.gref for s in plan.segments] == [10, 11]


def test_each_bad_request_is_rejected_with_a_reason():
    v = Validator(GEO)
    cases = {
        "bad_segment_count": [req(nseg=0), req(nseg=12)],
        "bad_sector_in_page": [req(segs=(Segment(1, 5, 2),)), req(segs=(Segment(1, 0, 8),))],
        "sector_out_of_range": [req(sector=2047, nseg=1), req(sector=2**64 - 1),
                                req(op=Op.DISCARD, nseg=0, sector=2000, nr_sectors=100)],
        "unknown_operation": [req(op=Op.RESERVED_1), blkif.encode_request(blkif.Request(0x77, 1, 0, 1, 0))],
        "bad_indirect_operation": [req(op=Op.INDIRECT, nseg=4, indirect_op=Op.DISCARD)],
    }
    for reason, raws in cases.items():
        for raw in raws:
            result = v.plan(raw)
            assert isinstance(result, Rejection), (reason, result)
            assert result.reason == reason and result.id == 99 or reason == "unknown_operation"
    assert v.rejected["bad_segment_count"] == 2
    ro = Validator(Geometry(2048, read_only=True))
    assert ro.plan(req(op=Op.WRITE)).reason == "write_to_read_only"
    assert ro.plan(req(op=Op.DISCARD, nseg=0, nr_sectors=8)).status == Status.EOPNOTSUPP


def test_indirect_request_two_steps():
    v = Validator(GEO)
    plan = v.plan(req(op=Op.INDIRECT, nseg=20, indirect_op=Op.WRITE, indirect_grefs=(5,)))
    assert isinstance(plan, Plan) and plan.indirect_grefs == (5,)
    page = b"".join(blkif.SEGMENT.pack(100 + i, 0, 7) for i in range(20)).ljust(4096, b"\0")
    full = v.indirect_segments(plan, [page], 20)
    assert isinstance(full, Plan) and full.length == 20 * 4096 and full.segments[19].gref == 119
    bad = b"".join(blkif.SEGMENT.pack(1, 7, 0) for _ in range(20)).ljust(4096, b"\0")
    assert v.indirect_segments(plan, [bad], 20).reason == "bad_sector_in_page"
    too_many = v.plan(req(op=Op.INDIRECT, nseg=5000, indirect_op=Op.READ))
    assert too_many.reason == "bad_segment_count"


@given(st.binary(min_size=112, max_size=112))
def test_garbage_never_raises_and_plans_stay_in_bounds(raw):
    result = Validator(GEO).plan(raw)
    if isinstance(result, Plan) and result.kind in (Op.READ, Op.WRITE, Op.DISCARD):
        assert result.offset + result.length <= GEO.sectors * 512 or result.indirect_grefs
        assert all(s.offset + s.length <= 4096 for s in result.segments)
