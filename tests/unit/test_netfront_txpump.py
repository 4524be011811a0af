"""netfront's transmit side in C: what it puts on the ring for each frame eth0 hands it parses
back, in netback's TxParser, to that frame with its offloads; answers give the buffers back,
and answers for buffers not on the ring are counted and change nothing."""
from __future__ import annotations

import os
import socket

from ringfence.backends.netback.datapath import TxPacket, TxParser, responses
from ringfence.frontends.netfront.fastpath import VifPump
from ringfence.hypervisor.io import netif, vnet
from ringfence.hypervisor.io.ring import BackRing, FrontRing

PAGE = 4096
BUFFERS = 64


class Harness:
    def __init__(self, sg: bool = True) -> None:
        self.pages = bytearray(BUFFERS * PAGE)
        self.grefs = [2000 + i for i in range(BUFFERS)]
        # a seqpacket socket hands over one frame a read, as a TAP does
        self.eth0, self.tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tap.setblocking(False)
        self.pump = VifPump(self.tap.fileno(), self.pages, self.grefs, sg)
        shared = bytearray(PAGE)
        self.front = FrontRing(shared, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
        self.back = BackRing(shared, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)

    def send(self, frame: bytes, header: vnet.VnetHeader = vnet.VnetHeader()) -> None:
        self.eth0.send(header.pack() + frame)

    def received(self) -> list[tuple[TxPacket, bytes]]:
        raws = self.back.take_requests()
        out = []
        for packet in TxParser().parse(raws):
            assert isinstance(packet, TxPacket)
            body = b"".join(bytes(self.pages[(s.gref - 2000) * PAGE + s.offset:
                                             (s.gref - 2000) * PAGE + s.offset + s.length])
                            for s in packet.segments)
            out.append((packet, body))
        self.raws = raws
        return out


def test_frames_reach_the_ring_with_their_offloads_and_come_back_as_buffers():
    h = Harness()
    small, big = os.urandom(100), os.urandom(60000)
    h.send(small, vnet.VnetHeader(vnet.NEEDS_CSUM, 0, 0, 0, 34, 16))
    h.send(big, vnet.VnetHeader(vnet.NEEDS_CSUM, vnet.GSO_TCPV4 | vnet.GSO_ECN, 54, 1448, 34, 16))
    h.send(small, vnet.VnetHeader(vnet.DATA_VALID))
    assert h.pump.pump(h.front, 64) == (VifPump.TAP_EMPTY, True)
    (p1, b1), (p2, b2), (p3, b3) = h.received()
    assert b1 == small and p1.flags == netif.TXF_CSUM_BLANK | netif.TXF_DATA_VALIDATED
    assert b2 == big and (p2.gso_type, p2.gso_size) == (netif.GsoType.TCPV4, 1448)
    assert len(p2.segments) == 15
    assert b3 == small and p3.flags == netif.TXF_DATA_VALIDATED
    assert h.raws[2:3] == [netif.encode_gso_extra(1448, netif.GsoType.TCPV4, netif.TX_SLOT)]
    assert h.pump.packets == 3
    # every slot answered: every buffer back, the extra's NULL answer ignored
    h.back.put_responses([a for p in (p1, p2, p3) for a in responses(p.layout, netif.STATUS_OKAY)])
    h.back.push_responses()
    assert h.pump.complete(h.front) == 17 and h.pump.bad_responses == 0


def test_answers_for_buffers_not_on_the_ring_are_counted_and_ignored():
    h = Harness()
    h.send(os.urandom(100))
    h.pump.pump(h.front, 64)
    ((packet, _),) = h.received()
    (rid,) = packet.layout
    h.back.put_responses([netif.TX_RESPONSE.pack(rid, 0)])
    h.back.push_responses()
    assert h.pump.complete(h.front) == 1
    h.send(os.urandom(100))
    h.pump.pump(h.front, 64)
    h.received()
    h.back.put_responses([netif.TX_RESPONSE.pack(rid, 0) if rid != 63 else netif.TX_RESPONSE.pack(999, 0)])
    h.back.push_responses()  # the buffer answered before, again (or one that never was)
    h.pump.complete(h.front)
    assert h.pump.bad_responses == 1


def test_frames_the_backend_cannot_take_are_dropped_and_counted():
    h = Harness(sg=False)
    h.send(os.urandom(6000))                                             # two pages, no sg
    h.send(os.urandom(100), vnet.VnetHeader(vnet.NEEDS_CSUM, vnet.GSO_UDP, 42, 1400, 34, 6))
    h.send(b"")                                                         # nothing but the header
    h.send(os.urandom(100))
    assert h.pump.pump(h.front, 64)[0] == VifPump.TAP_EMPTY
    assert h.pump.dropped == 2 and h.pump.packets == 2  # the empty one goes: netback refuses it


def test_no_room_then_a_budget_leave_the_rest_on_the_tap():
    h = Harness()
    for _ in range(5):
        h.send(os.urandom(100))
    assert h.pump.pump(h.front, 2) == (VifPump.BUDGET, True)
    assert h.pump.packets == 2
    h.pump.pump(h.front, 64)
    assert h.pump.packets == 5
    for _ in range(BUFFERS):
        h.send(os.urandom(100))
    assert h.pump.pump(h.front, 1000)[0] == VifPump.NO_ROOM  # 17 buffers must stay free
    assert h.pump.packets == 5 + BUFFERS - 5 - 16


def test_received_pieces_reach_eth0_as_one_frame_with_its_offloads():
    """The receive side: each answer is for the oldest buffer posted; the pieces of a packet
    and its GSO extra make one frame on eth0; a wrong id costs the packet; buffers go back."""
    pages = bytearray(2 * BUFFERS * PAGE)
    eth0, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)
    eth0.setblocking(False)
    pump = VifPump(tap.fileno(), pages, [2000 + i for i in range(BUFFERS)], True,
                  [3000 + i for i in range(BUFFERS)])
    shared = bytearray(PAGE)
    front = FrontRing(shared, netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
    back = BackRing(shared, netif.RX_REQUEST.size, netif.RX_RESPONSE.size, netif.RX_SLOT)
    pump.start_rx(front)
    posted = [netif.RX_REQUEST.unpack(raw) for raw in back.take_requests()]
    assert posted[:3] == [(0, 3000), (1, 3001), (2, 3002)] and len(posted) == BUFFERS
    frame = bytes(14) + os.urandom(5000)
    rx = memoryview(pages)[BUFFERS * PAGE:]
    rx[0:PAGE] = frame[:PAGE]                      # buffer 0: the first piece
    rx[2 * PAGE:2 * PAGE + len(frame) - PAGE] = frame[PAGE:]  # buffer 2 (1 holds the extra)
    back.put_responses([
        netif.RX_RESPONSE.pack(0, 0, netif.RXF_DATA_VALIDATED | netif.RXF_MORE_DATA | netif.RXF_EXTRA_INFO, PAGE),
        netif.encode_gso_extra(1448, netif.GsoType.TCPV4, netif.RX_SLOT),
        netif.RX_RESPONSE.pack(2, 0, 0, len(frame) - PAGE),
        netif.RX_RESPONSE.pack(7, 0, 0, 100)])      # buffer 3's answer with another id
    back.push_responses()
    assert pump.receive(front)[0] == 4
    # a GSO frame whose headers are not TCP's cannot be segmented: dropped; the bad id too
    assert pump.rx_dropped == 2 and pump.bad_responses == 1
    assert [netif.RX_REQUEST.unpack(raw)[0] for raw in back.take_requests()] == [0, 1, 2, 3]
    plain = bytes(14) + os.urandom(300)
    rx[4 * PAGE:4 * PAGE + len(plain)] = plain
    back.put_responses([netif.RX_RESPONSE.pack(4, 0, netif.RXF_DATA_VALIDATED, len(plain))])
    back.push_responses()
    pump.receive(front)
    assert eth0.recv(1 << 17) == vnet.VnetHeader(vnet.DATA_VALID).pack() + plain
    assert pump.rx_packets == 1


def test_a_granted_page_holds_only_the_frames_bytes():
    """ATTACKS A5 (XSA-403) for netfront: what the backend can read of a tx buffer is the
    frame it was given and zeroes, never an older frame's bytes (sent or dropped) nor what the
    pages held before the connection."""
    pages = bytearray(b"\xa5" * (BUFFERS * PAGE))  # a canary: what the guest had there
    eth0, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tap.setblocking(False)
    pump = VifPump(tap.fileno(), pages, [2000 + i for i in range(BUFFERS)], True)
    shared = bytearray(PAGE)
    front = FrontRing(shared, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
    back = BackRing(shared, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
    assert b"\xa5" not in pages
    sizes = [60000, 5000, 100, 9000, 14, 4096, 8193, 300]
    for round_ in range(3):  # buffers come back and hold shorter frames than before
        eth0.send(vnet.VnetHeader().pack() + b"\xee" * 69000)  # read into free pages, dropped
        for size in sizes:
            eth0.send(vnet.VnetHeader().pack() + b"\xff" * size)
        pump.pump(front, 64)
        raws = back.take_requests()
        packets = [p for p in TxParser().parse(raws) if isinstance(p, TxPacket)]
        assert len(packets) == len(sizes)
        for packet in packets:
            for seg in packet.segments:
                start = (seg.gref - 2000) * PAGE
                page = bytes(pages[start:start + PAGE])
                assert page[seg.offset:seg.offset + seg.length] == b"\xff" * seg.length
                assert not any(page[:seg.offset]) and not any(page[seg.offset + seg.length:])
        back.put_responses([a for p in packets for a in responses(p.layout, netif.STATUS_OKAY)])
        back.push_responses()
        pump.complete(front)
        sizes.reverse()
