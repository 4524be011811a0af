"""Hostile XenStore clients (ATTACKS.md section C) against our daemon, in process: one
unprivileged domain connection each, as guests have, next to dom0's."""
from __future__ import annotations

import struct

import pytest
import trio

from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.xs_wire import Op, XenStoreError
from ringfence.xenbus.client import open_xenstore_stream
from ringfence.testing.xenstored import in_process_xenstored


async def _errors(xs, requests) -> list[str]:
    names = []
    for op, payload in requests:
        try:
            await xs.request(op, payload)
            names.append("OK")
        except XenStoreError as exc:
            names.append(exc.name)
    return names


async def test_bad_paths_privileged_ops_and_unknown_types_get_errors_not_crashes():
    """X14 near-miss paths, X17 privileged operations, X12 ownership and the root node."""
    async with in_process_xenstored() as xsd:
        guest_stream = await xsd.connect(5)
        dom0_stream = await xsd.connect(0)
        async with open_xenstore_stream(dom0_stream) as dom0, open_xenstore_stream(guest_stream) as guest:
            xsd.server.introduce_domain(5)
            await dom0.write("/local/domain/5/name", b"g")
            await dom0.set_perms("/local/domain/5", ["n5"])
            for path in ("/local/domain/", "//", "/a//b", "/a/", "", "@", "/a b\x01", "/\xff",
                         "/" + "a" * W.ABS_PATH_MAX, "a" * (W.REL_PATH_MAX + 1)):
                assert await _errors(guest, [(Op.READ, path.encode("utf-8", "surrogateescape") + b"\0")]) \
                    in (["EINVAL"], ["ENOENT"], ["EACCES"]), repr(path)
                assert await _errors(guest, [(Op.WRITE, path.encode("utf-8", "surrogateescape") + b"\0x")]) \
                    in (["EINVAL"], ["EACCES"]), repr(path)
            privileged = [(Op.INTRODUCE, b"9\x001\x002\x00"), (Op.RELEASE, b"5\x00"),
                          (Op.RESUME, b"5\x00"), (Op.SET_TARGET, b"5\x000\x00"),
                          (Op.SET_QUOTA, b"nodes\x005\x00"), (Op.SET_FEATURE, b"5\x001\x00")]
            assert set(await _errors(guest, privileged)) <= {"EACCES", "EPERM"}
            assert await _errors(guest, [(99, b"")]) == ["ENOSYS"]
            await guest.write("mine", b"1")
            # giving a node away is dom0's privilege; the root is like any other node
            assert await _errors(guest, [(Op.SET_PERMS, b"/local/domain/5/mine\x00n7\x00")]) \
                in (["EPERM"], ["EACCES"])
            for refused in await _errors(guest, [(Op.WRITE, b"/\x00x"), (Op.RM, b"/\x00"),
                                                 (Op.SET_PERMS, b"/\x00n5\x00")]):
                assert refused in ("EACCES", "EINVAL")
            assert await dom0.get_perms("/") == ["n0"]
            assert await dom0.read("/local/domain/5/mine") == b"1"  # the daemon carries on


async def test_watches_reveal_nothing_unreadable():
    """X1: no events for nodes the watcher may not read; special watches only for dom0."""
    async with in_process_xenstored() as xsd:
        guest_stream = await xsd.connect(5)
        dom0_stream = await xsd.connect(0)
        async with open_xenstore_stream(dom0_stream) as dom0, open_xenstore_stream(guest_stream) as guest:
            xsd.server.introduce_domain(5)
            xsd.server.introduce_domain(6)
            await dom0.write("/shared/open", b"1")
            await dom0.write("/shared/secret", b"s")
            await dom0.set_perms("/shared", ["n0", "r5"])
            await dom0.set_perms("/shared/open", ["n0", "r5"])
            async with guest.watch("/shared", "t") as events, guest.watch("@releaseDomain", "r") as special:
                assert (await events.receive())[0] == "/shared"
                await special.receive()  # the initial event every watch gets
                await dom0.write("/shared/secret", b"changed")  # n0: unreadable to dom5
                await dom0.write("/shared/open", b"2")          # readable
                assert (await events.receive())[0] == "/shared/open"
                xsd.server.release_domain(6)                        # dom0's business only
                with trio.move_on_after(0.3):
                    got = await special.receive()
                    raise AssertionError(f"unprivileged @releaseDomain event: {got}")
                with trio.move_on_after(0.1):
                    got = await events.receive()
                    raise AssertionError(f"event leaked: {got}")


