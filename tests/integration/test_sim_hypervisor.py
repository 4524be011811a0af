"""The sim hypervisor with real domain processes: grants, maps, copies, event channels,
domain death, and the isolation invariant of DESIGN.md §2."""
from __future__ import annotations

import os
import signal

import pytest
import trio

from ringfence.hypervisor.sim.protocol import GNTST, EventKind
from ringfence.hypervisor.sim.client import open_dom0
from ringfence.isolation.sandbox import SandboxSpec
from ringfence.testing.sim import open_agent, open_hypervisor

GTF_reading, GTF_writing = 1 << 3, 1 << 4


@pytest.fixture
async def hv(tmp_path):
    async with open_hypervisor(tmp_path) as (path, dom0):
        yield dom0


async def test_domains_get_distinct_domids_and_are_listed(hv):
    async with open_agent(hv, "alpha") as a, open_agent(hv, "beta") as b:
        assert a.domid != b.domid and 1 <= a.domid <= 0x7FEF
        assert (await a.ok("info"))["domid"] == a.domid
        names = {d["name"]: d for d in await hv.list_domains()}
        assert names["alpha"]["state"] == "running" and names["alpha"]["pid"] == a.pid
    with pytest.raises(OSError):
        await hv.create_domain("bad/name")


async def test_duplicate_name_refused(hv):
    async with open_agent(hv, "same"):
        with pytest.raises(OSError, match="File exists"):
            await hv.create_domain("same")


async def test_map_shares_memory_both_ways_and_pins_the_entry(hv):
    async with open_agent(hv, "front") as front, open_agent(hv, "back") as back:
        pages = await front.ok("alloc", count=2)
        grefs = [(await front.ok("grant", to=back.domid, frame=f))["gref"] for f in pages["frames"]]
        await front.ok("write", range=pages["range"], offset=4096 + 10, data=b"hello".hex())
        mapped = await back.ok("map", domid=front.domid, grefs=grefs)
        got = await back.ok("read", map=mapped["map"], offset=4096 + 10, length=5)
        assert bytes.fromhex(got["data"]) == b"hello"
        await back.ok("write", map=mapped["map"], offset=0, data=b"reply".hex())
        got = await front.ok("read", range=pages["range"], offset=0, length=5)
        assert bytes.fromhex(got["data"]) == b"reply"
        # Ending access while mapped is refused; after unmap it succeeds.
        assert (await front.ok("end", gref=grefs[0]))["ended"] is False
        await back.ok("unmap", map=mapped["map"])
        assert (await front.ok("end", gref=grefs[0]))["ended"] is True


async def test_unknown_and_foreign_grefs_are_refused(hv):
    async with open_agent(hv, "g") as granter, open_agent(hv, "m") as mapper, \
            open_agent(hv, "o") as other:
        pages = await granter.ok("alloc", count=1)
        gref = (await granter.ok("grant", to=other.domid, frame=pages["frames"][0]))["gref"]
        # granted to another domid
        result = await mapper.call("map", domid=granter.domid, grefs=[gref])
        assert result["gntst"] == GNTST.permission_denied
        # never granted
        result = await mapper.call("map", domid=granter.domid, grefs=[gref + 1])
        assert result["gntst"] == GNTST.general_error
        # out of the table
        result = await mapper.call("map", domid=granter.domid, grefs=[10**6])
        assert result["gntst"] == GNTST.bad_gntref
        # a domain that does not exist, and mapping oneself
        assert (await mapper.call("map", domid=0x7000, grefs=[gref]))["gntst"] == GNTST.bad_domain
        # the intended grantee can
        await other.ok("map", domid=granter.domid, grefs=[gref])


async def test_readonly_grant_gives_no_way_to_write(hv):
    # The mapper runs as another user without privileges, as sandboxed domains do.
    async with open_agent(hv, "g") as granter, open_agent(hv, "m", user=65534) as mapper:
        pages = await granter.ok("alloc", count=1)
        frame = pages["frames"][0]
        gref = (await granter.ok("grant", to=mapper.domid, frame=frame, readonly=True))["gref"]
        result = await mapper.call("map", domid=granter.domid, grefs=[gref])  # read-write asked
        assert result["gntst"] == GNTST.permission_denied
        raw = await mapper.ok("map_raw", domid=granter.domid, gref=gref, readonly=True)
        assert raw["status"] == 0 and raw["fds"] == 1
        assert raw["writable_mmap"] is False and raw["reopen_rw"] is False
        mapped = await mapper.ok("map", domid=granter.domid, grefs=[gref], readonly=True)
        result = await mapper.call("write", map=mapped["map"], data="00")
        assert result["ok"] is False and "TypeError" in result["error"]


