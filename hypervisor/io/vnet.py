"""The virtio-net header a TAP opened with IFF_VNET_HDR puts before every frame, and where a
frame's transport checksum lives (what a partial checksum needs to be finished).

TAPs here use a 12-byte header (``TUNSETVNETHDRSZ``: the 10-byte virtio_net_hdr and
num_buffers). ``TUNSETOFFLOAD`` decides what the kernel may hand us: partial checksums
(``TUN_F_CSUM``) and TCP segments up to 64 KiB (``TUN_F_TSO4/6``).
"""
from __future__ import annotations

import fcntl
import struct
from dataclasses import dataclass

from ringfence.hypervisor.io.netif import GSO_FROM_VNET, GSO_TO_VNET

HEADER = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HEADER_SIZE = HEADER.size           # 12
NEEDS_CSUM, DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN = 0, 1, 3, 4, 0x80
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 1, 2, 4, 8
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
IPPROTO_TCP, IPPROTO_UDP = 6, 17
IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options


@dataclass(frozen=True, slots=True)
class VnetHeader:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                           self.csum_start, self.csum_offset, 0)


PLAIN = VnetHeader().pack()


def unpack(raw: bytes | memoryview) -> VnetHeader:
    flags, gso_type, hdr_len, gso_size, start, offset, _ = HEADER.unpack_from(raw)
    return VnetHeader(flags, gso_type, hdr_len, gso_size, start, offset)


def set_offload(tap_fd: int, csum: bool, tso4: bool = False, tso6: bool = False) -> None:
    """What the kernel may give us on this TAP (segmentation needs checksum offload)."""
    flags = TUN_F_CSUM if csum else 0
    if csum and tso4:
        flags |= TUN_F_TSO4
    if csum and tso6:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    fcntl.ioctl(tap_fd, TUNSETOFFLOAD, flags)


def checksum_location(frame: bytes | memoryview) -> tuple[int, int, int] | None:
    """(csum_start, csum_offset, headers_length) of a TCP or UDP frame over IPv4 or IPv6,
    or None (another protocol, a fragment, or headers cut short). The frame is parsed, never
    trusted: every offset is checked against its length."""
    n = len(frame)
    at = 12
    if n < at + 2:
        return None
    ethertype = int.from_bytes(frame[at:at + 2], "big")
    at += 2
    if ethertype == ETH_P_8021Q:
        if n < at + 4:
            return None
        ethertype = int.from_bytes(frame[at + 2:at + 4], "big")
        at += 4
    if ethertype == ETH_P_IP:
        if n < at + 20:
            return None
        ihl = (frame[at] & 0x0F) * 4
        fragment = int.from_bytes(frame[at + 6:at + 8], "big") & 0x3FFF
        if ihl < 20 or fragment:
            return None
        protocol = frame[at + 9]
        at += ihl
    elif ethertype == ETH_P_IPV6:
        if n < at + 40:
            return None
        protocol = frame[at + 6]
        at += 40
        for _ in range(8):  # a bounded walk over extension headers
            if protocol not in IPV6_EXTENSIONS:
                break
            if n < at + 2:
                return None
            protocol, length = frame[at], (frame[at + 1] + 1) * 8
            at += length
    else:
        return None
    if protocol == IPPROTO_TCP:
        tcp_length = (frame[at + 12] >> 4) * 4 if n >= at + 20 else 0
        if tcp_length < 20 or n < at + tcp_length:
            return None
        return at, 16, at + tcp_length
    if protocol == IPPROTO_UDP:
        if n < at + 8:
            return None
        return at, 6, at + 8
    return None


def header_for(frame: bytes | memoryview, *, partial: bool, validated: bool, gso_type: int = 0,
               gso_size: int = 0) -> bytes | None:
    """The vnet header to write ``frame`` to a TAP with, from what the other end said of it
    (a partial checksum, a checksum already checked, Xen GSO type and size); None when it
    asks for a checksum or segmentation the frame's headers do not allow (drop it)."""
    if gso_type:
        location = checksum_location(frame)
        vnet_gso = GSO_TO_VNET.get(gso_type)  # type: ignore[call-overload]
        if location is None or vnet_gso is None or location[1] != 16:
            return None  # only TCP is segmented
        start, offset, headers = location
        return VnetHeader(NEEDS_CSUM, vnet_gso, headers, gso_size, start, offset).pack()
    if partial:
        location = checksum_location(frame)
        if location is None:
            return None
        return VnetHeader(NEEDS_CSUM, GSO_NONE, 0, 0, location[0], location[1]).pack()
    return VnetHeader(DATA_VALID).pack() if validated else PLAIN


def describe(header: VnetHeader) -> tuple[bool, bool, int, int]:
    """(partial checksum, validated, Xen GSO type, GSO size) of what a TAP handed us; Xen
    GSO type 0 also for kinds Xen cannot carry (the caller drops those)."""
    partial = bool(header.flags & NEEDS_CSUM)
    validated = partial or bool(header.flags & DATA_VALID)
    kind = header.gso_type & ~GSO_ECN
    gso = int(GSO_FROM_VNET.get(kind, 0)) if kind else 0
    return partial, validated, gso, header.gso_size if gso else 0