async def test_a_new_domain_with_a_reused_domid_inherits_nothing():
    """X2 (XSA-322): permissions and quota of a destroyed domain do not pass to the next
    domain given its domid."""
    async with in_process_xenstored() as xsd:
        dom0_stream = await xsd.connect(0)
        async with open_xenstore_stream(dom0_stream) as dom0:
            xsd.server.introduce_domain(5)
            await dom0.write("/tool/data", b"for dom5 only")
            await dom0.set_perms("/tool/data", ["n0", "b5"])
            old_stream = await xsd.connect(5)
            async with open_xenstore_stream(old_stream) as old:
                assert await old.read("/tool/data") == b"for dom5 only"
                await dom0.mkdir("/local/domain/5")
                await dom0.set_perms("/local/domain/5", ["n5"])
                for i in range(20):
                    await old.write(f"/local/domain/5/n{i}", b"x")
            xsd.server.release_domain(5)
            xsd.server.introduce_domain(5)
            new_stream = await xsd.connect(5)
            async with open_xenstore_stream(new_stream) as new:
                with pytest.raises(XenStoreError) as err:
                    await new.read("/tool/data")
                assert err.value.name == "EACCES"
            assert xsd.server.store.owned.get(5, 0) == 0


@pytest.mark.parametrize("length", [4097, 1 << 31, 0xFFFFFFF0, 0xFFFFFFFF])
async def test_a_bad_length_closes_only_that_connection(length):
    """X11: a header length the daemon cannot accept closes that connection at once."""
    async with in_process_xenstored() as xsd:
        bad = await xsd.connect(5)
        dom0_stream = await xsd.connect(0)
        await bad.send_all(struct.pack("<IIII", Op.READ, 1, 0, length) + b"/x\0")
        with trio.fail_after(2):
            assert await bad.receive_some() == b""
        async with open_xenstore_stream(dom0_stream) as dom0:
            await dom0.write("/still", b"here")


async def test_no_message_on_the_wire_exceeds_the_payload_limit():
    """X4 (XSA-324): a watch whose events would exceed 4096 bytes."""
    async with in_process_xenstored() as xsd:
        stream = await xsd.connect(0)
        watched, token = "/" + "p" * 200, b"t" * 3800
        await stream.send_all(W.encode(Op.WATCH, 1, 0, W.join(watched, token)))
        await stream.send_all(W.encode(Op.WRITE, 2, 0, W.join(watched + "/" + "q" * 200) + b"1"))
        await stream.send_all(W.encode(Op.READ, 3, 0, W.join(watched + "/" + "q" * 200)))
        reader = W.MessageReader(max_payload=1 << 20)
        replies = {}
        with trio.fail_after(5):
            while 3 not in replies:
                for msg in reader.feed(await stream.receive_some()):
                    assert len(msg.payload) <= W.PAYLOAD_MAX, (msg.type, len(msg.payload))
                    replies[msg.req_id] = msg
        assert replies[3].payload == b"1"


async def test_reset_watches_inside_a_transaction():
    """X13 (XSA-484): RESET_WATCHES carrying a transaction id."""
    async with in_process_xenstored() as xsd:
        stream = await xsd.connect(0)
        async with open_xenstore_stream(stream) as dom0:
            async with dom0.watch("/w", "t"):
                tx = int((await dom0.request(Op.TRANSACTION_START, b"\0")).rstrip(b"\0"))
                for _ in range(3):
                    await dom0.request(Op.RESET_WATCHES, b"", tx)
                await dom0.request(Op.TRANSACTION_END, b"T\0", tx)
            await dom0.write("/w/x", b"1")
            assert await dom0.read("/w/x") == b"1"


async def test_a_misbehaving_connection_does_not_end_its_domain_early():
    """X5 (XSA-325): a protocol violation ends that connection, not the domain's record:
    @releaseDomain fires once, when the domain really goes."""
    async with in_process_xenstored() as xsd:
        dom0_stream = await xsd.connect(0)
        async with open_xenstore_stream(dom0_stream) as dom0:
            xsd.server.introduce_domain(5)
            async with dom0.watch("@releaseDomain", "r") as releases:
                await releases.receive()  # the initial event
                bad = await xsd.connect(5)
                await bad.send_all(struct.pack("<IIII", Op.READ, 1, 0, 5000) + b"x" * 16)
                with trio.fail_after(2):
                    assert await bad.receive_some() == b""
                assert await dom0.request(Op.IS_DOMAIN_INTRODUCED, b"5\0") == b"T\0"
                with trio.move_on_after(0.2):
                    raise AssertionError(f"released early: {await releases.receive()}")
                xsd.server.release_domain(5)
                assert (await releases.receive())[0] == "@releaseDomain"
                with trio.move_on_after(0.2):
                    raise AssertionError(f"released twice: {await releases.receive()}")