async def _destroyed(hv, agent) -> int:
    """Kill ``agent``'s domain and wait until the hypervisor has destroyed it; its domid."""
    agent.kill()
    await agent.process.wait()
    with trio.fail_after(5):
        while any(d["domid"] == agent.domid for d in await hv.list_domains()):
            await trio.sleep(0.02)
    return agent.domid


async def test_map_after_end_of_access_and_after_granter_died(hv):
    async with open_agent(hv, "m") as mapper:
        async with open_agent(hv, "g") as granter:
            pages = await granter.ok("alloc", count=2)
            g1 = (await granter.ok("grant", to=mapper.domid, frame=pages["frames"][0]))["gref"]
            g2 = (await granter.ok("grant", to=mapper.domid, frame=pages["frames"][1]))["gref"]
            assert (await granter.ok("end", gref=g1))["ended"]
            result = await mapper.call("map", domid=granter.domid, grefs=[g1])
            assert result["gntst"] == GNTST.general_error
            granter_domid = await _destroyed(hv, granter)
        result = await mapper.call("map", domid=granter_domid, grefs=[g2])
        assert result["gntst"] == GNTST.bad_domain


async def test_unmap_refused_while_the_page_is_still_reachable(hv):
    async with open_agent(hv, "g") as granter, open_agent(hv, "m") as mapper:
        pages = await granter.ok("alloc", count=1)
        gref = (await granter.ok("grant", to=mapper.domid, frame=pages["frames"][0]))["gref"]
        # map through the protocol, keep nothing mapped: the unmap of that handle succeeds
        raw = await mapper.ok("map_raw", domid=granter.domid, gref=gref, readonly=False)
        assert raw["status"] == 0
        assert (await granter.ok("end", gref=gref))["ended"] is False


async def test_an_unmap_is_refused_while_mapped_until_the_granter_is_gone(hv):
    async with open_agent(hv, "m") as mapper:
        async with open_agent(hv, "g") as granter:
            pages = await granter.ok("alloc", count=1)
            gref = (await granter.ok("grant", to=mapper.domid, frame=pages["frames"][0]))["gref"]
            mapped = await mapper.ok("map", domid=granter.domid, grefs=[gref])
            # Still mapped in the mapper: the pin stays, so the granter cannot reuse the page.
            result = await mapper.ok("unmap_handles", map=mapped["map"])
            assert result["statuses"] == [GNTST.general_error]
            assert (await granter.ok("end", gref=gref))["ended"] is False
            await _destroyed(hv, granter)
        # The granter is gone and its page goes to no one: the handle is released although
        # the page is still mapped, and once only (the same handle twice in one call).
        result = await mapper.ok("unmap_handles", map=mapped["map"], repeat=2)
        assert result["statuses"] == [GNTST.okay, GNTST.bad_handle]
        assert (await hv.statistics())["hypervisor"]["unmaps"] >= 1


async def test_mapper_death_releases_its_pins(hv):
    async with open_agent(hv, "g") as granter:
        async with open_agent(hv, "m") as mapper:
            pages = await granter.ok("alloc", count=1)
            gref = (await granter.ok("grant", to=mapper.domid, frame=pages["frames"][0]))["gref"]
            await mapper.ok("map", domid=granter.domid, grefs=[gref])
            assert (await granter.ok("end", gref=gref))["ended"] is False
        with trio.fail_after(5):
            while not (await granter.ok("end", gref=gref))["ended"]:
                await trio.sleep(0.02)


async def test_grant_copy_ram_frames_and_bad_arguments(hv):
    async with open_agent(hv, "g") as granter, open_agent(hv, "c") as copier:
        await granter.ok("write", ram=5, offset=100, data=b"ram-data".hex())
        gref = (await granter.ok("grant", to=copier.domid, frame=5, readonly=True))["gref"]
        result = await copier.ok("copy", segments=[
            {"source": [granter.domid, gref, 100], "length": 8}])
        assert result["statuses"] == [0] and bytes.fromhex(result["data"][0]) == b"ram-data"
        # read-only grant: copying into it is refused
        result = await copier.ok("copy", segments=[
            {"dest": [granter.domid, gref, 0], "data": b"x".hex(), "length": 1}])
        assert result["statuses"] == [GNTST.permission_denied]
        # crossing the page end
        result = await copier.ok("copy", segments=[{"source": [granter.domid, gref, 4090], "length": 8}])
        assert result["statuses"] == [GNTST.bad_copy_arg]
        # a bad local address fails that segment, not the daemon
        result = await copier.ok("copy_addr", source=[granter.domid, gref, 0], address=8, length=8)
        assert result["status"] == GNTST.bad_virt_addr
        # writable grant: copy in, granter sees it
        wref = (await granter.ok("grant", to=copier.domid, frame=6))["gref"]
        result = await copier.ok("copy", segments=[
            {"dest": [granter.domid, wref, 7], "data": b"written".hex(), "length": 7}])
        assert result["statuses"] == [0]
        got = await granter.ok("read", ram=6, offset=7, length=7)
        assert bytes.fromhex(got["data"]) == b"written"
        # copying from a mappable page works too
        pages = await granter.ok("alloc", count=1)
        await granter.ok("write", range=pages["range"], data=b"page".hex())
        pref = (await granter.ok("grant", to=copier.domid, frame=pages["frames"][0]))["gref"]
        result = await copier.ok("copy", segments=[{"source": [granter.domid, pref, 0], "length": 4}])
        assert bytes.fromhex(result["data"][0]) == b"page"


