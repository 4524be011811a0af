"""XenStore over the ring page (xenstore_domain_interface) between real sim domains and our
xenstored: requests larger than the 1 KiB rings, watches, xenstored's kill -9 and restart
(the guest reconnects with the RECONNECT handshake and carries on), and hostile ring
writers (X16: the error indicator is set, everyone else is served)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import trio

from ringfence.hypervisor.io.xs_ring import RingError
from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain, start_xenstored
from ringfence.xenbus.client import open_xenstore

# A guest that speaks XenStore over its ring page and obeys one JSON command per line.
GUEST = r"""
import json, sys, trio
from ringfence.hypervisor.sim.client import open_domain
from ringfence.xenbus.sim import open_domain_xenstore

async def main():
    async with open_domain() as dom, open_domain_xenstore(dom, "ring") as xs:
        home = f"/local/domain/{dom.domid}"
        stdin = trio.lowlevel.FdStream(0)
        buffer = b""
        events = []
        async with trio.open_nursery() as nursery:
            async def watch():
                async with xs.watch(home + "/watched") as stream:
                    async for path, _ in stream:
                        events.append(path)
            nursery.start_soon(watch)
            print(json.dumps({"domid": dom.domid}), flush=True)
            while True:
                while b"\n" not in buffer:
                    chunk = await stdin.receive_some(4096)
                    if not chunk:
                        nursery.cancel_scope.cancel()
                        return
                    buffer += chunk
                line, buffer = buffer.split(b"\n", 1)
                cmd = json.loads(line)
                try:
                    if cmd["op"] == "write":
                        await xs.write(home + "/" + cmd["path"], cmd["value"])
                        out = {"ok": True}
                    elif cmd["op"] == "read":
                        out = {"ok": True, "value": (await xs.read(home + "/" + cmd["path"])).decode()}
                    elif cmd["op"] == "events":
                        out = {"ok": True, "events": events, "reconnects": xs.reconnects}
                except Exception as exc:
                    out = {"ok": False, "error": repr(exc)}
                print(json.dumps(out), flush=True)

trio.run(main)
"""


class Guest:
    def __init__(self, process: trio.Process) -> None:
        self.process, self.buffer = process, b""

    async def line(self) -> dict:
        with trio.fail_after(30):
            while b"\n" not in self.buffer:
                chunk = await self.process.stdout.receive_some(65536)
                assert chunk, "guest exited"
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    async def do(self, **cmd) -> dict:
        await self.process.stdin.send_all(json.dumps(cmd).encode() + b"\n")
        reply = await self.line()
        assert reply["ok"], reply
        return reply


async def start_guest(dom0, name: str) -> tuple[int, Guest]:
    domid, process = await spawn_domain(dom0, name, [sys.executable, "-c", GUEST],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    guest = Guest(process)
    assert (await guest.line())["domid"] == domid
    return domid, guest


async def wait_for(predicate, what: str, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


async def test_guest_speaks_xenstore_over_its_ring_page_and_survives_a_xenstored_crash(tmp_path):
    xs_path, state = str(tmp_path / "xs.sock"), str(tmp_path / "state")
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        daemon = await start_xenstored(xs_path, hypervisor=hv_path, state_dir=state)
        try:
            domid, guest = await start_guest(dom0, "ring-guest")
            try:
                async with open_xenstore(xs_path) as xs:
                    await xs.mkdir(f"/local/domain/{domid}")  # its home, as a toolstack makes it
                    await xs.set_perms(f"/local/domain/{domid}", [f"n{domid}"])
                    # the guest's node, written over the ring; a value twice the ring's size (the
                    # node quota is 2048 bytes)
                    await guest.do(op="write", path="small", value="hello")
                    big = "x" * 2000
                    await guest.do(op="write", path="big", value=big)
                    assert await xs.read(f"/local/domain/{domid}/big") == big.encode()
                    assert (await guest.do(op="read", path="big"))["value"] == big
                    # the daemon knows the domain by its ring's port, as INTRODUCE would say
                    assert (await xs.request(17, f"{domid}\0".encode())) == b"T\0"
                    # a watch on the guest's node fires over the ring
                    await xs.write(f"/local/domain/{domid}/watched", "1")

                    async def fired() -> bool:
                        return any(p.endswith("/watched") for p in (await guest.do(op="events"))["events"])
                    await wait_for(fired, "watch event")

                # kill -9: the restarted daemon tells the guest to reconnect (error COMM);
                # the guest resets the ring, registers its watch again, and carries on
                daemon.send_signal(signal.SIGKILL)
                await daemon.wait()
                daemon = await start_xenstored(xs_path, hypervisor=hv_path, state_dir=state)
                assert (await guest.do(op="read", path="small"))["value"] == "hello"
                reply = await guest.do(op="events")
                assert reply["reconnects"] == 1
                async with open_xenstore(xs_path) as xs:
                    await xs.write(f"/local/domain/{domid}/watched", "2")
                    before = len(reply["events"])

                    async def fired_again() -> bool:
                        return len((await guest.do(op="events"))["events"]) > before
                    await wait_for(fired_again, "watch event after restart")
                await guest.do(op="write", path="after", value="restart")
            finally:
                guest.process.kill()
                await guest.process.wait()
        finally:
            daemon.kill()
            await daemon.wait()


# A hostile guest: it sets up its ring as a guest must, then breaks the ring protocol.
HOSTILE = r"""
import json, struct, sys, trio
from ringfence.hypervisor.sim.client import open_domain
from ringfence.xenbus.client import open_xenstore_stream
from ringfence.xenbus.ring_transport import setup_guest_ring