async def test_the_deepest_tree_is_built_walked_and_removed():
    """X9 (XSA-418): the deepest tree the path limit allows; walks are iterative."""
    async with in_process_xenstored() as xsd:
        stream = await xsd.connect(0)
        async with open_xenstore_stream(stream) as dom0:
            deepest = "/d" + "/x" * ((W.REL_PATH_MAX - 2) // 2)
            await dom0.write(deepest, b"bottom")
            assert await dom0.read(deepest) == b"bottom"
            async with dom0.watch("/d", "t") as events:
                await events.receive()
                await dom0.rm("/d")
                assert (await events.receive())[0] == "/d"
            with pytest.raises(XenStoreError):
                await dom0.read(deepest)
            assert not any(path.startswith("/d") for path in xsd.server.store.nodes)


async def test_a_rogue_writer_cannot_starve_dom0s_transactions():
    """X15: a guest writes without pause to a node dom0 reads in its transactions. Each
    transaction its writes make fail is charged to it (it waits, twice as long each time):
    dom0 commits within 10 retries and a second, every time."""
    async with in_process_xenstored() as xsd:
        async with open_xenstore_stream(await xsd.connect(0)) as dom0, \
                open_xenstore_stream(await xsd.connect(5)) as rogue:
            await dom0.mkdir("/local/domain/5")
            await dom0.set_perms("/local/domain/5", ["n5", "r0"])
            await rogue.write("/local/domain/5/hot", "0")

            async def write_forever() -> None:
                n = 0
                while True:
                    n += 1
                    await rogue.write_many([("/local/domain/5/hot", str(n + i)) for i in range(20)])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_forever)
                await trio.sleep(0.05)
                for round_ in range(10):
                    before, started = dom0.retries, trio.current_time()
                    async for tx in dom0.transaction():
                        async with tx:
                            hot = await tx.read("/local/domain/5/hot")
                            await trio.sleep(0.002)  # the rogue gets to write meanwhile
                            await tx.write("/tool/seen", hot)
                    assert dom0.retries - before <= 10
                    assert trio.current_time() - started <= 1.0
                nursery.cancel_scope.cancel()
            stats = xsd.server.statistics()
            assert stats.conflicts_charged >= 1 and stats.conflicts >= stats.conflicts_charged


async def test_a_client_that_never_reads_costs_bounded_memory_and_only_itself():
    """X6/X8 and a reader that never reads. A guest's own requests: at most 20 are answered
    and unsent at a time (the outstanding-request quota), then the daemon stops reading it
    until its socket takes their replies. Watch events others cause: capped at 1 MiB, then
    that connection is dropped. Everyone else is served throughout."""
    from ringfence.xenbus.server import MAX_QUEUED_OUTPUT
    async with in_process_xenstored() as xsd:
        async with open_xenstore_stream(await xsd.connect(0)) as dom0:
            await dom0.mkdir("/local/domain/5")
            await dom0.set_perms("/local/domain/5", ["n5"])
            await dom0.write("/local/domain/5/big", b"x" * 2000)
            await dom0.write_many([(f"/local/domain/5/dir/{'n' * 40}{i}", "") for i in range(80)])
            greedy = await xsd.connect(5)
            requests = b"".join(W.encode(Op.READ if i % 2 else Op.DIRECTORY, i, 0,
                                         W.join("/local/domain/5/big" if i % 2 else "/local/domain/5/dir"))
                                for i in range(20000))  # about 55 MB of replies
            with trio.move_on_after(1) as blocked:
                await greedy.send_all(requests)
            assert blocked.cancelled_caught  # the daemon stopped reading it
            assert xsd.server.statistics().dropped_slow_clients == 0
            assert all(len(c.out) <= 20 * 4112 for c in xsd.server.connections)
            assert await dom0.read("/local/domain/5/big") == b"x" * 2000  # dom0 is served
            # watch events caused by dom0's writes, never read
            watcher = await xsd.connect(5)
            await watcher.send_all(W.encode(Op.WATCH, 1, 0, W.join("/local/domain/5", "t")))
            await trio.sleep(0.05)
            long_name = "w" * 200
            for chunk in range(80):  # about 1.9 MB of events
                await dom0.write_many([(f"/local/domain/5/{long_name}{chunk}", str(i)) for i in range(100)])
                assert all(len(c.out) <= MAX_QUEUED_OUTPUT for c in xsd.server.connections)
            assert xsd.server.statistics().dropped_slow_clients == 1
            assert await dom0.read("/local/domain/5/big") == b"x" * 2000
