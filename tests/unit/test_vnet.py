"""Where a frame's transport checksum lives, found by parsing headers a peer wrote: any bytes
are safe to parse, and real TCP/UDP frames over IPv4/IPv6 (with VLAN tags and extension
headers) give the offsets the kernel expects."""
from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from ringfence.hypervisor.io import vnet
from ringfence.hypervisor.io.netif import GsoType

ETH = b"\x02" * 6 + b"\x04" * 6


def ipv4(protocol: int, payload: bytes, options: bytes = b"", fragment: int = 0) -> bytes:
    ihl = (20 + len(options)) // 4
    header = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1,
                         fragment, 64, protocol, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    return header + options + payload


def tcp(data_offset_words: int = 5) -> bytes:
    return struct.pack(">HHIIBBHHH", 1, 2, 0, 0, data_offset_words << 4, 0x18, 1000, 0, 0) \
        + bytes((data_offset_words - 5) * 4)


frames = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda ethertype, ip, tail: ETH + ethertype + ip + tail,
              st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00\x00\x01\x08\x00"]),
              st.builds(lambda first, proto, rest: bytes([first]) + rest[:8] + bytes([proto]) + rest[8:],
                        st.integers(0, 255), st.sampled_from([6, 17, 0, 43, 60, 44]),
                        st.binary(min_size=0, max_size=40)),
              st.binary(max_size=80)))


@given(frames)
def test_any_bytes_parse_without_error_and_stay_inside_the_frame(frame):
    location = vnet.checksum_location(frame)
    if location is not None:
        start, offset, headers = location
        assert start + offset + 2 <= len(frame) and headers <= len(frame)


def test_tcp_and_udp_over_ipv4_with_options_and_a_vlan_tag():
    frame = ETH + b"\x08\x00" + ipv4(6, tcp(8) + b"data", options=b"\x01" * 4)
    assert vnet.checksum_location(frame) == (14 + 24, 16, 14 + 24 + 32)
    tagged = ETH + b"\x81\x00\x00\x05\x08\x00" + ipv4(17, b"\0" * 8 + b"x")
    assert vnet.checksum_location(tagged) == (18 + 20, 6, 18 + 28)


def test_ipv6_with_an_extension_header_and_what_has_no_location():
    hop_by_hop = bytes([6, 0]) + bytes(6)  # next header TCP, 8 bytes
    ip6 = struct.pack(">IHBB16s16s", 0x60000000, len(hop_by_hop) + 20, 0, 64, bytes(16), bytes(16))
    frame = ETH + b"\x86\xdd" + ip6 + hop_by_hop + tcp()
    assert vnet.checksum_location(frame) == (14 + 48, 16, 14 + 48 + 20)
    assert vnet.checksum_location(ETH + b"\x08\x00" + ipv4(1, b"\0" * 8)) is None      # ICMP
    assert vnet.checksum_location(ETH + b"\x08\x00" + ipv4(6, tcp(), fragment=5)) is None
    assert vnet.checksum_location(ETH + b"\x08\x06" + bytes(28)) is None                # ARP


def test_a_gso_frame_gets_a_header_only_for_tcp():
    frame = ETH + b"\x08\x00" + ipv4(6, tcp() + bytes(3000))
    header = vnet.unpack(vnet.header_for(frame, partial=True, validated=True,
                                         gso_type=GsoType.TCPV4, gso_size=1448))
    assert (header.flags, header.gso_type, header.gso_size) == (vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 1448)
    assert (header.csum_start, header.csum_offset, header.hdr_len) == (34, 16, 54)
    udp = ETH + b"\x08\x00" + ipv4(17, bytes(3000))
    assert vnet.header_for(udp, partial=True, validated=True, gso_type=GsoType.TCPV4, gso_size=1448) is None
    assert vnet.header_for(udp, partial=False, validated=True) == vnet.VnetHeader(vnet.DATA_VALID).pack()
