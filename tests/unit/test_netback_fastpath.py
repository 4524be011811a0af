"""netback's transmit fast path (netio.c) against Python's parser: whatever C writes to the
TAP is byte for byte what TxParser and vnet.header_for would have written, with the same
responses, and whatever it does not take comes back untouched, from a packet boundary."""
from __future__ import annotations

import os
import socket
import struct

from hypothesis import given, settings, strategies as st

from ringfence.backends.netback.datapath import TxPacket, TxParser, responses
from ringfence.backends.netback.fastpath import VifFastPath
from ringfence.hypervisor.io import netif, vnet
from ringfence.hypervisor.io.netif import STATUS_OKAY
from ringfence.hypervisor.io.ring import BackRing, FrontRing

PAGE = 4096
PAGES = 64
MAPPED = 48  # grefs 1000..1047 are mapped; the others are not (Python's to map)


def tcp_frame(payload: int, v6: bool = False) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + (b"\x86\xdd" if v6 else b"\x08\x00")
    if v6:
        ip = struct.pack(">IHBB16s16s", 6 << 28, 20 + payload, 6, 64, b"\x01" * 16, b"\x02" * 16)
    else:
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40 + payload, 1, 0, 64, 6, 0, b"\x0a" * 4, b"\x0b" * 4)
    tcp = struct.pack(">HHIIBBHHH", 1000, 2000, 1, 0, 5 << 4, 0x18, 1000, 0, 0)
    return eth + ip + tcp + os.urandom(payload)


class Harness:
    def __init__(self) -> None:
        self.pool = bytearray(PAGES * PAGE)
        self.tap, self.reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.reader.setblocking(False)
        self.fast = VifFastPath(self.tap.fileno(), rx_sg=True)
        for i in range(MAPPED):
            self.fast.remember(1000 + i, memoryview(self.pool)[i * PAGE:(i + 1) * PAGE], False)
        shared = bytearray(PAGE)
        self.front = FrontRing(shared, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
        self.back = BackRing(shared, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
        self.next_page = 0
        self.next_id = 0

    def packet(self, frame: bytes, flags: int, gso: tuple[int, int] = (0, 0),
               unmapped: bool = False) -> list[bytes]:
        """Lay the frame out as netfront does: a page a slot from offset 0."""
        pieces = []
        for at in range(0, len(frame), PAGE):
            page = self.next_page % PAGES
            self.next_page += 1
            self.pool[page * PAGE:page * PAGE + len(frame[at:at + PAGE])] = frame[at:at + PAGE]
            gref = 1000 + page if not unmapped and page < MAPPED else 5000 + page
            pieces.append((gref, self.next_id % 256, len(frame[at:at + PAGE])))
            self.next_id += 1
        return netif.encode_tx_packet(pieces, flags, *gso)

    def gather(self, packet: TxPacket) -> bytes:
        body = b""
        for seg in packet.segments:
            page = seg.gref - 1000 if seg.gref < 5000 else seg.gref - 5000
            body += bytes(self.pool[page * PAGE + seg.offset:page * PAGE + seg.offset + seg.length])
        return body

    def frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.reader.recv(1 << 17))
            except BlockingIOError:
                return out


def expected(h: Harness, raws: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """What Python's path writes for these requests and answers, packet by packet."""
    frames, answers = [], []
    for packet in TxParser().parse(raws):
        assert isinstance(packet, TxPacket)
        body = h.gather(packet)
        header = vnet.header_for(body, partial=bool(packet.flags & netif.TXF_CSUM_BLANK),
                                 validated=bool(packet.flags & netif.TXF_DATA_VALIDATED),
                                 gso_type=packet.gso_type, gso_size=packet.gso_size)
        assert header is not None, "served a packet Python refuses"
        frames.append(header + body)
        answers += responses(packet.layout, STATUS_OKAY)
    return frames, answers


def test_common_packets_reach_the_tap_as_python_would_write_them():
    h = Harness()
    raws = (h.packet(tcp_frame(100), netif.TXF_CSUM_BLANK | netif.TXF_DATA_VALIDATED)
            + h.packet(tcp_frame(60000), netif.TXF_CSUM_BLANK | netif.TXF_DATA_VALIDATED, (1, 1448))
            + h.packet(tcp_frame(9000, v6=True), netif.TXF_CSUM_BLANK, (2, 1428))
            + h.packet(tcp_frame(30), netif.TXF_DATA_VALIDATED) + h.packet(tcp_frame(30), 0))
    h.front.put_requests(raws)
    h.front.push_requests()
    back, notify = h.fast.serve(h.back)
    assert back == [] and notify
    frames, answers = expected(h, raws)
    assert h.frames() == frames
    assert h.front.take_responses() == answers
    stats = h.fast.statistics()
    assert stats.packets == 5 and stats.handed_back == 0 and stats.mapped_pages == MAPPED


def test_from_the_first_packet_python_must_see_the_rest_comes_back_untouched():
    h = Harness()
    good = h.packet(tcp_frame(100), netif.TXF_CSUM_BLANK)
    unmapped = h.packet(tcp_frame(100), netif.TXF_CSUM_BLANK, unmapped=True)
    later = h.packet(tcp_frame(100), netif.TXF_CSUM_BLANK)
    h.front.put_requests(good + unmapped + later)
    h.front.push_requests()
    back, _ = h.fast.serve(h.back)
    assert back == unmapped + later
    assert h.frames() == expected(h, good)[0]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20000), st.sampled_from([0, 1, 2, 3]),
                          st.sampled_from(["ok", "ok", "ok", "unmapped", "bad_size", "crosses",
                                           "udp_gso", "short_headers"])),
                min_size=1, max_size=8))
