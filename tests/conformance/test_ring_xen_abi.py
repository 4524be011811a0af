"""Conformance against Xen's own headers (Debian libxen-dev): a C program built with
xen/io/ring.h, blkif.h and netif.h shares a ring with ours in both roles, with indices that
wrap past 2^32, and checks every request and response; struct sizes and offsets match."""
from __future__ import annotations

import json
import mmap
import os
import pathlib
import subprocess

import pytest

from ringfence.hypervisor._lib import ffi
from ringfence.hypervisor.io import blkif, netif
from ringfence.hypervisor.io.ring import BackRing, FrontRing, ring_slots

SOURCE = pathlib.Path(__file__).parent / "c" / "xen_ring_peer.c"
pytestmark = pytest.mark.skipif(not os.path.exists("/usr/include/xen/io/ring.h"),
                                reason="needs Debian libxen-dev (apt-get install libxen-dev)")
START = 2**32 - 50   # wraps after 50 requests
COUNT = 1000


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    binary = tmp_path_factory.mktemp("peer") / "xen_ring_peer"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(SOURCE)], check=True)
    return str(binary)


def blk_request(i: int) -> blkif.Request:
    nseg = i % 12
    segs = tuple(blkif.Segment((i * 16 + j) & 0xFFFFFFFF, j % 8, 7) for j in range(min(nseg, 11)))
    return blkif.Request(i % 2, nseg, (i * 3) & 0xFFFF, (i * 0x100000001 + 7) & (2**64 - 1),
                         (i * 8 + (i << 33)) & (2**64 - 1), segs)


def tx_request(i: int) -> netif.TxRequest:
    return netif.TxRequest(i, i % 4096, i & 15, i & 0xFFFF, (i * 7) & 0xFFFF)


def test_struct_sizes_and_offsets(peer):
    c = json.loads(subprocess.run([peer, "sizes"], capture_output=True, check=True).stdout)
    assert c["blkif_request_t"] == blkif.REQUEST_SIZE == 112
    assert c["BLKIF_MAX_SEGMENTS_PER_REQUEST"] == blkif.MAX_SEGMENTS_PER_REQUEST == 11
    assert c["blk_slots"] == ring_slots(4096, blkif.SLOT_SIZE) == 32
    assert c["blkif_response_t"] == blkif.RESPONSE.size
    assert c["blkif_response_t.status"] == 10
    assert c["blkif_request_t.seg"] == blkif.SEGMENTS_OFFSET
    assert c["struct blkif_request_segment"] == blkif.SEGMENT.size
    assert c["blkif_request_discard_t"] == blkif.DISCARD.size
    assert c["blkif_request_indirect_t"] == blkif.INDIRECT.size
    assert c["blkif_request_indirect_t.indirect_grefs"] == 28
    assert (c["netif_tx_request_t"], c["netif_tx_response_t"]) == (12, 4) == (
        netif.TX_REQUEST.size, netif.TX_RESPONSE.size)
    assert (c["netif_rx_request_t"], c["netif_rx_response_t"]) == (8, 8) == (
        netif.RX_REQUEST.size, netif.RX_RESPONSE.size)
    assert c["struct netif_extra_info"] == netif.EXTRA_INFO.size
    assert c["tx_slots"] == ring_slots(4096, netif.TX_SLOT) == 256
    assert c["rx_slots"] == ring_slots(4096, netif.RX_SLOT) == 256
    assert c["grant_entry_v1_t"] == ffi.sizeof("rf_grant_entry_v1") == 8
    assert c["sring_header"] == ffi.sizeof("rf_sring") == 64
    assert c["struct xsd_sockmsg"] == 16 and c["struct xenstore_domain_interface"] == 2076


def _shared(tmp_path) -> tuple[str, mmap.mmap]:
    path = tmp_path / "ring"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    area = mmap.mmap(fd, 4096)
    os.close(fd)
    return str(path), area


@pytest.mark.parametrize("proto", ["blk", "nettx"])
def test_their_front_our_back(peer, tmp_path, proto):
    path, area = _shared(tmp_path)
    proc = subprocess.Popen([peer, "front", proto, path, str(START), str(COUNT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        if proto == "blk":
            back = BackRing(area, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE, start=START)
        else:
            back = BackRing(area, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, start=START)
        done = 0
        while done < COUNT:
            if not back.final_check_for_requests():
                assert proc.poll() is None, "peer exited early"
                continue
            responses = []
            for raw in back.take_requests():
                if proto == "blk":
                    assert blkif.decode_request(raw) == blk_request(done), done
                    req = blkif.decode_request(raw)
                    status = blkif.Status.ERROR if done % 5 == 0 else blkif.Status.OKAY
                    responses.append(blkif.encode_response(req.id, req.operation, status))
                else:
                    req = netif.decode_tx_request(raw)
                    assert req == tx_request(done), done
                    status = netif.Status.DROPPED if done % 3 == 0 else netif.Status.OKAY
                    responses.append(netif.TX_RESPONSE.pack(req.id, status))
                done += 1
            assert back.put_responses(responses) == len(responses)
            back.push_responses()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    assert back.sring.req_prod == (START + COUNT) % 2**32  # wrapped
    assert back.statistics().overflows == 0


@pytest.mark.parametrize("proto", ["blk", "nettx"])
def test_our_front_their_back(peer, tmp_path, proto):
    path, area = _shared(tmp_path)
    if proto == "blk":
        front = FrontRing(area, blkif.REQUEST_SIZE, blkif.RESPONSE_SIZE, start=START)
    else:
        front = FrontRing(area, netif.TX_REQUEST.size, netif.TX_RESPONSE.size, start=START)
    proc = subprocess.Popen([peer, "back", proto, path, str(START), str(COUNT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        sent = got = 0
        while got < COUNT:
            batch = []
            while sent + len(batch) < COUNT and len(batch) < front.free_requests():
                i = sent + len(batch)
                batch.append(blkif.encode_request(blk_request(i)) if proto == "blk"
                             else netif.encode_tx_request(tx_request(i)))
            sent += front.put_requests(batch)
            front.push_requests()
            for raw in front.take_responses():
                if proto == "blk":
                    rid, op, status = blkif.decode_response(raw)
                    want = blk_request(got)
                    assert (rid, op) == (want.id, want.operation)
                    assert status == (-1 if got % 5 == 0 else 0)
                else:
                    rid, status = netif.TX_RESPONSE.unpack(raw)
                    assert rid == got & 0xFFFF and status == (-2 if got % 3 == 0 else 0)
                got += 1
            assert proc.poll() in (None, 0)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    assert front.sring.rsp_prod == (START + COUNT) % 2**32
