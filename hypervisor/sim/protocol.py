"""Wire format of the sim hypervisor's control socket (sans-IO, no system calls).

Every message is one SOCK_SEQPACKET datagram: a 12-byte header (magic, op, request id,
payload length) and a payload whose layout the op fixes. Replies carry the request's id and
``op | REPLY``. Decoding validates everything before anything else reads it: a message that is
truncated, too long, of an unknown op or with a length that does not match is a
:class:`ProtocolError`, and the daemon closes that connection.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAGIC = 0x5246  # "RF"
HEADER = struct.Struct("<HHII")
MAX_MESSAGE = 65536
MAX_BATCH = 1024          # items in one map/unmap/copy/register request
MAX_FDS_PER_MESSAGE = 250  # below the kernel's SCM_MAX_FD of 253
MAX_NAME = 64
REPLY = 0x8000
EVENT = 0x4000
PAGE_SIZE = 4096


class Op(enum.IntEnum):
    HELLO = 1
    ALLOC_PAGES = 2
    REGISTER_PAGES = 3
    FREE_PAGES = 4
    GNT_MAP = 5
    GNT_UNMAP = 6
    GNT_COPY = 7
    EVT_ALLOC_UNBOUND = 8
    EVT_BIND_INTERDOMAIN = 9
    EVT_CLOSE = 10
    STATISTICS = 11
    STORE_CONNECT = 12    # a XenStore connection authenticated as this domain
    STORE_RING = 13       # this domain's XenStore ring page (reserved gref 1) and port are set up
    # dom0 only
    CREATE_DOMAIN = 20
    DESTROY_DOMAIN = 21
    LIST_DOMAINS = 22
    SUBSCRIBE = 23
    STORE_REGISTER = 24   # this dom0 connection is xenstored: receive domains' connections
    RENAME_DOMAIN = 25    # as libxl_domain_rename: a warm spare takes its predecessor's name
    NOTIFY_ON_DEATH = 26  # notify one of dom0's bound ports when a domain's process has exited
    REVOKE_MAPPED = 27    # the fault harness: end a domain's grants that others hold mapped


class EventKind(enum.IntEnum):
    INTRODUCED = 1
    RELEASED = 2
    STORE_CONNECTION = 3  # carries one end of a domain's XenStore socket
    STORE_RING = 4        # a domain's XenStore ring is ready: STORE_RING_BODY follows


class GNTST(enum.IntEnum):
    """Grant operation status codes, as xen/grant_table.h."""
    okay = 0
    general_error = -1
    bad_domain = -2
    bad_gntref = -3
    bad_handle = -4
    bad_virt_addr = -5
    bad_dev_addr = -6
    no_device_space = -7
    permission_denied = -8
    bad_page = -9
    bad_copy_arg = -10
    address_too_big = -11
    eagain = -12
    no_space = -13


class ProtocolError(ValueError):
    """A message that breaks the wire format; the connection that sent it is closed."""


# Fixed item layouts.
COUNT = struct.Struct("<I")
STATUS = struct.Struct("<i")
U16 = struct.Struct("<H")
HELLO_REPLY = struct.Struct("<HII")          # domid, grant entries, ram pages
REGISTER_ITEM = struct.Struct("<Ii")         # frame, fd number in the domain
MAP_ITEM = struct.Struct("<HHI")             # granter domid, flags, gref
MAP_RESULT = struct.Struct("<iI")            # status, handle
COPY_ITEM = struct.Struct("<BBHHHIIQQII")    # see CopySegment
EVT_BIND = struct.Struct("<HI")              # remote domid, remote port
DEATH_NOTICE = struct.Struct("<HI")          # domid watched, dom0's local port to notify
PORT = struct.Struct("<I")
EVENT_BODY = struct.Struct("<HH")            # kind, domid
STORE_RING_BODY = struct.Struct("<IB")       # port, 1 if announced again to a new xenstored
MAP_READONLY = 1


@dataclass(frozen=True, slots=True)
class Message:
    op: int
    req_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class CopySide:
    """One end of a grant copy: a granted page of ``domid`` or the caller's own memory."""
    is_gref: bool
    domid: int
    gref: int
    offset: int  # offset in the granted page, or an address in the caller


@dataclass(frozen=True, slots=True)
class CopySegment:
    source: CopySide
    dest: CopySide
    length: int


