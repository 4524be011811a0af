"""A deliberately hostile frontend against blkback: every bad request gets an error
response (and a counter), a ring overflow costs that frontend its connection, and the
driver domain keeps serving a well-behaved guest throughout."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from ringfence._statsock import fetch_statistics
from ringfence.testing.sim import program_output, start_domain_program
from ringfence.toolstack.devices import add_vbd
from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain
from ringfence.xenbus.client import open_xenstore
from ringfence.xenbus.paths import TAKEOVER_KEY

CONNECT = """
    import json, trio
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    from ringfence.hypervisor.io import blkif
    from ringfence.hypervisor.io.blkif import Op, Request, Segment
    from ringfence.hypervisor.io.ring import FrontRing

    async def main():
        async with open_domain() as dom, open_domain_xenstore(dom) as xs:
            me = f"/local/domain/{dom.domid}/device/vbd/51712"
            backend = (await xs.read(me + "/backend")).decode()
            be_id = int(await xs.read(me + "/backend-id"))
            async with xs.watch(backend + "/state") as ev:
                async for _ in ev:
                    if await xs.read(backend + "/state") == b"2":
                        break
            sectors = int(await xs.read(backend + "/sectors"))
            ring_pages = await dom.memory.alloc_pages(1)
            data = await dom.memory.alloc_pages(1)
            ring = FrontRing(ring_pages.buffer, 112, 16)
            gref = dom.grant_table.grant_access(be_id, ring_pages.frames[0])
            good = dom.grant_table.grant_access(be_id, data.frames[0])
            port = await dom.events.alloc_unbound(be_id)
            await xs.write(me + "/ring-ref", str(gref))
            await xs.write(me + "/event-channel", str(port.port))
            await xs.write(me + "/state", "3")
            async with xs.watch(backend + "/state") as ev:
                async for _ in ev:
                    if await xs.read(backend + "/state") == b"4":
                        break
"""

HOSTILE = textwrap.dedent(CONNECT + """            cases = {
                1: Request(Op.READ, 0, 0, 1, 0, ()),                              # no segment
                2: Request(Op.READ, 12, 0, 2, 0, ()),                             # too many
                3: Request(Op.READ, 1, 0, 3, 0, (Segment(good, 6, 2),)),          # first > last
                4: Request(Op.READ, 1, 0, 4, 0, (Segment(good, 0, 9),)),          # past the page
                5: Request(Op.READ, 1, 0, 5, sectors, (Segment(good, 0, 7),)),    # past the disk
                6: Request(0x55, 1, 0, 6, 0, (Segment(good, 0, 7),)),             # unknown op
                7: Request(Op.READ, 1, 0, 7, 0, (Segment(9999, 0, 7),)),          # never granted
                8: Request(Op.INDIRECT, 5000, 0, 8, 0, indirect_op=Op.READ),      # too many indirect
                9: Request(Op.READ, 1, 0, 9, 8, (Segment(good, 0, 7),)),          # a good one
            }
            ring.put_requests([blkif.encode_request(r) for r in cases.values()])
            ring.push_requests(port.notify_fd)
            answers, padding = {}, set()
            while len(answers) < len(cases):
                for raw in ring.take_responses():
                    rid, op, status = blkif.decode_response(raw)
                    answers[rid] = status
                    padding.add(bytes(raw[9:10] + raw[12:16]).hex())  # ATTACKS A3 (XSA-216)
                if len(answers) < len(cases) and not ring.final_check_for_responses():
                    await port.wait()
            print(json.dumps({"answers": answers, "padding": sorted(padding)}), flush=True)
            # now overflow the ring: claim 1000 requests in a 32-slot ring
            ring.sring.req_prod = ring.sring.req_prod + 1000
            port.notify()
            async with xs.watch(backend + "/state") as ev:
                async for _ in ev:
                    if await xs.read(backend + "/state") == b"6":
                        print(json.dumps({"disconnected": True}), flush=True)
                        return

    trio.run(main)
""")

STORM = textwrap.dedent(CONNECT + """            import sys, time
            print(json.dumps({"connected": True}), flush=True)
            end, sent = time.monotonic() + float(sys.argv[1]), 0
            while time.monotonic() < end:  # notifications that never bring a request
                for _ in range(1000):
                    port.notify()
                sent += 1000
            print(json.dumps({"notified": sent}), flush=True)

    trio.run(main)
""")

def _blkfront_guest(body: str) -> str:
    """A guest program: blkfront runs on vbd 51712, then ``body`` runs in its nursery."""
    return textwrap.dedent("""
        import json, sys, trio
        from ringfence.hypervisor.sim.client import open_domain
        from ringfence.xenbus.sim import open_domain_xenstore
        from ringfence.frontends.blkfront.device import BlkFront, BlockIOError, PAGE

        async def main():
            async with open_domain() as dom, open_domain_xenstore(dom) as xs:
                front = BlkFront(dom, xs, 51712)
                async with trio.open_nursery() as nursery:
                    await nursery.start(front.run)
    """) + textwrap.indent(textwrap.dedent(body), " " * 12) + "\ntrio.run(main)\n"


GOOD = _blkfront_guest("""
    for i in range(200):
        await front.write(i * 4096, bytes([i % 256]) * 4096)
        assert await front.read(i * 4096, 4096) == bytes([i % 256]) * 4096
        await trio.sleep(0.005)
    print(json.dumps({"ok": True}), flush=True)
    nursery.cancel_scope.cancel()
