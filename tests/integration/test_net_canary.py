"""ATTACKS A3 (XSA-216) for netback, with a canary: netback runs with every allocation
filled with 0x5A and every free with 0xA5 (glibc's perturb tunable; Python's allocations
through malloc). A scanning frontend posts zeroed receive buffers, a real guest on the same
bridge broadcasts datagrams of zeros to it, and the scanner also sends packets, good and
malformed. Everything netback wrote to shared memory is checked: every field of every
response slot holds a value it may hold (an uninitialised one would hold the canary), and
every received page holds its frame (the sender's: headers as sent, a payload of zeros)
and zeros after it."""
from __future__ import annotations

import json
import os
import sys

import pytest
import trio

from ringfence.testing.sim import open_net_host, start_domain_program
from ringfence.toolstack.devices import add_vif
from ringfence.xenbus.client import open_xenstore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TAP")

PAYLOAD = 1000  # a frame of 1042 bytes: neither length byte is a canary
SENDER_MAC = bytes.fromhex("020000000001")

SCANNER = """
import json, sys, trio
from ringfence.hypervisor.sim.client import open_domain
from ringfence.xenbus.sim import open_domain_xenstore
from ringfence.hypervisor.io import netif
from ringfence.testing.rawvif import RawVif

BUFFERS, WANTED, PAYLOAD = 64, int(sys.argv[1]), int(sys.argv[2])
SENDER = bytes.fromhex(sys.argv[3])

async def main():
    async with open_domain() as dom, open_domain_xenstore(dom) as xs:
        vif = await RawVif.open(dom, xs, extra_pages=BUFFERS + 1)
        buf = vif.pages.buffer
        rx_grefs = [vif.grant(2 + i) for i in range(BUFFERS)]
        out_page = 2 + BUFFERS
        g_out = vif.grant(out_page, readonly=True)
        frame = (b"\\xff" * 6 + b"\\x02" * 6 + b"\\x08\\x06").ljust(60, b"\\0")  # an ARP-typed frame
        buf[out_page * 4096:out_page * 4096 + 60] = frame
        tx, rx, port = await vif.connect()
        rx.put_requests([netif.RX_REQUEST.pack(i, rx_grefs[i]) for i in range(BUFFERS)])
        rx.push_requests(port.notify_fd)
        # packets of ours: good ones, and refused ones (size 0, past the page)
        tx.put_requests([netif.TX_REQUEST.pack(g_out, 0, 0, 1, 60),
                         netif.TX_REQUEST.pack(g_out, 0, 0, 2, 0),
                         netif.TX_REQUEST.pack(g_out, 4000, 0, 3, 200),
                         netif.TX_REQUEST.pack(g_out, 0, 0, 4, 60)])
        tx.push_requests(port.notify_fd)
        print(json.dumps({"ready": True}), flush=True)
        found = {"rx": 0, "ours": 0, "tx": 0, "bad_slots": 0, "bad_frames": 0, "dirty_tails": 0,
                 "tx_statuses": {}}
        with trio.move_on_after(30):
            while found["ours"] < WANTED or found["tx"] < 4:
                for raw in tx.take_responses():
                    rid, status = netif.TX_RESPONSE.unpack(raw)
                    # every field a value it may hold: a byte left uninitialised would not
                    found["bad_slots"] += rid not in (1, 2, 3, 4) or status not in (0, -1)
                    found["tx"] += 1
                    found["tx_statuses"][str(rid)] = status
                answered = []
                for raw in rx.take_responses():
                    rid, offset, flags, status = netif.RX_RESPONSE.unpack(raw)
                    if rid >= BUFFERS or offset or flags & ~0xF or not 0 < status <= 4096:
                        found["bad_slots"] += 1
                        continue
                    page = bytes(buf[(2 + rid) * 4096:(3 + rid) * 4096])
                    data, tail = page[:status], page[status:]
                    found["rx"] += 1
                    found["dirty_tails"] += any(tail)
                    # the sender's datagrams (the guest sends its own neighbour discovery
                    # too): headers as sent, a payload of zeros
                    if data[:6] == b"\\xff" * 6 and data[6:12] == SENDER and data[12:14] == b"\\x08\\x00":
                        found["ours"] += 1
                        found["bad_frames"] += status != 14 + 20 + 8 + PAYLOAD or any(data[-PAYLOAD:])
                    buf[(2 + rid) * 4096:(3 + rid) * 4096] = bytes(4096)  # zeroed, posted again
                    answered.append(netif.RX_REQUEST.pack(rid, rx_grefs[rid]))
                if answered:
                    rx.put_requests(answered)
                    rx.push_requests(port.notify_fd)
                if not tx.final_check_for_responses() and not rx.final_check_for_responses():
                    await port.wait()
        print(json.dumps(found), flush=True)

trio.run(main)
"""

SENDER = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for _ in range(400):
    s.sendto(bytes({PAYLOAD}), ("10.78.0.255", 9))
    time.sleep(0.002)
"""


async def test_no_netback_memory_reaches_shared_pages(tmp_path):
    # glibc fills what malloc gives with 0x5A and what free takes with 0xA5 (no thread
    # cache, which would skip that), and Python allocates through malloc
    env = dict(os.environ, PYTHONMALLOC="malloc", MALLOC_PERTURB_="165",
               GLIBC_TUNABLES="glibc.malloc.perturb=165:glibc.malloc.tcache_count=0")
    async with open_net_host(str(tmp_path), netback_env=env, name="canary-net") as host:
        sender = await host.start_guest("canary-g1", mac=SENDER_MAC.hex(":"),
                                        netfront_args=["--ip", "10.78.0.1/24"])
        scanner_domid, fd = await host.dom0.create_domain("scanner")
        async with open_xenstore(host.xs_path) as xs:
            await add_vif(xs, backend=host.net_domid, frontend=scanner_domid, devid=0,
                          mac="02:00:00:00:00:77")
        found = tmp_path / "scanner.out"
        with open(found, "wb") as sink:
            scanner = await start_domain_program(SCANNER, fd, "300", str(PAYLOAD), SENDER_MAC.hex(),
                                                 stdout=sink)
        with trio.fail_after(30):
            while b"ready" not in found.read_bytes():
                assert scanner.poll() is None
                await trio.sleep(0.05)
        await trio.run_process(["nsenter", "-t", str(sender.pid), "-n", sys.executable, "-c", SENDER])
        with trio.fail_after(60):
            assert await scanner.wait() == 0
        result = json.loads(found.read_text().splitlines()[-1])
        assert result["ours"] >= 300 and result["tx"] >= 4, result
        assert result["tx_statuses"] == {"1": 0, "2": -1, "3": -1, "4": 0}
        assert result["bad_slots"] == 0 and result["dirty_tails"] == 0, result
        assert result["bad_frames"] == 0, result
        assert host.net.poll() is None