async def test_event_channels_notify_without_the_daemon(hv):
    async with open_agent(hv, "a") as a, open_agent(hv, "b") as b, open_agent(hv, "c") as c:
        port = (await a.ok("evt_alloc", remote=b.domid))["port"]
        # only the named remote may bind
        assert (await c.call("evt_bind", domid=a.domid, port=port))["errno"] == 13
        bport = (await b.ok("evt_bind", domid=a.domid, port=port))["port"]
        assert (await c.call("evt_bind", domid=a.domid, port=port))["ok"] is False
        await a.ok("notify", port=port)
        assert (await b.ok("wait", port=bport))["count"] == 1
        await b.ok("notify", port=bport)
        await b.ok("notify", port=bport)
        assert (await a.ok("wait", port=port))["count"] == 2
        before = (await hv.statistics())["hypervisor"]
        for _ in range(50):
            await a.ok("notify", port=port)
        after = (await hv.statistics())["hypervisor"]
        assert after == before  # notifications never reach the hypervisor
        await a.ok("close_port", port=port)


async def test_domain_death_is_announced_and_revokes_everything(hv):
    await hv.subscribe()
    async with open_agent(hv, "victim") as victim:
        with trio.fail_after(5):
            kind, domid = await hv.next_event()
        assert (kind, domid) == (EventKind.INTRODUCED, victim.domid)
        await hv.destroy_domain(victim.domid)
        with trio.fail_after(5):
            kind, domid = await hv.next_event()
        assert (kind, domid) == (EventKind.RELEASED, victim.domid)
        with trio.fail_after(5):
            await victim.process.wait()  # destroy kills the process


async def test_bad_control_messages_close_only_that_connection(hv):
    async with open_agent(hv, "bad") as bad, open_agent(hv, "good") as good:
        result = await bad.ok("raw", data="4652010001000000" + "00000000")  # HELLO again
        assert result["alive"] is False
        assert (await good.ok("info"))["domid"] == good.domid
        assert (await hv.statistics())["hypervisor"]["protocol_errors"] >= 1
        # the process itself is not punished beyond its connection
        assert bad.process.poll() is None


@pytest.mark.parametrize("junk", [
    "01",                                   # truncated header
    "0000" + "0100" + "00000000" + "00000000",  # bad magic
    "4652" + "0b00" + "01000000" + "ff000000",  # length does not match
    "4652" + "6300" + "01000000" + "00000000",  # unknown op
    "4652" + "0500" + "01000000" + "04000000" + "ffffffff",  # map batch count absurd
])
async def test_each_kind_of_garbage_is_rejected(hv, junk):
    async with open_agent(hv, "victim") as victim, open_agent(hv, "bystander") as bystander:
        assert (await victim.ok("raw", data=junk))["alive"] is False
        assert (await bystander.ok("info"))["domid"] == bystander.domid


async def test_forged_domid_is_impossible(hv):
    # A domain's identity is its connection: there is no field in which to claim another.
    async with open_agent(hv, "a") as a, open_agent(hv, "b") as b:
        stats = (await a.ok("statistics"))["statistics"]
        assert stats["domid"] == a.domid
        # dom0-only operations are refused to a domain, and cost it its connection
        result = await b.ok("raw", data="4652" + "1500" + "01000000" + "02000000" + f"{a.domid:04x}"[2:] + f"{a.domid:04x}"[:2])
        assert result["alive"] is False
        assert (await a.ok("info"))["domid"] == a.domid


async def test_store_connections_are_authenticated_by_the_hypervisor(hv, tmp_path):
    async with open_agent(hv, "guest") as guest:
        assert (await guest.call("store_ping", data="00"))["errno"] == 107  # no xenstored yet
        async with open_dom0(os.path.join(tmp_path, "hv.sock")) as store:
            await store.register_store()

            async def answer():
                event = await store.next_store_event()
                with trio.socket.from_stdlib_socket(event.sock) as s:
                    data = await s.recv(100)
                    await s.send(f"dom{event.domid}:".encode() + data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer)
                reply = await guest.ok("store_ping", data=b"hi".hex())
            assert bytes.fromhex(reply["reply"]) == f"dom{guest.domid}:hi".encode()