""")


@dataclass
class _BlkbackHost:
    dom0: Any
    xs_path: str
    stor_domid: int
    stor: trio.Process
    stats_socket: str


@contextlib.asynccontextmanager
async def _blkback_host(tmp_path, env: dict[str, str] | None = None) -> AsyncIterator[_BlkbackHost]:
    """A hypervisor, xenstored and a storage driver domain running blkback (its statistics
    on a socket, ``env`` its environment), killed at the end."""
    from ringfence.toolstack.hypervisor import start_xenstored
    stats_socket = str(tmp_path / "stor-stats.sock")
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        xs_path = str(tmp_path / "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        stor = None
        try:
            stor_domid, stor = await spawn_domain(
                dom0, "stor", [sys.executable, "-m", "ringfence", "blkback"], stderr=subprocess.DEVNULL,
                env=dict(env or os.environ, RINGFENCE_STATS_SOCKET=stats_socket))
            yield _BlkbackHost(dom0, xs_path, stor_domid, stor, stats_socket)
        finally:
            if stor is not None:
                stor.kill()
            xenstored.terminate()
            await xenstored.wait()


async def _vbd_statistics(host: _BlkbackHost, frontend: int) -> dict[str, Any]:
    return (await fetch_statistics(host.stats_socket))["vbds"][f"{frontend}/51712"]


@contextlib.asynccontextmanager
async def _agents_and_a_guest(tmp_path, *names: str) -> AsyncIterator[tuple[Any, list[Any], int, int, Any]]:
    """A hypervisor, xenstored, scriptable agent domains ``names`` (to play backends) and a
    guest domain: yields a XenStore client, the agents, the guest's domid, its control
    socket's fd and dom0 (to play the toolstack's event channels)."""
    from ringfence.testing.sim import open_agent
    from ringfence.toolstack.hypervisor import start_xenstored
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        xs_path = str(tmp_path / "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        try:
            async with open_xenstore(xs_path) as xs, contextlib.AsyncExitStack() as stack:
                agents = [await stack.enter_async_context(open_agent(dom0, name)) for name in names]
                guest_domid, fd = await dom0.create_domain("guest")
                yield xs, agents, guest_domid, fd, dom0
        finally:
            xenstored.terminate()
            await xenstored.wait()


async def _initialised(xs, directory: str) -> None:
    """Until the frontend directory says Initialised."""
    with trio.fail_after(20):
        while await xs.read_many([f"{directory}/state"]) != [b"3"]:
            await trio.sleep(0.05)


async def _connect_agent(xs, agent, guest_domid: int, directory: str, backend: str, *,
                         map_ring: bool = True) -> tuple[int | None, int | None]:
    """An agent playing blkback maps the ring and binds the channel ``directory`` names
    (unless not ``map_ring``), then says Connected in ``backend``: its ring and port."""
    ring = port = None
    if map_ring:
        ring = (await agent.ok("map", domid=guest_domid,
                               grefs=[int(await xs.read(f"{directory}/ring-ref"))]))["map"]
        port = (await agent.ok("evt_bind", domid=guest_domid,
                               port=int(await xs.read(f"{directory}/event-channel"))))["port"]
    await xs.write(f"{backend}/state", "4")
    return ring, port


async def _requests_on_ring(agent, ring: int, count: int) -> None:
    """Until the frontend has put ``count`` requests on the ring."""
    with trio.fail_after(20):
        while int.from_bytes(bytes.fromhex(
                (await agent.ok("read", map=ring, length=4))["data"]), "little") < count:
            await trio.sleep(0.05)


async def _answer(agent, ring: int, port: int, responses: list[bytes]) -> None:
    """Responses in the first slots, the producer index after them, and a kick."""
    for index, response in enumerate(responses):
        await agent.ok("write", map=ring, offset=64 + index * 112, data=response.hex())
    await agent.ok("write", map=ring, offset=8, data=len(responses).to_bytes(4, "little").hex())
    await agent.ok("notify", port=port)


async def test_hostile_frontend_gets_errors_and_a_disconnect_others_unaffected(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4 << 20))
    async with _blkback_host(tmp_path) as host:
        evil_domid, evil_fd = await host.dom0.create_domain("evil")
        good_domid, good_fd = await host.dom0.create_domain("good")
        async with open_xenstore(host.xs_path) as xs:
            await add_vbd(xs, backend=host.stor_domid, frontend=evil_domid, devid=51712, target=str(disk))
            await add_vbd(xs, backend=host.stor_domid, frontend=good_domid, devid=51712, target=str(other))
        procs = {}
        for name, code, fd in (("evil", HOSTILE, evil_fd), ("good", GOOD, good_fd)):
            with open(tmp_path / f"{name}.out", "wb") as out:
                procs[name] = await start_domain_program(code, fd, stdout=out)
        with trio.fail_after(60):
            for proc in procs.values():
                await proc.wait()
        results = {name: [json.loads(line) for line in (tmp_path / f"{name}.out").read_text().splitlines()]
                   for name in procs}
        answers = {int(k): v for k, v in results["evil"][0]["answers"].items()}
        for rid in range(1, 9):
            assert answers[rid] in (-1, -2), (rid, answers)
        assert answers[6] == -2  # unknown operation: EOPNOTSUPP
        assert answers[9] == 0
        # every response, refusals and the one served by the C fast path, has its
        # padding zeroed: nothing of the backend's memory goes to the frontend (A3)
        assert results["evil"][0]["padding"] == ["0000000000"]
        assert results["evil"][1] == {"disconnected": True}
        assert results["good"] == [{"ok": True}]
        assert host.stor.poll() is None  # the driver domain is still running


POOL_REFS = textwrap.dedent(CONNECT.replace(
    'await xs.write(me + "/state", "3")',
    'await xs.write(me + "/feature-persistent", "1")\n'
    '            await xs.write(me + "/pool-refs", sys.argv[1].replace("GOOD", str(good)).replace("RING", str(gref)))\n'
    '            await xs.write(me + "/state", "3")') + """            ring.put_requests([blkif.encode_request(Request(Op.READ, 1, 0, 1, 8, (Segment(good, 0, 7),)))])
            ring.push_requests(port.notify_fd)
            while not (raws := ring.take_responses()):
                if not ring.final_check_for_responses():
                    await port.wait()
            print(json.dumps({"status": blkif.decode_response(raws[0])[2]}), flush=True)

    trio.run(main)
