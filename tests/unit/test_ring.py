"""The C ring through its Python wrappers: geometry, round trips, wrap, notification
suppression, overflow detection, statistics."""
from __future__ import annotations

import mmap
import os
import struct

import pytest

from ringfence.hypervisor.io.ring import BackRing, FrontRing, RingOverflow, ring_slots


def pair(pages=1, req=112, rsp=16, start=0):
    area = mmap.mmap(-1, 4096 * pages)
    return area, FrontRing(area, req, rsp, start=start), BackRing(area, req, rsp, start=start)


@pytest.mark.parametrize("ring_bytes,slot,expected", [
    (4096, 112, 32), (4096, 12, 256), (4096, 8, 256), (8192, 112, 64), (4096 << 4, 112, 512),
    (4096, 4032, 1), (4096, 4033, 0)])
def test_slot_counts_match_ring_h(ring_bytes, slot, expected):
    assert ring_slots(ring_bytes, slot) == expected


def test_round_trip_and_header_layout():
    area, front, back = pair()
    assert front.size == 32
    reqs = [bytes([i]) * 112 for i in range(5)]
    assert front.put_requests(reqs) == 5
    assert back.take_requests() == []  # not pushed yet
    assert front.push_requests() is True  # req_event starts at 1: first push notifies
    req_prod, req_event, rsp_prod, rsp_event = struct.unpack_from("<4I", area, 0)
    assert (req_prod, req_event, rsp_prod, rsp_event) == (5, 1, 0, 1)
    assert back.take_requests() == reqs
    assert back.put_responses([r[:16] for r in reqs]) == 5
    assert back.push_responses() is True
    assert front.take_responses() == [r[:16] for r in reqs]
    assert front.in_flight == 0 and back.in_flight == 0
    stats = front.statistics()
    assert stats.requests == 5 and stats.responses == 5 and stats.notifications_sent == 1


def test_notification_suppression_with_final_check():
    _, front, back = pair()
    front.put_requests([b"a" * 112])
    assert front.push_requests()
    back.take_requests()
    # backend has not re-armed: further pushes are suppressed
    front.put_requests([b"b" * 112])
    assert front.push_requests() is False
    assert back.final_check_for_requests() is True  # sees the second one without an event
    back.take_requests()
    assert back.final_check_for_requests() is False  # re-armed
    front.put_requests([b"c" * 112])
    assert front.push_requests() is True
    assert front.statistics().notifications_suppressed == 1


def test_half_the_responses_then_an_event():
    """Linux netfront's tx reclaim: the event is asked for once half of what is in flight
    is answered, not at the next answer; and at once if answers are there already."""
    area, front, back = pair()
    front.put_requests([bytes(112)] * 10)
    front.push_requests()
    back.take_requests()
    assert front.check_for_half_the_responses() is False
    assert struct.unpack_from("<4I", area, 0)[3] == 0 + 5 + 1  # rsp_event
    back.put_responses([bytes(16)] * 5)
    assert back.push_responses() is False  # 5 answered: not yet
    back.put_responses([bytes(16)])
    assert back.push_responses() is True   # the sixth crosses the event
    assert front.check_for_half_the_responses() is True
    assert len(front.take_responses()) == 6 and front.in_flight == 4


def test_indices_wrap_past_2_32():
    _, front, back = pair(start=2**32 - 3)
    for round_ in range(10):
        reqs = [bytes([round_, i]) + bytes(110) for i in range(7)]
        assert front.put_requests(reqs) == 7
        front.push_requests()
        assert back.take_requests() == reqs
        back.put_responses([r[:16] for r in reqs])
        back.push_responses()
        assert front.take_responses() == [r[:16] for r in reqs]
    assert front.sring.req_prod == (2**32 - 3 + 70) % 2**32


def test_ring_full_and_backend_limits():
    _, front, back = pair()
    assert front.put_requests([b"x" * 112] * 40) == 32
    assert front.free_requests() == 0
    front.push_requests()
    assert len(back.take_requests(max_count=10)) == 10
    assert back.put_responses([b"r" * 16] * 20) == 10  # cannot answer what was not taken
    assert len(back.take_requests()) == 22


def test_hostile_frontend_overflow_is_detected():
    _, front, back = pair()
    front.sring.req_prod = 1000  # claims 1000 outstanding requests in a 32-slot ring
    with pytest.raises(RingOverflow):
        back.take_requests()
    assert back.statistics().overflows == 1


def test_hostile_backend_response_overflow_is_detected():
    _, front, back = pair()
    front.put_requests([b"x" * 112] * 2)
    front.push_requests()
    front.sring.rsp_prod = 5  # more responses than requests
    with pytest.raises(RingOverflow):
        front.take_responses()