async def test_a_dead_xenstored_or_subscriber_costs_only_its_connection(hv, tmp_path):
    """Events for a subscriber (or xenstored) that died must not take the hypervisor down,
    and domains dialling XenStore meanwhile are told it is not there (ENOTCONN), so they
    keep redialling instead of holding a connection nobody serves."""
    async with open_dom0(os.path.join(tmp_path, "hv.sock")) as store:
        await store.register_store()
        await store.subscribe()
    async with open_agent(hv, "guest") as guest:  # announced to the dead subscriber
        for _ in range(20):
            errno = (await guest.call("store_ping", data="00"))["errno"]
            if errno == 107:
                break
            await trio.sleep(0.05)
        assert errno == 107
        assert (await guest.ok("info"))["domid"] == guest.domid
    assert len(await hv.list_domains()) >= 0  # the daemon still answers


async def test_rename_domain_is_dom0s_and_names_stay_unique(hv):
    async with open_agent(hv, "spare") as spare, open_agent(hv, "taken"):
        await hv.rename_domain(spare.domid, "active")
        names = {d["name"]: d["domid"] for d in await hv.list_domains()}
        assert names["active"] == spare.domid and "spare" not in names
        with pytest.raises(OSError, match="File exists"):
            await hv.rename_domain(spare.domid, "taken")
        with pytest.raises(OSError):
            await hv.rename_domain(0x7FEE, "ghost")


async def test_death_notices_tell_dom0s_port_once_the_process_is_gone(hv):
    """NOTIFY_ON_DEATH: a port dom0 bound (a warm spare's takeover channel) is notified when
    the watched domain's process exits, at once and once; not when dom0 destroys the domain
    itself (its process may still run then), and never for a port that is not dom0's."""
    async with open_agent(hv, "guest") as guest, open_agent(hv, "victim") as victim, \
            open_agent(hv, "destroyed") as destroyed:
        ports = []
        for _ in range(2):
            port = (await guest.ok("evt_alloc", remote=0))["port"]
            ports.append((port, await hv.events.bind_interdomain(guest.domid, port)))
        (first, bound), (second, other) = ports
        await hv.notify_on_death(victim.domid, bound.port)
        await hv.notify_on_death(destroyed.domid, other.port)
        with pytest.raises(OSError):  # no such domain
            await hv.notify_on_death(4000, bound.port)
        with pytest.raises(OSError):  # not a port of dom0's that is bound
            await hv.notify_on_death(victim.domid, 999)
        victim.kill()
        with trio.fail_after(5):
            await victim.process.wait()
        assert (await guest.ok("wait", port=first))["count"] == 1
        await hv.destroy_domain(destroyed.domid)
        with trio.fail_after(5):
            await destroyed.process.wait()
        assert (await guest.ok("wait", port=second, timeout=0.3))["count"] == 0
        assert (await hv.statistics())["hypervisor"]["death_notices"] == 1


async def test_a_domain_alone_in_its_sandbox_is_announced_dead_as_it_begins_to_exit(hv):
    """With the kernel's exit records (root in the host's namespaces), the death notice of a
    domain that is the only process of its sandbox goes as soon as its process has begun to
    exit, before its memory is torn down; that of a domain with a child process goes once
    its process is gone, as before. Each port hears of its domain once."""
    if (await hv.statistics())["hypervisor"]["exit_records"] is None:
        pytest.skip("no exit records here (not root in the host's namespaces)")
    group = f"test-exit-records-{os.getpid()}"
    async with open_agent(hv, "guest") as guest, \
            open_agent(hv, "alone", sandbox=SandboxSpec("alone", uid=0, group=group)) as alone, \
            open_agent(hv, "parent", sandbox=SandboxSpec("parent", uid=0, group=group)) as parent:
        await parent.ok("fork")
        for watched in (alone, parent):  # an exit of some milliseconds: the notice's race
            await watched.ok("hold_memory", megabytes=256)
        pids = {row["domid"]: row["pid"] for row in await hv.list_domains()}
        for watched, early in ((alone, 1), (parent, 0)):
            port = (await guest.ok("evt_alloc", remote=0))["port"]
            bound = await hv.events.bind_interdomain(guest.domid, port)
            await hv.notify_on_death(watched.domid, bound.port)
            before = (await hv.statistics())["hypervisor"]["early_death_notices"]
            os.kill(pids[watched.domid], signal.SIGKILL)
            assert (await guest.ok("wait", port=port, timeout=5))["count"] == 1
            assert (await hv.statistics())["hypervisor"]["early_death_notices"] == before + early
            with trio.fail_after(5):
                await watched.process.wait()
            assert (await guest.ok("wait", port=port, timeout=0.3))["count"] == 0
        stats = (await hv.statistics())["hypervisor"]
        assert stats["death_notices"] == 2 and stats["exit_records"]["groups"] >= 2