""").replace("import json, trio", "import json, sys, trio")


async def test_hostile_pool_refs_map_nothing_and_cost_the_connection_nothing(tmp_path):
    """ATTACKS A1/A6 for pool-refs (the pages a frontend lists for its backend to map ahead):
    a list that is not numbers, too long, out of range, or names a page never granted is
    refused whole and counted; the frontend is served as before; a good list is mapped
    (here the ring's page, which no request uses: mapped ahead, not on demand)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    lists = {"words": "GOOD x", "long": " ".join(str(i) for i in range(200)), "negative": "-5",
             "range": "70000", "ungranted": "GOOD 9999", "good": "RING"}
    async with _blkback_host(tmp_path) as host:
        guests = {}
        async with open_xenstore(host.xs_path) as xs:
            for name in lists:
                guests[name] = await host.dom0.create_domain(name)
                await add_vbd(xs, backend=host.stor_domid, frontend=guests[name][0], devid=51712,
                              target=str(disk))
        procs = {name: await start_domain_program(POOL_REFS, fd, lists[name]) for name, (_, fd) in guests.items()}
        for name, proc in procs.items():
            assert json.loads(await program_output(proc)) == {"status": 0}, name
        for name, (domid, _) in guests.items():
            vbd = await _vbd_statistics(host, domid)
            if name == "good":
                assert vbd["premapped_grants"] == 1 and not vbd["rejected"].get("bad_pool_refs")
            else:
                assert vbd["premapped_grants"] == 0 and vbd["rejected"].get("bad_pool_refs") == 1, (name, vbd["rejected"])
        assert host.stor.poll() is None


RECONNECT = textwrap.dedent(CONNECT + """            async def backend_says(state):
                async with xs.watch(backend + "/state") as ev:
                    async for _ in ev:
                        if await xs.read(backend + "/state") == state:
                            return

            # Closed, then the same layout again: the backend reads our ring keys with the
            # state that says they are there.
            await xs.write(me + "/state", "5")
            await backend_says(b"6")
            await xs.write(me + "/state", "1")
            await backend_says(b"2")
            port = await dom.events.alloc_unbound(be_id)  # a channel is made anew each time
            await xs.write_many([(me + "/ring-ref", str(gref)), (me + "/event-channel", str(port.port)),
                                 (me + "/state", "3")])
            await backend_says(b"4")
            print(json.dumps({"reconnected": True}), flush=True)

    trio.run(main)
""")


# Straight from Connected to Initialising (a guest resumed, or restarted its driver), with
# no Closing between: one event, which ends the connection.
RESTART_AT_ONCE = RECONNECT.replace("""
        await xs.write(me + "/state", "5")
        await backend_says(b"6")
        await xs.write(me + "/state", "1")
""", """
        await xs.write(me + "/state", "1")
""")


async def _reconnected(tmp_path, program: str) -> dict[str, Any]:
    """blkback's statistics of a vbd whose frontend ran ``program`` (which connects, leaves,
    connects again and says so)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    async with _blkback_host(tmp_path) as host:
        guest_domid, fd = await host.dom0.create_domain("guest")
        async with open_xenstore(host.xs_path) as xs:
            await add_vbd(xs, backend=host.stor_domid, frontend=guest_domid, devid=51712, target=str(disk))
        guest = await start_domain_program(program, fd)
        assert json.loads(await program_output(guest)) == {"reconnected": True}
        return await _vbd_statistics(host, guest_domid)


async def test_a_frontend_that_restarts_at_once_is_served_again(tmp_path):
    """blkback watches the frontend's state once for a device's life; the event that ends a
    connection is the connection's, and the state is judged again right after it, so a
    frontend back in Initialising with no event after gets InitWait all the same."""
    assert RESTART_AT_ONCE != RECONNECT
    assert (await _reconnected(tmp_path, RESTART_AT_ONCE))["connections"] == 2


async def test_a_frontend_that_reconnects_has_its_ring_keys_read_ahead(tmp_path):
    """blkback reads a returning frontend's ring keys with the state that says they are
    there, when the layout is the one it saw before (one round trip fewer); the keys are
    checked as ever."""
    vbd = await _reconnected(tmp_path, RECONNECT)
    assert vbd["connections"] == 2 and vbd["ring_keys_read_ahead"] == 1, vbd


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_notification_storm_costs_blkback_little_cpu_and_others_nothing(tmp_path):
    """ATTACKS A13 (XSA-332): a frontend notifying in a tight loop without requests."""
    from ringfence.testing.streams import LineReader
    disk, other = tmp_path / "disk.img", tmp_path / "other.img"
    disk.write_bytes(bytes(4 << 20))
    other.write_bytes(bytes(4 << 20))
    async with _blkback_host(tmp_path) as host:
        procs = []
        try:
            evil_domid, evil_fd = await host.dom0.create_domain("evil")
            good_domid, good_fd = await host.dom0.create_domain("good")
            async with open_xenstore(host.xs_path) as xs:
                await add_vbd(xs, backend=host.stor_domid, frontend=evil_domid, devid=51712, target=str(disk))
                await add_vbd(xs, backend=host.stor_domid, frontend=good_domid, devid=51712, target=str(other))
            evil = await start_domain_program(STORM, evil_fd, "4")
            procs.append(evil)
            lines = LineReader(evil.stdout)
            with trio.fail_after(30):
                assert json.loads(await lines.next()) == {"connected": True}
            cpu_before, started = _cpu_seconds(host.stor.pid), trio.current_time()
            with open(tmp_path / "good.out", "wb") as out:
                good = await start_domain_program(GOOD, good_fd, stdout=out)
            procs.append(good)
            with trio.fail_after(60):
                sent = json.loads(await lines.next())["notified"]
                cpu = (_cpu_seconds(host.stor.pid) - cpu_before) / (trio.current_time() - started)
                assert await good.wait() == 0
            assert json.loads((tmp_path / "good.out").read_text()) == {"ok": True}
            assert sent > 100_000
            # The storm's device backs off: blkback stays far below a core (it was 100 %).
            assert cpu < 0.25, f"blkback used {cpu:.0%} of a core during the storm"
            vbd = await _vbd_statistics(host, evil_domid)
            assert vbd["spurious_notifications"] > 0 and vbd["state"] == "Connected"
        finally:
            for proc in procs:
                proc.kill()


HOSTILE_BACKEND_GUEST = _blkfront_guest("""
    completed, failed = [], []

    async def read(offset):
        try:
            completed.append(await front.read(offset, 4096))
        except OSError:
            failed.append(offset)

    nursery.start_soon(read, 0)
    nursery.start_soon(read, 4096)
    await trio.sleep(3)  # the backend answers meanwhile, wrongly
    stats = front.statistics()
    print(json.dumps({"completed": len(completed), "failed": len(failed), "bad": stats.bad_responses,
                      "in_flight": stats.in_flight}), flush=True)
    nursery.cancel_scope.cancel()