def test_any_batch_is_served_or_handed_back_as_python_would_treat_it(packets):
    h = Harness()
    raws, kinds = [], []
    for payload, flags, kind in packets:
        frame = tcp_frame(payload)
        gso = (1, 1448) if payload > 1500 and flags & 1 else (0, 0)
        if kind == "udp_gso":
            frame = frame[:23] + b"\x11" + frame[24:]  # UDP: not segmentable
            gso = (1, 1448)
        if kind == "short_headers":
            frame = frame[:20]
        slots = h.packet(frame, flags | (netif.TXF_CSUM_BLANK if gso[0] else 0), gso,
                         unmapped=kind == "unmapped")
        first = netif.decode_tx_request(slots[0])
        if kind == "bad_size":
            slots[0] = netif.TX_REQUEST.pack(first.gref, 0, first.flags, first.id, 10)
        if kind == "crosses":
            slots[0] = netif.TX_REQUEST.pack(first.gref, PAGE - 10, first.flags, first.id, first.size)
        raws.append(slots)
        kinds.append(kind)
    flat = [raw for slots in raws for raw in slots]
    h.front.put_requests(flat)
    h.front.push_requests()
    back, _ = h.fast.serve(h.back)
    served = len(flat) - len(back)
    assert back == flat[served:]
    boundaries = [sum(len(s) for s in raws[:i]) for i in range(len(raws) + 1)]
    assert served in boundaries  # whole packets only
    count = boundaries.index(served)
    served_raws = flat[:served]
    frames, answers = expected(h, served_raws)
    assert h.frames() == frames
    assert h.front.take_responses() == answers
    # a packet Python would refuse or must map first is never served here
    assert not {"unmapped", "bad_size", "crosses", "udp_gso"} & set(kinds[:count])


