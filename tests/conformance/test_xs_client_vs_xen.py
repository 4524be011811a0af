"""Our XenStore client against Debian's own C xenstored (peer-xenstored), and our daemon's
answers compared with Xen's for the same requests."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.xs_wire import Op, XenStoreError
from ringfence.testing.peers import open_peer_xenstored, peer_xenstored
from ringfence.xenbus.client import open_xenstore

pytestmark = pytest.mark.skipif(peer_xenstored() is None or not os.path.exists(
    "/usr/lib/xen-4.17/bin/xenstored"), reason="needs peer-xenstored and xen-utils-4.17")


async def exercise(xs) -> list:
    """The same script against any daemon; returns what it saw."""
    seen = []
    await xs.write("/t/a", b"1")
    await xs.write("/t/b/c", b"2")
    seen.append(sorted(await xs.directory("/t")))
    seen.append(await xs.read("/t/b/c"))
    await xs.set_perms("/t/a", ["n0", "r3"])
    seen.append(await xs.get_perms("/t/a"))
    for bad in ("/t/missing", "/t//x", "relative/../x"):
        try:
            await xs.read(bad)
        except XenStoreError as exc:
            seen.append(exc.name)
    # path limits at their edges, spelt absolute under a domain's home and elsewhere
    for path in ("/local/domain/5/" + "a" * 2048, "/local/domain/5/" + "a" * 2049,
                 "/t/" + "b" * 2045, "/t/" + "b" * 2046):
        try:
            await xs.write(path, b"1")
            seen.append("OK")
        except XenStoreError as exc:
            seen.append(exc.name)
    async with xs.watch("/t", "tok") as events:
        seen.append(await events.receive())
        await xs.write("/t/a", b"3")
        seen.append(await events.receive())
        await xs.write("/t/implied/parent/node", b"4")  # one event: parents it implied fire none
        seen.append(await events.receive())
        await xs.rm("/t/b")
        seen.append(await events.receive())
    # registered with a read: the read stands for the initial event, which is not delivered
    async with xs.watch_and("/t", [(Op.READ, W.join("/t/a"), 0)], "tok2") as (events, first):
        seen.append(first)
        await xs.write("/t/after", b"5")
        seen.append(await events.receive())  # the write's, not the registration's
    async for tx in xs.transaction():
        async with tx:
            await tx.write("/t/tx", b"in")
    seen.append(await xs.read("/t/tx"))
    async with trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(xs.write, f"/t/p/{i}", b"x")
    seen.append(len(await xs.directory("/t/p")))
    await xs.rm("/t")
    return seen


async def test_client_against_xen_and_ours_agree(tmp_path):
    ours_path = str(tmp_path / "ours.sock")
    ours = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ringfence", "xenstored", "--socket", ours_path],
        stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(20):
            while not os.path.exists(ours_path):
                await trio.sleep(0.02)
        async with open_peer_xenstored(str(tmp_path)) as peer_path:
            async with open_xenstore(peer_path) as xs:
                theirs = await exercise(xs)
            async with open_xenstore(ours_path) as xs:
                mine = await exercise(xs)
        assert mine == theirs
        assert theirs[0] == ["a", "b"] and theirs[-1] == 32
        assert [b"3"] in theirs and ("/t/after", b"tok2") in theirs  # watch_and's read and event
    finally:
        ours.terminate()
        await ours.wait()
