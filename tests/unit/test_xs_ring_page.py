"""The XenStore ring page in the C core against a model byte queue, and its layout against
Xen's struct xenstore_domain_interface."""
from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringfence.hypervisor._lib import ffi
from ringfence.hypervisor.io.xs_ring import (INTERFACE_SIZE, RING_SIZE, Connection, RingError,
                                            RingProtocolError, XsRing)


def test_layout_is_xens():
    assert ffi.sizeof("rf_xs_intf") == INTERFACE_SIZE == 2076
    assert ffi.offsetof("rf_xs_intf", "rsp") == 1024
    assert [ffi.offsetof("rf_xs_intf", f) for f in
            ("req_cons", "req_prod", "rsp_cons", "rsp_prod", "server_features", "connection", "error")] \
        == [2048, 2052, 2056, 2060, 2064, 2068, 2072]


def ends(start: int = 0) -> tuple[mmap.mmap, XsRing, XsRing]:
    page = mmap.mmap(-1, 4096)
    struct.pack_into("<4I", page, 2048, *(start & 0xFFFFFFFF,) * 4)  # indices near the wrap
    return page, XsRing(page, guest=True), XsRing(page, guest=False)


@settings(max_examples=200, deadline=None)
@given(start=st.sampled_from([0, 2**32 - 700, 2**32 - 1]),
       steps=st.lists(st.tuples(st.booleans(), st.booleans(), st.binary(max_size=1500)), max_size=40))
def test_both_rings_behave_as_byte_queues(start, steps):
    _, guest, daemon = ends(start)
    queues = {True: bytearray(), False: bytearray()}  # by "the guest writes"
    for guest_writes, is_put, data in steps:
        writer, reader = (guest, daemon) if guest_writes else (daemon, guest)
        queue = queues[guest_writes]
        if is_put:
            sent, wake = writer.put(data)
            assert sent == min(len(data), RING_SIZE - len(queue))
            # the reader is told only when it had taken everything (it may be asleep)
            assert wake == (sent > 0 and not queue)
            queue += data[:sent]
            assert writer.writable() == (len(queue) < RING_SIZE)
        else:
            got, wake = reader.get()
            assert got == bytes(queue)
            # the writer is told only when it had filled the ring (it may wait for room)
            assert wake == (len(queue) == RING_SIZE)
            queue.clear()
            assert not reader.readable()


@pytest.mark.parametrize("field, value", [("req_prod", 1025), ("req_prod", 2**31), ("req_cons", 5)])
def test_impossible_indices_are_refused_not_followed(field, value):
    page, guest, daemon = ends()
    offsets = {"req_cons": 2048, "req_prod": 2052}
    struct.pack_into("<I", page, offsets[field], value)
    with pytest.raises(RingProtocolError):
        daemon.get() if field == "req_prod" else guest.put(b"x")  # req_cons=5 > req_prod=0


def test_reset_empties_both_rings_and_reconnects():
    page, guest, daemon = ends()
    guest.put(b"request")
    daemon.put(b"reply")
    guest.connection = Connection.RECONNECT
    daemon.error = RingError.COMM
    daemon.reset()
    assert (daemon.connection, daemon.error, daemon.server_features) == (Connection.CONNECTED, 0, 3)
    assert guest.get()[0] == b"" and daemon.get()[0] == b""
    assert daemon.statistics().bytes_sent == 5