def test_received_packets_fill_the_posted_buffers_in_order_as_python_would():
    """The receive side: pieces of a page in the oldest buffers posted, the GSO extra's slot
    after the first, flags from the TAP's header; a buffer not mapped writable costs the
    packet (error status) and is counted; a packet waits for enough buffers."""
    h = Harness()
    h.tap.setblocking(False)  # as a TAP is
    for i in range(MAPPED):  # the guest's rx buffers, mapped writable when posted
        h.fast.remember(1000 + i, memoryview(h.pool)[i * PAGE:(i + 1) * PAGE], True)
    shared = bytearray(PAGE)
    front = FrontRing(shared, netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
    back = BackRing(shared, netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
    big, small = tcp_frame(9000), tcp_frame(50)
    h.reader.send(vnet.VnetHeader(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16).pack() + big)
    h.reader.send(vnet.VnetHeader(vnet.DATA_VALID).pack() + small)
    posted = [(i, 1000 + i) for i in range(4)]
    front.put_requests([netif.RX_REQUEST.pack(rid, gref) for rid, gref in posted])
    front.push_requests()
    h.fast.post_rx([netif.RX_REQUEST.unpack(raw) for raw in back.take_requests()])
    assert h.fast.serve_rx(back, 64)[0] == 1  # the small one waits: 3 pieces + extra took all 4
    rsps = front.take_responses()
    assert [netif.RX_RESPONSE.unpack(r) for r in rsps[:1]] == [
        (0, 0, netif.RXF_CSUM_BLANK | netif.RXF_DATA_VALIDATED | netif.RXF_MORE_DATA | netif.RXF_EXTRA_INFO, PAGE)]
    extra = netif.decode_extra(rsps[1])
    assert (extra.type, extra.flags, extra.gso_size, extra.gso_type) == (netif.ExtraType.GSO, 0, 1448, netif.GsoType.TCPV4)
    assert [netif.RX_RESPONSE.unpack(r) for r in rsps[2:]] == [
        (2, 0, netif.RXF_MORE_DATA, PAGE), (3, 0, 0, len(big) - 2 * PAGE)]
    assert bytes(h.pool[:PAGE]) + bytes(h.pool[2 * PAGE:4 * PAGE])[:len(big) - PAGE] == big
    # the next buffers: one not mapped writable
    front.put_requests([netif.RX_REQUEST.pack(9, 1005), netif.RX_REQUEST.pack(7, 9999)])
    front.push_requests()
    h.fast.post_rx([netif.RX_REQUEST.unpack(raw) for raw in back.take_requests()])
    h.reader.send(vnet.VnetHeader().pack() + small)
    assert h.fast.serve_rx(back, 64)[0] == 0  # both sent: the TAP is empty now
    (first, second) = [netif.RX_RESPONSE.unpack(r) for r in front.take_responses()]
    assert first == (9, 0, netif.RXF_DATA_VALIDATED, len(small))
    assert bytes(h.pool[5 * PAGE:5 * PAGE + len(small)]) == small
    assert second == (7, 0, 0, -1)
    stats = h.fast.statistics()
    assert (stats.rx_packets, stats.rx_bad_grants) == (2, 1)


def test_packets_read_straight_into_the_posted_buffers_are_where_the_responses_say():
    """With a largest packet's worth of buffers posted, the TAP is read into the guest's pages
    directly, assuming the last packet's layout (a GSO extra's slot after the first piece or
    not); a packet of the other kind is moved into place. Every packet comes out whole."""
    h = Harness()
    h.tap.setblocking(False)
    for i in range(MAPPED):
        h.fast.remember(1000 + i, memoryview(h.pool)[i * PAGE:(i + 1) * PAGE], True)
    shared = bytearray(PAGE)
    front = FrontRing(shared, netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
    back = BackRing(shared, netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
    gso = vnet.VnetHeader(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16).pack()
    plain = vnet.VnetHeader(vnet.DATA_VALID).pack()
    sent = [(gso, tcp_frame(9000)), (plain, tcp_frame(9000)), (plain, tcp_frame(5000)),
            (gso, tcp_frame(20000)), (plain, tcp_frame(60)), (gso, tcp_frame(65000)),
            (plain, tcp_frame(12000)), (gso, tcp_frame(3000))]
    for header, frame in sent:
        h.reader.send(header + frame)
    posted: list[int] = []
    next_id = 0

    def post(count: int) -> None:
        nonlocal next_id
        ids = [(next_id + i) % MAPPED for i in range(count)]
        next_id += count
        posted.extend(ids)
        front.put_requests([netif.RX_REQUEST.pack(rid, 1000 + rid) for rid in ids])
        front.push_requests()
        h.fast.post_rx([netif.RX_REQUEST.unpack(raw) for raw in back.take_requests()])

    post(40)
    received, pieces = [], b""
    while len(received) < len(sent):
        h.fast.serve_rx(back, 1)  # one packet a call: its pages are read before reuse
        rsps = front.take_responses()
        assert rsps, "a packet waits although buffers are posted"
        del posted[:len(rsps)]
        skip = False
        for raw in rsps:
            if skip:
                skip = False
                continue
            rid, _, flags, status = netif.RX_RESPONSE.unpack(raw)
            assert status >= 0
            pieces += bytes(h.pool[rid * PAGE:rid * PAGE + status])
            skip = bool(flags & netif.RXF_EXTRA_INFO)
            if not flags & netif.RXF_MORE_DATA:
                received.append(pieces)
                pieces = b""
        post(len(rsps))
    assert received == [frame for _, frame in sent]
    assert h.fast.statistics().rx_direct == len(sent)