""")


@contextlib.asynccontextmanager
async def _guest_with_hostile_backend(tmp_path, guest_code: str, requests: int):
    """A guest running blkfront (``guest_code``) whose backend is a scriptable agent: yields
    once the guest has put ``requests`` requests on its ring, with what the agent needs to
    read and answer them."""
    async with _agents_and_a_guest(tmp_path, "evil-backend") as (xs, (backend,), guest_domid, fd, _):
        await add_vbd(xs, backend=backend.domid, frontend=guest_domid, devid=51712, target="/nonexistent")
        be = f"/local/domain/{backend.domid}/backend/vbd/{guest_domid}/51712"
        fe = f"/local/domain/{guest_domid}/device/vbd/51712"
        await xs.write_many([(f"{be}/sectors", "2048"), (f"{be}/info", "0"),
                             (f"{be}/sector-size", "512"),
                             (f"{be}/feature-max-indirect-segments", "256"),
                             (f"{be}/state", "2")])
        guest = await start_domain_program(guest_code, fd)
        await _initialised(xs, fe)
        ring, port = await _connect_agent(xs, backend, guest_domid, fe, be)
        await _requests_on_ring(backend, ring, requests)
        yield backend, guest, guest_domid, ring, port


async def _ring_request(backend, ring: int, index: int):
    from ringfence.hypervisor.io import blkif
    return blkif.decode_request(bytes.fromhex(
        (await backend.ok("read", map=ring, offset=64 + index * 112, length=112))["data"]))


async def test_a_hostile_backends_wrong_answers_complete_nothing_or_fail(tmp_path):
    """ATTACKS A4: a response with an id never issued completes no request (as the hardened
    Linux blkfront checks); one that answers a request as another operation fails it (it
    is never left waiting). Both are counted."""
    from ringfence.hypervisor.io import blkif
    async with _guest_with_hostile_backend(tmp_path, HOSTILE_BACKEND_GUEST, 2) as (
            backend, guest, _, ring, port):
        first = await _ring_request(backend, ring, 0)
        wrong_op = blkif.encode_response(first.id, blkif.Op.WRITE, 0)    # a read's id
        never_issued = blkif.encode_response(first.id + 1000, blkif.Op.READ, 0)
        await _answer(backend, ring, port, [wrong_op, never_issued])
        out = await program_output(guest)
        with trio.fail_after(30):
            await guest.wait()
        assert json.loads(out) == {"completed": 0, "failed": 1, "bad": 2, "in_flight": 1}


PARTIAL_PAGES_GUEST = _blkfront_guest("""
    front._pool.buffer[:] = b"\\xa5" * len(front._pool.buffer)  # earlier I/O's leftovers
    nursery.start_soon(front.write, 0, b"\\x11" * 1536)
    nursery.start_soon(front.read, 4096, 12 * PAGE + 512)  # one indirect request
    await trio.sleep(30)
""")


async def test_a_granted_page_holds_only_the_requests_bytes(tmp_path):
    """ATTACKS A5 (XSA-403), blkfront's Python path (the NBD path's is a unit test): the
    backend dumps each page it is given; outside the request's sectors it is zero."""
    from ringfence.hypervisor.io import blkif
    async with _guest_with_hostile_backend(tmp_path, PARTIAL_PAGES_GUEST, 2) as (
            backend, guest, guest_domid, ring, _):
        async def page(gref: int) -> bytes:
            mapped = (await backend.ok("map", domid=guest_domid, grefs=[gref]))["map"]
            return bytes.fromhex((await backend.ok("read", map=mapped, length=4096))["data"])

        for index in range(2):
            req = await _ring_request(backend, ring, index)
            if req.operation == blkif.Op.INDIRECT:
                table = await page(req.indirect_grefs[0])
                assert table[req.nr_segments * 8:] == bytes(4096 - req.nr_segments * 8)
                segments = [blkif.SEGMENT.unpack_from(table, i * 8) for i in range(req.nr_segments)]
            else:
                segments = [(seg.gref, seg.first_sect, seg.last_sect) for seg in req.segments]
            for gref, _, last in segments:
                assert (await page(gref))[(last + 1) * 512:] == bytes(4096 - (last + 1) * 512)
        guest.kill()