async def main():
    async with open_domain() as dom:
        guest = await setup_guest_ring(dom)
        ring, intf = guest.ring, guest.ring._intf
        print(json.dumps({"domid": dom.domid}), flush=True)

        async def error_after(action):
            action()
            guest.port.notify()
            with trio.fail_after(10):
                while ring.error == 0:
                    await guest.doorbell.wait()
            return ring.error

        out = {}
        # X16: a producer index a whole ring and more past the consumer
        out["ringidx"] = await error_after(lambda: setattr(intf, "req_prod", intf.req_cons + 5000))
        await guest.reconnect()
        # a message longer than the 4096-byte payload limit (XSA-420 style lengths too)
        header = struct.pack("<IIII", 1, 7, 0, 0xFFFFFFF0)
        out["oversize"] = await error_after(lambda: ring.put(header))
        # after a reconnection the ring works again
        async with open_xenstore_stream(await guest.reconnect(), guest.reconnect) as xs:
            await xs.write(f"/local/domain/{dom.domid}/ok", "yes")
        print(json.dumps(out), flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_ring_protocol_violations_set_the_error_indicator_and_cost_only_that_ring(tmp_path):
    """X16 and X5: impossible indices give error 2, an oversized message error 3; the
    daemon stops reading that ring until the guest resets it, keeps the domain (no early
    @releaseDomain), and serves a well-behaved guest throughout."""
    xs_path = str(tmp_path / "xs.sock")
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        daemon = await start_xenstored(xs_path, hypervisor=hv_path)
        processes = []
        try:
            good_domid, good = await start_guest(dom0, "good")
            processes.append(good.process)
            bad_domid, bad_process = await spawn_domain(
                dom0, "bad", [sys.executable, "-c", HOSTILE], stdout=subprocess.PIPE)
            processes.append(bad_process)
            bad = Guest(bad_process)
            async with open_xenstore(xs_path) as xs:
                for domid in (good_domid, bad_domid):
                    await xs.mkdir(f"/local/domain/{domid}")
                    await xs.set_perms(f"/local/domain/{domid}", [f"n{domid}"])
                assert (await bad.line())["domid"] == bad_domid
                result = await bad.line()
                assert result["ringidx"] == RingError.RINGIDX
                assert result["oversize"] == RingError.PROTO
                assert await xs.read(f"/local/domain/{bad_domid}/ok") == b"yes"
                # the other guest was served all along, and the hostile one is still known
                await good.do(op="write", path="still", value="served")
                assert await xs.read(f"/local/domain/{good_domid}/still") == b"served"
                assert (await xs.request(17, f"{bad_domid}\0".encode())) == b"T\0"
        finally:
            for process in processes:
                process.kill()
                await process.wait()
            daemon.kill()
            await daemon.wait()
