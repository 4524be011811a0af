"""The network-device wire format (Xen's io/netif.h), our own definitions."""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

TX_REQUEST = struct.Struct("<IHHHH")   # gref, offset, flags, id, size
TX_RESPONSE = struct.Struct("<Hh")     # id, status
RX_REQUEST = struct.Struct("<H2xI")    # id, gref
RX_RESPONSE = struct.Struct("<HHHh")   # id, offset, flags, status
EXTRA_INFO = struct.Struct("<BBHBBH")  # type, flags, gso.size, gso.type, gso.pad, gso.features
TX_SLOT = 12
RX_SLOT = 8
assert TX_REQUEST.size == 12 and TX_RESPONSE.size == 4
assert RX_REQUEST.size == 8 and RX_RESPONSE.size == 8 and EXTRA_INFO.size == 8

NR_SLOTS_MIN = 18            # XEN_NETIF_NR_SLOTS_MIN: slots a packet may always use
MAX_TX_SIZE = 0xFFFF         # XEN_NETIF_MAX_TX_SIZE
PAGE_SIZE = 4096


class TxFlags(enum.IntFlag):
    CSUM_BLANK = 1
    DATA_VALIDATED = 2
    MORE_DATA = 4
    EXTRA_INFO = 8


class RxFlags(enum.IntFlag):
    DATA_VALIDATED = 1
    CSUM_BLANK = 2
    MORE_DATA = 4
    EXTRA_INFO = 8
    GSO_PREFIX = 16


# The flags as plain ints for the per-packet paths (an IntFlag operation builds an enum
# object each time).
TXF_CSUM_BLANK, TXF_DATA_VALIDATED, TXF_MORE_DATA, TXF_EXTRA_INFO = 1, 2, 4, 8
RXF_DATA_VALIDATED, RXF_CSUM_BLANK, RXF_MORE_DATA, RXF_EXTRA_INFO = 1, 2, 4, 8
STATUS_OKAY, STATUS_ERROR, STATUS_DROPPED, STATUS_NULL = 0, -1, -2, 1


class Status(enum.IntEnum):
    NULL = 1
    OKAY = 0
    ERROR = -1
    DROPPED = -2


class ExtraType(enum.IntEnum):
    NONE = 0
    GSO = 1
    MCAST_ADD = 2
    MCAST_DEL = 3
    HASH = 4


class GsoType(enum.IntEnum):
    NONE = 0
    TCPV4 = 1
    TCPV6 = 2


EXTRA_FLAG_MORE = 1


@dataclass(frozen=True, slots=True)
class TxRequest:
    gref: int
    offset: int
    flags: int
    id: int
    size: int


def decode_tx_request(raw: bytes | memoryview, offset: int = 0) -> TxRequest:
    return TxRequest(*TX_REQUEST.unpack_from(raw, offset))


def encode_tx_request(req: TxRequest) -> bytes:
    return TX_REQUEST.pack(req.gref, req.offset, req.flags, req.id, req.size)


@dataclass(frozen=True, slots=True)
class Extra:
    type: int
    flags: int
    gso_size: int = 0
    gso_type: int = 0


def encode_gso_extra(gso_size: int, gso_type: int, slot_size: int) -> bytes:
    """A GSO extra-info slot (tx slots are 12 bytes, rx slots 8)."""
    return EXTRA_INFO.pack(ExtraType.GSO, 0, gso_size, gso_type, 0, 0).ljust(slot_size, b"\0")


def decode_extra(raw: bytes | memoryview) -> Extra:
    kind, flags, gso_size, gso_type, _, _ = EXTRA_INFO.unpack_from(raw)
    return Extra(kind, flags, gso_size, gso_type)


# virtio-net GSO types (a TAP's vnet header) and Xen's, both ways
GSO_TO_VNET = {GsoType.TCPV4: 1, GsoType.TCPV6: 4}
GSO_FROM_VNET = {1: GsoType.TCPV4, 4: GsoType.TCPV6}


def encode_tx_packet(pieces: list[tuple[int, int, int]], flags: int, gso_type: int = 0,
                     gso_size: int = 0) -> list[bytes]:
    """The tx slots of one packet whose pieces, (gref, id, length) each at offset 0, are in
    order: the first slot carries the total size and the flags, a GSO extra follows it,
    ``more_data`` on every slot but the last (netif.h's layout; netfront's C path writes
    the same)."""
    total = sum(length for _, _, length in pieces)
    requests = []
    for index, (gref, rid, length) in enumerate(pieces):
        more = TXF_MORE_DATA if index < len(pieces) - 1 else 0
        if index == 0:
            extra = TXF_EXTRA_INFO if gso_type else 0
            requests.append(TX_REQUEST.pack(gref, 0, flags | more | extra, rid, total))
            if gso_type:
                requests.append(encode_gso_extra(gso_size, gso_type, TX_SLOT))
        else:
            requests.append(TX_REQUEST.pack(gref, 0, more, rid, length))
    return requests