async def _offer(xs, backend: str) -> None:
    """A backend's InitWait, features and all (an agent playing blkback)."""
    await xs.write_many([(f"{backend}/sectors", "2048"), (f"{backend}/info", "0"),
                         (f"{backend}/sector-size", "512"), (f"{backend}/state", "2")])


class _ReportingGuest:
    """A guest program (``code``, with the domain's control socket ``fd``) that prints one
    JSON report for each line it reads."""

    def __init__(self, process: trio.Process) -> None:
        self.process, self._lines = process, b""

    @classmethod
    async def start(cls, code: str, fd: int) -> "_ReportingGuest":
        return cls(await start_domain_program(code, fd, stdin=subprocess.PIPE))

    async def report(self) -> dict:
        await self.process.stdin.send_all(b"?\n")
        with trio.fail_after(20):
            while b"\n" not in self._lines:
                self._lines += await self.process.stdout.receive_some(4096)
        line, self._lines = self._lines.split(b"\n", 1)
        return json.loads(line)

    async def aclose(self) -> None:
        self.process.kill()
        await self.process.wait()


@contextlib.asynccontextmanager
async def _guest_and_agent_backend(tmp_path, name: str, guest_code: str):
    """A guest (``guest_code``, a _ReportingGuest) whose vbd's backend is an agent named
    ``name``, which has offered its InitWait and to whose offer the guest has answered
    Initialised: yields the agent, the guest's domid, the frontend's and the backend's
    directories, and the guest."""
    async with _agents_and_a_guest(tmp_path, name) as (xs, (agent,), guest_domid, fd, _):
        fe = f"/local/domain/{guest_domid}/device/vbd/51712"
        be = f"/local/domain/{agent.domid}/backend/vbd/{guest_domid}/51712"
        await add_vbd(xs, backend=agent.domid, frontend=guest_domid, devid=51712, target="/nonexistent")
        await _offer(xs, be)
        guest = await _ReportingGuest.start(guest_code, fd)
        try:
            await _initialised(xs, fe)
            yield xs, agent, guest_domid, fe, be, guest
        finally:
            await guest.aclose()


def _reading_guest(report: dict[str, str]) -> str:
    """A guest whose blkfront reads its disk's first page once and reports, for each line
    it reads, how that read ended (the first bytes read, or its errno) once it has, and
    the statistics ``report`` names (key in the report: BlkfrontStatistics attribute)."""
    return _blkfront_guest("""
        result = {}

        async def read():
            try:
                result["read"] = (await front.read(0, 4096))[:4].hex()
            except BlockIOError as exc:
                result["read"] = exc.errno

        nursery.start_soon(read)
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some(100):  # one line: report
            stats = front.statistics()
            print(json.dumps({**result, **{key: getattr(stats, name) for key, name in REPORT.items()}}),
                  flush=True)
        nursery.cancel_scope.cancel()
    """.replace("REPORT", repr(report)))


OVERFLOW_GUEST = _reading_guest({"bad": "bad_responses", "in_flight": "in_flight",
                                 "connections": "connections"})


async def test_a_backend_that_overflows_the_ring_loses_its_connection(tmp_path):
    """ATTACKS A4: a backend that publishes more responses than there were requests (its
    producer index far past ours) completes nothing with them: blkfront counts it, ends
    that connection and makes a new one, on which the read is replayed and answered."""
    from ringfence.hypervisor.io import blkif
    async with _guest_and_agent_backend(tmp_path, "overflower", OVERFLOW_GUEST) as (
            xs, backend, guest_domid, fe, be, guest):
        ring, port = await _connect_agent(xs, backend, guest_domid, fe, be)
        await _requests_on_ring(backend, ring, 1)
        await backend.ok("write", map=ring, offset=8, data=(1000).to_bytes(4, "little").hex())
        await backend.ok("notify", port=port)
        with trio.fail_after(20):  # a new handshake: Initialising again
            while await xs.read_many([f"{fe}/state"]) != [b"1"]:
                await trio.sleep(0.05)
        assert await guest.report() == {"bad": 1, "in_flight": 1, "connections": 1}

        await _offer(xs, be)
        await _initialised(xs, fe)
        ring, port = await _connect_agent(xs, backend, guest_domid, fe, be)
        await _requests_on_ring(backend, ring, 1)  # the read, replayed on the new ring
        request = await _ring_request(backend, ring, 0)
        await _answer(backend, ring, port, [blkif.encode_response(request.id, blkif.Op.READ, 0)])
        with trio.fail_after(20):
            while "read" not in (report := await guest.report()):
                await trio.sleep(0.05)
        assert report == {"read": "00000000", "bad": 1, "in_flight": 0, "connections": 2}


REVOKE_GUEST = _reading_guest({"unrevoked": "unrevoked_grants", "backend_id": "backend_id"})


