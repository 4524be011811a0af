"""blkback's request handling: validate every request, then plan its I/O (sans-IO core).

:func:`plan_request` turns one request, already copied out of the ring, into either an
error response or a plan: the byte range on the disk and, per segment, which granted page and
which bytes of it. Nothing here trusts the frontend: operation, segment count, sector
offsets within the page, the range on the disk, writes to a read-only disk and indirect
descriptors are all checked, and each failure is counted by reason (``BlkStatistics``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ringfence.hypervisor.io import blkif
from ringfence.hypervisor.io.blkif import Op, Status

SECTOR = blkif.SECTOR_SIZE
MAX_INDIRECT_SEGMENTS = 256  # feature-max-indirect-segments we advertise


@dataclass(frozen=True, slots=True)
class Geometry:
    sectors: int          # in 512-byte units
    read_only: bool
    discard: bool = True
    flush: bool = True
    max_indirect_segments: int = MAX_INDIRECT_SEGMENTS


@dataclass(frozen=True, slots=True)
class SegmentPlan:
    gref: int
    offset: int   # byte offset in the granted page
    length: int


@dataclass(frozen=True, slots=True)
class Plan:
    id: int
    operation: int          # as the frontend sent it (echoed in the response)
    kind: int               # READ, WRITE, FLUSH_DISKCACHE or DISCARD
    offset: int = 0         # on the disk, bytes
    length: int = 0
    segments: tuple[SegmentPlan, ...] = ()
    indirect_grefs: tuple[int, ...] = ()  # pages still to read the segments from


@dataclass(frozen=True, slots=True)
class Rejection:
    id: int
    operation: int
    status: int
    reason: str


class Validator:
    """Checks requests against a device; counts what it refuses, by reason."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.rejected: Counter[str] = Counter()

    def reject(self, req: blkif.Request, reason: str, status: int = Status.ERROR) -> Rejection:
        self.rejected[reason] += 1
        return Rejection(req.id, req.operation, status, reason)

    def plan(self, raw: bytes) -> Plan | Rejection:
        req = blkif.decode_request(raw)
        g = self.geometry
        op = req.operation
        if op in (Op.READ, Op.WRITE):
            if op == Op.WRITE and g.read_only:
                return self.reject(req, "write_to_read_only")
            if not 1 <= req.nr_segments <= blkif.MAX_SEGMENTS_PER_REQUEST:
                return self.reject(req, "bad_segment_count")
            return self._segments(req, op, req.segments)
        if op == Op.INDIRECT:
            if req.indirect_op not in (Op.READ, Op.WRITE):
                return self.reject(req, "bad_indirect_operation")
            if req.indirect_op == Op.WRITE and g.read_only:
                return self.reject(req, "write_to_read_only")
            if not 1 <= req.nr_segments <= g.max_indirect_segments:
                return self.reject(req, "bad_segment_count")
            pages = -(-req.nr_segments // blkif.SEGMENTS_PER_INDIRECT_FRAME)
            return Plan(req.id, op, req.indirect_op, req.sector_number * SECTOR, 0, (),
                        tuple(req.indirect_grefs[:pages]))
        if op in (Op.FLUSH_DISKCACHE, Op.WRITE_BARRIER):
            if not g.flush:
                return self.reject(req, "unsupported_operation", Status.EOPNOTSUPP)
            return Plan(req.id, op, Op.FLUSH_DISKCACHE)
        if op == Op.DISCARD:
            if not g.discard or g.read_only:
                return self.reject(req, "unsupported_operation", Status.EOPNOTSUPP)
            end = req.sector_number + req.nr_sectors
            if req.nr_sectors == 0 or end > g.sectors or end < req.sector_number:
                return self.reject(req, "sector_out_of_range")
            return Plan(req.id, op, Op.DISCARD, req.sector_number * SECTOR, req.nr_sectors * SECTOR)
        return self.reject(req, "unknown_operation", Status.EOPNOTSUPP)

    def indirect_segments(self, plan: Plan, pages: list[bytes], nr_segments: int) -> Plan | Rejection:
        """Second step of an indirect request, once its indirect pages are copied in."""
        segments: list[blkif.Segment] = []
        for page in pages:
            segments += blkif.decode_indirect_segments(page, nr_segments - len(segments))
        fake = blkif.Request(plan.operation, nr_segments, 0, plan.id, plan.offset // SECTOR)
        return self._segments(fake, plan.kind, tuple(segments))

    def _segments(self, req: blkif.Request, kind: int, segments: tuple[blkif.Segment, ...]) -> Plan | Rejection:
        planned = []
        total = 0
        for seg in segments:
            if seg.first_sect > seg.last_sect or seg.last_sect > blkif.MAX_SECTOR_IN_PAGE:
                return self.reject(req, "bad_sector_in_page")
            length = (seg.last_sect - seg.first_sect + 1) * SECTOR
            planned.append(SegmentPlan(seg.gref, seg.first_sect * SECTOR, length))
            total += length
        end_sector = req.sector_number + total // SECTOR
        if end_sector > self.geometry.sectors or end_sector < req.sector_number:
            return self.reject(req, "sector_out_of_range")
        return Plan(req.id, req.operation, kind, req.sector_number * SECTOR, total, tuple(planned))
