"""The sim hypervisor's control-message codec: everything validated, nothing else raised."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from ringfence.hypervisor.sim import protocol as P

DECODERS = [
    lambda b: P.decode_register(b), lambda b: P.decode_frames(b), lambda b: P.decode_map(b),
    lambda b: P.decode_handles(b), lambda b: P.decode_copy(b),
    lambda b: P.decode_domid(b, "x"), lambda b: P.decode_bind(b), lambda b: P.decode_port(b),
    lambda b: P.decode_name(b), lambda b: P.decode_count(b, "x", 250),
    lambda b: P.decode_empty(b, "x"),
]


@given(st.binary(max_size=200))
def test_garbage_headers_only_raise_protocol_error(data):
    try:
        msg = P.decode(data)
    except P.ProtocolError:
        return
    assert P.encode(msg.op, msg.req_id, msg.payload) == data


@given(st.binary(max_size=300), st.sampled_from(range(len(DECODERS))))
def test_garbage_payloads_only_raise_protocol_error(payload, which):
    try:
        DECODERS[which](payload)
    except P.ProtocolError:
        pass


@given(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.binary(max_size=1000))
def test_encode_decode_round_trip(op, req_id, payload):
    msg = P.decode(P.encode(op, req_id, payload))
    assert (msg.op, msg.req_id, msg.payload) == (op, req_id, payload)


@given(st.lists(st.builds(
    P.CopySegment,
    st.builds(P.CopySide, st.booleans(), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
              st.integers(0, 2**64 - 1)),
    st.builds(P.CopySide, st.booleans(), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
              st.integers(0, 2**64 - 1)),
    st.integers(0, 2**32 - 1)), max_size=20))
def test_copy_segments_round_trip(segments):
    assert P.decode_copy(P.encode_copy(segments)) == segments


@pytest.mark.parametrize("cut", range(0, 12))
def test_every_truncation_of_a_header_is_rejected(cut):
    data = P.encode(P.Op.GNT_MAP, 7, P.pack_items(P.MAP_ITEM, [(1, 0, 9)]))
    with pytest.raises(P.ProtocolError):
        P.decode(data[:cut])


def test_truncated_batches_are_rejected():
    payload = P.pack_items(P.MAP_ITEM, [(1, 0, 9), (2, 1, 10)])
    for cut in range(len(payload)):
        with pytest.raises(P.ProtocolError):
            P.decode_map(payload[:cut])
    with pytest.raises(P.ProtocolError):
        P.decode_map(struct.pack("<I", P.MAX_BATCH + 1))
    with pytest.raises(P.ProtocolError):
        P.decode_map(P.pack_items(P.MAP_ITEM, [(1, 6, 9)]))  # unknown flag bits