@pytest.mark.parametrize("lets_go", ["never", "during_teardown"])
async def test_pages_an_old_backend_keeps_mapped_are_never_reused(tmp_path, lets_go):
    """ATTACKS A6 (XSA-396): a backend maps the ring and a data page and never lets go;
    when the device moves to another backend, blkfront's try-end-access fails for those
    grants: the pages are not granted to the new backend nor reused, the device fails its
    I/O (as Linux's blkfront disables it), the refused grants are counted, and they are
    retried, and the device works again, once the toolstack replaces the backend later."""
    from ringfence.toolstack.devices import move_vbd
    async with _agents_and_a_guest(tmp_path, "clingy", "next", "third") as (
            xs, (clingy, nxt, third), guest_domid, fd, _):
        fe = f"/local/domain/{guest_domid}/device/vbd/51712"

        def be_of(agent) -> str:
            return f"/local/domain/{agent.domid}/backend/vbd/{guest_domid}/51712"

        await add_vbd(xs, backend=clingy.domid, frontend=guest_domid, devid=51712, target="/nonexistent")
        await _offer(xs, be_of(clingy))
        guest = await _ReportingGuest.start(REVOKE_GUEST, fd)
        try:
            await _initialised(xs, fe)
            ring, _ = await _connect_agent(xs, clingy, guest_domid, fe, be_of(clingy))
            await _requests_on_ring(clingy, ring, 1)  # the read is on the ring: map its data page too
            request = await _ring_request(clingy, ring, 0)
            data = (await clingy.ok("map", domid=guest_domid, grefs=[request.segments[0].gref]))["map"]

            # the toolstack moves the device while the old backend still holds both pages
            await move_vbd(xs, old_backend=clingy.domid, new_backend=nxt.domid, frontend=guest_domid,
                           devid=51712, target="/nonexistent")
            if lets_go == "during_teardown":
                # as a backend that just died does once the hypervisor has torn its domain
                # down: no failure, the pages go to the next backend, the read waits for it
                await trio.sleep(0.3)
                await clingy.ok("unmap", map=ring)
                await clingy.ok("unmap", map=data)
                await _offer(xs, be_of(nxt))
                await _initialised(xs, fe)
                assert await guest.report() == {"unrevoked": 0, "backend_id": nxt.domid}
                return
            with trio.fail_after(20):
                while "read" not in (state := await guest.report()):
                    await trio.sleep(0.05)
            assert state == {"read": 5, "unrevoked": 2, "backend_id": clingy.domid}

            # the old backend lets go; the toolstack replaces the backend once more
            await clingy.ok("unmap", map=ring)
            await clingy.ok("unmap", map=data)
            await move_vbd(xs, old_backend=nxt.domid, new_backend=third.domid, frontend=guest_domid,
                           devid=51712, target="/nonexistent")
            await _offer(xs, be_of(third))
            await _initialised(xs, fe)
            assert (await guest.report())["unrevoked"] == 0
            assert (await guest.report())["backend_id"] == third.domid
        finally:
            await guest.aclose()


REFUSED_GUEST = _reading_guest({"refused": "refused_handshakes", "backend_id": "backend_id"})


async def test_a_backend_that_closes_on_the_keys_gets_a_new_handshake(tmp_path):
    """A backend that goes from InitWait to Closed once the frontend has written its keys
    (as one does that read a stale Connected of the frontend's, whose keys it may not read,
    after a takeover) is not waited on for ever: blkfront starts the handshake over from
    Initialising, which a closed backend waits for, and connects on the second one."""
    async with _guest_and_agent_backend(tmp_path, "refuser", REFUSED_GUEST) as (
            xs, refuser, guest_domid, fe, be, guest):
        await xs.write_many([(f"{be}/state", "5"), (f"{be}/state", "6")])
        with trio.fail_after(20):
            while await xs.read_many([f"{fe}/state"]) != [b"1"]:
                await trio.sleep(0.05)
        await _offer(xs, be)
        await _initialised(xs, fe)
        ring, _ = await _connect_agent(xs, refuser, guest_domid, fe, be)
        await _requests_on_ring(refuser, ring, 1)  # the guest's read, on the new rings
        assert await guest.report() == {"refused": 1, "backend_id": refuser.domid}


async def test_a_device_handed_to_a_new_backend_starts_over_from_initialising(tmp_path):
    """After a crash the toolstack writes the device for the next backend and resets the
    frontend's state in the same transaction: the Connected it had said was the dead
    backend's, and a backend already up (a warm spare handed the device whole) must not act
    on it and on keys it may not read."""
    from ringfence.toolstack.devices import move_vbd
    async with _agents_and_a_guest(tmp_path, "dead", "next") as (xs, (dead, nxt), guest_domid, _, _):
        fe = f"/local/domain/{guest_domid}/device/vbd/51712"
        await add_vbd(xs, backend=dead.domid, frontend=guest_domid, devid=51712, target="/nonexistent")
        await xs.write(f"{fe}/state", "4")  # as the frontend said to the backend that died
        await move_vbd(xs, old_backend=dead.domid, new_backend=nxt.domid, frontend=guest_domid,
                       devid=51712, target="/nonexistent")
        assert await xs.read_many([f"{fe}/state", f"{fe}/backend-id"]) == [b"1", str(nxt.domid).encode()]


STANDBY_GUEST = _reading_guest({"backend_id": "backend_id", "bad": "bad_responses",
                                "in_flight": "in_flight", "promotions": "promotions",
                                "standby": "standby_backend", "signalled": "signalled_takeovers",
                                "links": "standby_links"})


