"""The block-device wire format (Xen's io/blkif.h, x86_64 layout), our own definitions.

Decoding works on bytes already copied out of the ring (see ring.py), so every field is read
from private memory; validation of what the fields mean is the backend's job.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

SECTOR_SIZE = 512
MAX_SEGMENTS_PER_REQUEST = 11
MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENTS_PER_INDIRECT_FRAME = 4096 // 8
MAX_SECTOR_IN_PAGE = 4096 // SECTOR_SIZE - 1  # first_sect/last_sect are 0..7
REQUEST_SIZE = 112
RESPONSE_SIZE = 16
SLOT_SIZE = REQUEST_SIZE
DISCARD_SECURE = 1


class Op(enum.IntEnum):
    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class Status(enum.IntEnum):
    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


# operation, nr_segments, handle, (pad), id, sector_number
HEADER = struct.Struct("<BBH4xQQ")
SEGMENT = struct.Struct("<IBB2x")                 # gref, first_sect, last_sect
DISCARD = struct.Struct("<BBH4xQQQ")              # operation, flag, handle, id, sector, nr_sectors
INDIRECT = struct.Struct("<BBH4xQQH2x8I4x")       # op, indirect_op, nr_segments, id, sector, handle, grefs
RESPONSE = struct.Struct("<QBxh4x")               # id, operation, status
SEGMENTS_OFFSET = HEADER.size                     # 24
assert SEGMENTS_OFFSET + MAX_SEGMENTS_PER_REQUEST * SEGMENT.size == REQUEST_SIZE
assert RESPONSE.size == RESPONSE_SIZE and INDIRECT.size == 64


@dataclass(frozen=True, slots=True)
class Segment:
    gref: int
    first_sect: int
    last_sect: int


@dataclass(frozen=True, slots=True)
class Request:
    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...] = ()
    # discard
    flag: int = 0
    nr_sectors: int = 0
    # indirect
    indirect_op: int = 0
    indirect_grefs: tuple[int, ...] = ()


def decode_request(raw: bytes | memoryview) -> Request:
    """Decode one 112-byte slot (already private). Segment count is not trusted here: only
    as many segments as the slot can hold are read."""
    op = raw[0]
    if op == Op.DISCARD:
        _, flag, handle, rid, sector, nr_sectors = DISCARD.unpack_from(raw)
        return Request(op, 0, handle, rid, sector, flag=flag, nr_sectors=nr_sectors)
    if op == Op.INDIRECT:
        _, indirect_op, nr_segments, rid, sector, handle, *grefs = INDIRECT.unpack_from(raw)
        return Request(op, nr_segments, handle, rid, sector, indirect_op=indirect_op,
                       indirect_grefs=tuple(grefs))
    _, nr_segments, handle, rid, sector = HEADER.unpack_from(raw)
    count = min(nr_segments, MAX_SEGMENTS_PER_REQUEST)
    segments = tuple(Segment(*SEGMENT.unpack_from(raw, SEGMENTS_OFFSET + i * SEGMENT.size))
                     for i in range(count))
    return Request(op, nr_segments, handle, rid, sector, segments)


def encode_request(req: Request) -> bytes:
    if req.operation == Op.DISCARD:
        body = DISCARD.pack(req.operation, req.flag, req.handle, req.id, req.sector_number,
                            req.nr_sectors)
    elif req.operation == Op.INDIRECT:
        grefs = list(req.indirect_grefs) + [0] * (MAX_INDIRECT_PAGES_PER_REQUEST - len(req.indirect_grefs))
        body = INDIRECT.pack(req.operation, req.indirect_op, req.nr_segments, req.id,
                             req.sector_number, req.handle, *grefs)
    else:
        body = HEADER.pack(req.operation, req.nr_segments, req.handle, req.id, req.sector_number)
        body += b"".join(SEGMENT.pack(s.gref, s.first_sect, s.last_sect) for s in req.segments)
    return body.ljust(REQUEST_SIZE, b"\0")


# READ/WRITE requests of n whole-page segments but the last, one Struct each (the hot path)
_RW = [struct.Struct("<BBH4xQQ" + "IBB2x" * n + f"{(MAX_SEGMENTS_PER_REQUEST - n) * 8}x")
       for n in range(MAX_SEGMENTS_PER_REQUEST + 1)]


def encode_page_request(operation: int, handle: int, rid: int, sector: int,
                        grefs: list[int], sectors_in_last: int) -> bytes:
    """A READ or WRITE of whole granted pages (the last one's first ``sectors_in_last``
    sectors): what :func:`encode_request` gives for it, without building a Request."""
    fields: list[int] = []
    last = len(grefs) - 1
    for i, gref in enumerate(grefs):
        fields += (gref, 0, (sectors_in_last if i == last else 8) - 1)
    return _RW[len(grefs)].pack(operation, len(grefs), handle, rid, sector, *fields)


def decode_indirect_segments(page: bytes | memoryview, count: int) -> list[Segment]:
    """Segments from one indirect page (already copied), at most 512."""
    return [Segment(*SEGMENT.unpack_from(page, i * SEGMENT.size))
            for i in range(min(count, SEGMENTS_PER_INDIRECT_FRAME))]


def encode_response(rid: int, operation: int, status: int) -> bytes:
    return RESPONSE.pack(rid, operation & 0xFF, status)


def decode_response(raw: bytes | memoryview) -> tuple[int, int, int]:
    rid, operation, status = RESPONSE.unpack_from(raw)
    return rid, operation, status
