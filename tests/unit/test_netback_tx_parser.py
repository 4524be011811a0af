"""netback's tx validation: what netfront sends parses back to the same packets; any byte
string parses into packets and refusals that answer every slot, or a Fatal — never
anything else."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from ringfence.backends.netback.datapath import Fatal, TxPacket, TxParser, TxRefusal, responses
from ringfence.hypervisor.io import netif
from ringfence.hypervisor.io.netif import GsoType, Status, TxFlags

packet = st.tuples(st.integers(14, 65535), st.sampled_from([0, GsoType.TCPV4, GsoType.TCPV6]),
                   st.integers(1, 9000), st.sampled_from([0, TxFlags.DATA_VALIDATED,
                                                          TxFlags.CSUM_BLANK | TxFlags.DATA_VALIDATED]))


@given(st.lists(packet, min_size=1, max_size=6))
def test_what_netfront_sends_parses_back(packets):
    raws, expected, rid = [], [], 0
    for size, gso_type, gso_size, flags in packets:
        pieces = []
        for start in range(0, size, 4096):
            pieces.append((1000 + rid, rid, min(4096, size - start)))
            rid += 1
        raws += netif.encode_tx_packet(pieces, flags, gso_type, gso_size)
        expected.append((size, pieces, gso_type, gso_size if gso_type else 0, flags))
    parsed = TxParser().parse(raws)
    assert len(parsed) == len(expected)
    for got, (size, pieces, gso_type, gso_size, flags) in zip(parsed, expected):
        assert isinstance(got, TxPacket)
        assert got.size == size and got.gso_type == gso_type and got.gso_size == gso_size
        assert [(s.gref, s.length) for s in got.segments] == [(g, n) for g, _, n in pieces]
        assert got.flags & (TxFlags.CSUM_BLANK | TxFlags.DATA_VALIDATED) == flags
        assert [r for r in got.layout if r is not None] == [i for _, i, _ in pieces]


@settings(max_examples=500)
@given(st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=40))
def test_any_slots_are_answered_or_fatal(raws):
    parser = TxParser()
    try:
        parsed = parser.parse(raws)
    except Fatal as exc:
        assert parser.rejected[str(exc)] == 1
        return
    assert sum(len(p.layout) for p in parsed) == len(raws)  # every slot gets its response
    for p in parsed:
        assert isinstance(p, (TxPacket, TxRefusal))
        if isinstance(p, TxPacket):
            assert 14 <= p.size <= netif.MAX_TX_SIZE
            assert sum(s.length for s in p.segments) == p.size
            assert all(s.offset + s.length <= 4096 for s in p.segments)
        assert len(responses(p.layout, Status.OKAY)) == len(p.layout)


def test_the_fatal_chains():
    ok = netif.TX_REQUEST.pack(1, 0, TxFlags.MORE_DATA, 1, 100)
    for raws, reason in (
            ([ok], "slot_chain_does_not_end"),
            ([netif.TX_REQUEST.pack(1, 0, TxFlags.MORE_DATA, i, 100) for i in range(19)]
             + [netif.TX_REQUEST.pack(1, 0, 0, 19, 0)], "too_many_slots"),
            ([netif.TX_REQUEST.pack(1, 0, TxFlags.EXTRA_INFO, 1, 100)], "extra_info_missing"),
            ([netif.TX_REQUEST.pack(1, 0, TxFlags.EXTRA_INFO, 1, 100),
              netif.EXTRA_INFO.pack(9, 0, 0, 0, 0, 0).ljust(12, b"\0")], "bad_extra_type")):
        parser = TxParser()
        try:
            parser.parse(raws)
        except Fatal as exc:
            assert str(exc) == reason
        else:
            raise AssertionError(f"{reason} not fatal")