@pytest.mark.parametrize("told", ["xenstore", "channel"])
@pytest.mark.parametrize("spare", ["answers_early", "never_serves"])
async def test_a_hostile_spare_on_a_standby_link(tmp_path, spare, told):
    """ATTACKS A4 for a warm spare: one that answers on its standby rings before any request
    is put on them has its answers complete nothing (the device is given up on at the
    takeover, as for any backend that breaks the ring), and one that says Connected and
    never serves leaves the replayed read waiting, without an error, until the toolstack
    replaces it; the next backend then answers that read. Alike whether the frontend hears
    of the takeover from XenStore's switch or first on its takeover channel (dom0's word:
    it then switches in the wake-up itself)."""
    from ringfence.hypervisor.io import blkif
    from ringfence.toolstack.devices import move_vbd, stage_device, switch_backends
    from ringfence.xenbus.paths import DevicePaths
    async with _agents_and_a_guest(tmp_path, "primary", "spare", "next") as (
            xs, (primary, evil, nxt), guest_domid, fd, dom0):
        fe = f"/local/domain/{guest_domid}/device/vbd/51712"
        slot = f"{fe}/standby-{evil.domid}"

        def paths_of(agent) -> DevicePaths:
            return DevicePaths("vbd", guest_domid, agent.domid, 51712)

        await add_vbd(xs, backend=primary.domid, frontend=guest_domid, devid=51712, target="/nonexistent")
        await _offer(xs, paths_of(primary).backend)
        guest = await _ReportingGuest.start(STANDBY_GUEST, fd)
        try:
            await _initialised(xs, fe)
            # connected; the read waits on its ring, unanswered
            await _connect_agent(xs, primary, guest_domid, fe, paths_of(primary).backend)
            # The spare is staged on a standby directory and the frontend stands by with it.
            assert await stage_device(xs, paths_of(evil), primary.domid, target="/nonexistent")
            await _offer(xs, paths_of(evil).backend)
            await _initialised(xs, slot)
            ring, port = await _connect_agent(xs, evil, guest_domid, slot, paths_of(evil).backend,
                                              map_ring=spare == "answers_early")
            with trio.fail_after(20):
                while (await guest.report())["standby"] != evil.domid:
                    await trio.sleep(0.05)
            if spare == "answers_early":  # an answer to a request never made, and a kick
                await _answer(evil, ring, port, [blkif.encode_response(1, blkif.Op.READ, 0)])
                await trio.sleep(0.2)
                assert (await guest.report())["in_flight"] == 1  # nothing completed meanwhile

            # The primary dies; the toolstack (told first on the takeover channel, as the
            # hypervisor's death notice does) switches the device to the spare.
            primary.kill()
            if told == "channel":
                raw = await xs.read(f"{slot}/{TAKEOVER_KEY}")
                channel = await dom0.events.bind_interdomain(guest_domid, int(raw))
                channel.notify()
                with trio.fail_after(20):
                    while (await guest.report())["signalled"] != 1:
                        await trio.sleep(0.05)
            await switch_backends(xs, [(paths_of(primary), paths_of(evil), True)])
            with trio.fail_after(20):
                while (state := await guest.report())["promotions"] != 1:
                    await trio.sleep(0.05)
            if spare == "answers_early":
                with trio.fail_after(20):
                    while "read" not in (state := await guest.report()):
                        await trio.sleep(0.05)
                assert state["read"] == errno.EIO and state["bad"] == 1, state
            else:
                await trio.sleep(0.5)
                state = await guest.report()
                assert "read" not in state and state["in_flight"] == 1, state
                assert state["backend_id"] == evil.domid and state["bad"] == 0, state

            # The toolstack replaces the spare (its domain destroyed): the device connects
            # to the next backend, which finds the read replayed on its ring
            # (never_serves) and answers it.
            evil.kill()
            await move_vbd(xs, old_backend=evil.domid, new_backend=nxt.domid, frontend=guest_domid,
                           devid=51712, target="/nonexistent")
            await _offer(xs, paths_of(nxt).backend)
            await _initialised(xs, fe)
            ring, port = await _connect_agent(xs, nxt, guest_domid, fe, paths_of(nxt).backend)
            assert (await guest.report())["backend_id"] == nxt.domid
            if spare == "never_serves":
                await _requests_on_ring(nxt, ring, 1)
                request = await _ring_request(nxt, ring, 0)
                page = (await nxt.ok("map", domid=guest_domid, grefs=[request.segments[0].gref]))["map"]
                await nxt.ok("write", map=page, data=b"\xc0\xff\xee\x00".hex())
                await _answer(nxt, ring, port, [blkif.encode_response(request.id, blkif.Op.READ, 0)])
                with trio.fail_after(20):
                    while "read" not in (state := await guest.report()):
                        await trio.sleep(0.05)
                assert state["read"] == "c0ffee00" and state["bad"] == 0, state
        finally:
            await guest.aclose()