def encode(op: int, req_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_MESSAGE - HEADER.size:
        raise ValueError("payload too large")
    return HEADER.pack(MAGIC, op, req_id, len(payload)) + payload


def decode(data: bytes) -> Message:
    if len(data) < HEADER.size:
        raise ProtocolError(f"truncated header ({len(data)} bytes)")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too long")
    magic, op, req_id, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic:#x}")
    if length != len(data) - HEADER.size:
        raise ProtocolError(f"length {length} does not match payload of {len(data) - HEADER.size}")
    return Message(op, req_id, bytes(data[HEADER.size:]))


def _items(payload: bytes, item: struct.Struct, what: str) -> list[tuple[int, ...]]:
    if len(payload) < COUNT.size:
        raise ProtocolError(f"{what}: missing count")
    (count,) = COUNT.unpack_from(payload)
    if count > MAX_BATCH:
        raise ProtocolError(f"{what}: batch of {count} exceeds {MAX_BATCH}")
    if len(payload) != COUNT.size + count * item.size:
        raise ProtocolError(f"{what}: {len(payload)} bytes for {count} items")
    return [item.unpack_from(payload, COUNT.size + i * item.size) for i in range(count)]


def pack_items(item: struct.Struct, rows: list[tuple[int, ...]]) -> bytes:
    return COUNT.pack(len(rows)) + b"".join(item.pack(*row) for row in rows)


def _exact(payload: bytes, layout: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) != layout.size:
        raise ProtocolError(f"{what}: expected {layout.size} bytes, got {len(payload)}")
    return layout.unpack(payload)


def decode_empty(payload: bytes, what: str) -> None:
    if payload:
        raise ProtocolError(f"{what}: unexpected payload")


def decode_count(payload: bytes, what: str, limit: int) -> int:
    (count,) = _exact(payload, COUNT, what)
    if not 0 < count <= limit:
        raise ProtocolError(f"{what}: count {count} outside 1..{limit}")
    return count


def decode_register(payload: bytes) -> list[tuple[int, int]]:
    return [(frame, fd) for frame, fd in _items(payload, REGISTER_ITEM, "register")]


def decode_frames(payload: bytes) -> list[int]:
    return [frame for (frame,) in _items(payload, COUNT, "frames")]


def decode_map(payload: bytes) -> list[tuple[int, bool, int]]:
    rows = _items(payload, MAP_ITEM, "map")
    for _, flags, _ in rows:
        if flags & ~MAP_READONLY:
            raise ProtocolError(f"map: unknown flags {flags:#x}")
    return [(domid, bool(flags & MAP_READONLY), gref) for domid, flags, gref in rows]


def decode_handles(payload: bytes) -> list[int]:
    return [handle for (handle,) in _items(payload, COUNT, "unmap")]


def encode_copy(segments: list[CopySegment]) -> bytes:
    rows = []
    for seg in segments:
        s, d = seg.source, seg.dest
        rows.append((int(s.is_gref), int(d.is_gref), s.domid, d.domid, 0, s.gref, d.gref,
                     s.offset, d.offset, seg.length, 0))
    return pack_items(COPY_ITEM, rows)


def decode_copy(payload: bytes) -> list[CopySegment]:
    segments = []
    for s_kind, d_kind, s_dom, d_dom, pad, s_ref, d_ref, s_off, d_off, length, pad2 in _items(
            payload, COPY_ITEM, "copy"):
        if s_kind > 1 or d_kind > 1 or pad or pad2:
            raise ProtocolError("copy: bad segment kind or padding")
        segments.append(CopySegment(CopySide(bool(s_kind), s_dom, s_ref, s_off),
                                    CopySide(bool(d_kind), d_dom, d_ref, d_off), length))
    return segments


def decode_domid(payload: bytes, what: str) -> int:
    return _exact(payload, U16, what)[0]


def decode_bind(payload: bytes) -> tuple[int, int]:
    domid, port = _exact(payload, EVT_BIND, "bind")
    return domid, port


def decode_death_notice(payload: bytes) -> tuple[int, int]:
    domid, port = _exact(payload, DEATH_NOTICE, "notify_on_death")
    return domid, port


def decode_port(payload: bytes) -> int:
    return _exact(payload, PORT, "port")[0]


def decode_name(payload: bytes) -> str:
    if not 0 < len(payload) <= MAX_NAME:
        raise ProtocolError(f"name of {len(payload)} bytes")
    try:
        name = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("name is not UTF-8") from None
    if not name.isprintable() or "/" in name:
        raise ProtocolError("name has unprintable characters or '/'")
    return name


def decode_rename(payload: bytes) -> tuple[int, str]:
    if len(payload) < U16.size:
        raise ProtocolError("rename without a domid")
    return U16.unpack_from(payload)[0], decode_name(payload[U16.size:])


def reply(msg: Message, status: int, body: bytes = b"") -> bytes:
    return encode(msg.op | REPLY, msg.req_id, STATUS.pack(status) + body)


def split_reply(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < STATUS.size:
        raise ProtocolError("reply without status")
    return STATUS.unpack_from(payload)[0], payload[STATUS.size:]