def test_multi_page_ring_and_bad_geometry():
    _, front, back = pair(pages=4)
    assert front.size == 128
    with pytest.raises(ValueError):
        FrontRing(bytearray(4096 * 32), 112, 16)
    with pytest.raises(ValueError):
        FrontRing(bytes(4096), 112, 16)  # read-only
    with pytest.raises(ValueError):
        FrontRing(bytearray(4096), 112, 16).put_requests([b"short"])


def test_push_notifies_an_eventfd_and_wait_returns():
    area, front, back = pair()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        front.put_requests([b"q" * 112])
        assert front.push_requests(fd)
        assert back.wait(fd) == 1
        back.take_requests()
        back.put_responses([b"r" * 16])
        back.push_responses()
        assert front.wait(fd, spin_ns=1_000_000) == 0  # the spin saw rsp_prod move
    finally:
        os.close(fd)


def test_exchange_between_two_processes_with_eventfds():
    """The one-call serving loops, across a fork, with real eventfd notifications."""
    area = mmap.mmap(-1, 4096)
    to_back, to_front = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    front = FrontRing(area, 112, 16)
    pid = os.fork()
    if pid == 0:
        try:
            back = BackRing(area, 112, 16)
            n = 0
            while True:
                n = back.exchange(n, to_front, to_back, spin_ns=0)
                for i in range(n):
                    req = back.received[i * 112:(i + 1) * 112]
                    if req[0] == 0xFF:
                        os._exit(0)
                    back.staging[i * 16:(i + 1) * 16] = bytes(req[8:24])
        finally:
            os._exit(1)
    total = 0
    for round_ in range(200):
        count = 1 + round_ % 32
        for i in range(count):
            front.staging[i * 112:(i + 1) * 112] = struct.pack("<8xQQ", round_, i).ljust(112, b"\0")
        answers = []
        n = front.exchange(count, to_back, to_front, spin_ns=10_000, gather=count)
        while True:
            answers += [struct.unpack_from("<QQ", front.received, k * 16) for k in range(n)]
            if len(answers) == count:
                break
            n = front.exchange(0, to_back, to_front)
        assert answers == [(round_, i) for i in range(count)]
        total += count
    front.staging[0] = 0xFF
    front.submit_staged(1, to_back)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and total == sum(1 + r % 32 for r in range(200))


@pytest.mark.parametrize("depth,spin", [(1, 0), (1, 20_000), (32, 0), (7, 20_000)])
def test_rings_driven_from_c_answer_every_request_once(depth, spin):
    """ringdrive.c (the ring benchmark's loops): a front keeping ``depth`` in flight and a
    back answering until the stop request, across a fork, with eventfd notifications."""
    from ringfence.hypervisor._lib import ffi, lib
    area = mmap.mmap(-1, 4096)
    to_back, to_front = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    front = FrontRing(area, 112, 16)
    pid = os.fork()
    if pid == 0:
        back = BackRing(area, 112, 16)
        answered = lib.rf_drive_back(back.c_ring, ffi.new("uint8_t[]", 16), 0xFF, 16,
                                     to_front, to_back, spin)
        os._exit(0 if answered == 5001 else 1)
    done = lib.rf_drive_front(front.c_ring, ffi.new("uint8_t[]", 112), 5000, depth, to_back,
                              to_front, spin)
    front.staging[0] = 0xFF
    front.submit_staged(1, to_back)
    _, status = os.waitpid(pid, 0)
    assert done == 5000 and status == 0
    stats = front.statistics()
    assert stats.requests == 5001 and stats.responses == 5000 and stats.overflows == 0
    assert lib.rf_drive_front(front.c_ring, ffi.new("uint8_t[]", 112), 1, 33, to_back,
                              to_front, 0) == -22  # more in flight than the ring holds


def test_batched_copy_checks_every_bound():
    from ringfence.hypervisor.io.copy import CopyBatch
    a, b = bytearray(b"A" * 4096), bytearray(4096)
    batch = CopyBatch([a, b])
    statuses = batch.run([(1, 0, 0, 10, 100), (1, 4000, 0, 0, 200), (5, 0, 0, 0, 1),
                          (1, 2**63, 0, 0, 1), (1, 100, 0, 4095, 1)])
    assert statuses == [0, -1, -1, -1, 0]
    assert b[:100] == b"A" * 100 and b[100:101] == b"A" and b[101:] == bytes(4096 - 101)
    assert batch.rejected == 3 and batch.bytes == 101