async def test_a_spare_that_hides_or_loses_its_state_costs_one_standby_link(tmp_path):
    """A spare standing by makes its state unreadable to the frontend (it owns its backend
    directory): the frontend, which hears of it no more, goes on serving on its connection.
    Then the spare dies and its directories go, but the device's ``standby`` still names
    its slot: the frontend lets go of that link and does not try the slot again (it did,
    some 470 times, until the next spare was named)."""
    from ringfence.toolstack.devices import stage_device
    from ringfence.xenbus.paths import DevicePaths
    async with _agents_and_a_guest(tmp_path, "primary", "spare") as (
            xs, (primary, evil), guest_domid, fd, dom0):
        fe = f"/local/domain/{guest_domid}/device/vbd/51712"
        slot = f"{fe}/standby-{evil.domid}"
        primary_paths = DevicePaths("vbd", guest_domid, primary.domid, 51712)
        spare_paths = DevicePaths("vbd", guest_domid, evil.domid, 51712)
        await add_vbd(xs, backend=primary.domid, frontend=guest_domid, devid=51712, target="/nonexistent")
        await _offer(xs, primary_paths.backend)
        guest = await _ReportingGuest.start(STANDBY_GUEST, fd)
        try:
            await _initialised(xs, fe)
            await _connect_agent(xs, primary, guest_domid, fe, primary_paths.backend)
            assert await stage_device(xs, spare_paths, primary.domid, target="/nonexistent")
            await _offer(xs, spare_paths.backend)
            await _initialised(xs, slot)
            await _connect_agent(xs, evil, guest_domid, slot, spare_paths.backend, map_ring=False)
            with trio.fail_after(20):
                while (await guest.report())["standby"] != evil.domid:
                    await trio.sleep(0.05)
            links = (await guest.report())["links"]

            state = f"{spare_paths.backend}/state"
            await xs.set_perms(state, [f"n{evil.domid}"])  # only the spare may read it now
            await xs.write(state, "5")
            await trio.sleep(0.5)
            report = await guest.report()
            assert report["links"] == links and report["backend_id"] == primary.domid, report
            assert report["bad"] == 0 and guest.process.returncode is None, report

            evil.kill()
            await xs.rm(spare_paths.backend)
            await xs.rm(slot)  # and `standby` left naming it
            with trio.fail_after(20):
                while (report := await guest.report())["standby"] != -1:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            report = await guest.report()
            assert report["links"] == links and report["backend_id"] == primary.domid, report
            assert await xs.read_many([f"{fe}/standby"]) == [slot.encode()]
        finally:
            await guest.aclose()


CANARY = textwrap.dedent(CONNECT + """            import dataclasses, sys
            rounds, canaries = int(sys.argv[1]), (0xA5, 0x5A)
            page = data.buffer
            pattern = bytes([0x11]) * 4096
            cases = [
                Request(Op.WRITE, 1, 0, 0, 8, (Segment(good, 0, 7),)),             # served
                Request(Op.READ, 1, 0, 0, 8, (Segment(good, 0, 7),)),              # served
                Request(Op.READ, 1, 0, 0, 8, (Segment(good, 2, 5),)),              # part of a page
                Request(Op.FLUSH_DISKCACHE, 0, 0, 0, 0, ()),
                Request(Op.DISCARD, 0, 0, 0, 64, (), nr_sectors=8),
                Request(Op.READ, 0, 0, 0, 0, ()),                                 # refusals...
                Request(Op.READ, 1, 0, 0, 0, (Segment(good, 6, 2),)),
                Request(Op.READ, 1, 0, 0, sectors, (Segment(good, 0, 7),)),
                Request(0x55, 1, 0, 0, 0, (Segment(good, 0, 7),)),
                Request(Op.READ, 1, 0, 0, 0, (Segment(9999, 0, 7),)),
                Request(Op.INDIRECT, 5000, 0, 0, 0, indirect_op=Op.READ),
                Request(Op.INDIRECT, 3, 0, 0, 0, indirect_op=Op.READ),            # bad page
            ]
            found, answered = 0, 0
            for r in range(rounds):
                for i, case in enumerate(cases):
                    if case.operation == Op.WRITE:
                        page[:] = pattern
                    else:
                        page[:] = bytes(4096)
                    rid = 0x0101010100000000 + r * 64 + i  # no canary byte in any id
                    ring.put_requests([blkif.encode_request(dataclasses.replace(case, id=rid))])
                    ring.push_requests(port.notify_fd)
                    raws = []
                    while not raws:
                        raws = ring.take_responses()
                        if not raws and not ring.final_check_for_responses():
                            await port.wait()
                    answered += 1
                    # everything the backend wrote: the response and, for reads, the page
                    written = bytes(raws[0][9:10] + raws[0][12:16])  # the padding
                    if case.operation == Op.READ and case.segments and i < 3:
                        first, last = case.segments[0].first_sect, case.segments[0].last_sect
                        written += bytes(page[first * 512:(last + 1) * 512])
                        assert bytes(page[first * 512:(last + 1) * 512]) == pattern[:(last - first + 1) * 512]
                    found += sum(written.count(c) for c in canaries)
            print(json.dumps({"answered": answered, "canary_bytes": found}), flush=True)

    trio.run(main)
""")


async def test_no_backend_memory_reaches_shared_pages(tmp_path):
    """ATTACKS A3 (XSA-216) with a canary: blkback runs with every allocation filled with
    0x5A and every free with 0xA5 (glibc's perturb tunable, Python's allocations through
    malloc); a frontend sends every operation, served and refused, round after round, and
    scans all the backend wrote to shared memory (response padding, data read). No canary
    byte may appear, and reads return exactly what was written."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 << 20))
    # glibc fills what malloc gives with 0x5A and what free takes with 0xA5 (no thread
    # cache, which would skip that), and Python allocates through malloc
    env = dict(os.environ, PYTHONMALLOC="malloc", MALLOC_PERTURB_="165",
               GLIBC_TUNABLES="glibc.malloc.perturb=165:glibc.malloc.tcache_count=0")
    async with _blkback_host(tmp_path, env) as host:
        front_domid, fd = await host.dom0.create_domain("front")
        async with open_xenstore(host.xs_path) as xs:
            await add_vbd(xs, backend=host.stor_domid, frontend=front_domid, devid=51712, target=str(disk))
        out = tmp_path / "front.out"
        with open(out, "wb") as sink:
            front = await start_domain_program(CANARY, fd, "150", stdout=sink)
        with trio.fail_after(120):
            assert await front.wait() == 0
        assert json.loads(out.read_text()) == {"answered": 150 * 12, "canary_bytes": 0}
        assert host.stor.poll() is None
