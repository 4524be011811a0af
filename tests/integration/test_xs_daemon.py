"""Our xenstored as Xen's own tools and our client see it: xenstore-utils and test-xenstore
unchanged via XENSTORED_PATH, the trio client, and domain connections with permissions."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import trio

from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.xenbus.client import open_xenstore, open_xenstore_stream
from ringfence.testing.xenstored import in_process_xenstored

TEST_XENSTORE = "/usr/lib/xen-4.17/bin/test-xenstore"
needs_utils = pytest.mark.skipif(shutil.which("xenstore-read") is None,
                                 reason="needs Debian xenstore-utils")


@pytest.fixture
async def daemon(tmp_path):
    path = str(tmp_path / "xs.sock")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ringfence", "xenstored", "--socket", path],
        stderr=subprocess.DEVNULL)
    with trio.fail_after(20):
        while not os.path.exists(path):
            await trio.sleep(0.02)
    yield path
    proc.terminate()
    await proc.wait()


def tool(path, *argv):
    return subprocess.run(argv, env=dict(os.environ, XENSTORED_PATH=path), capture_output=True,
                          text=True, timeout=60)


@needs_utils
async def test_xenstore_utils_work_unchanged(daemon):
    def run():
        assert tool(daemon, "xenstore-write", "/vm/a", "hello", "/vm/b", "world").returncode == 0
        assert tool(daemon, "xenstore-read", "/vm/a").stdout == "hello\n"
        assert tool(daemon, "xenstore-list", "/vm").stdout.split() == ["a", "b"]
        assert tool(daemon, "xenstore-chmod", "/vm/a", "n0", "r5").returncode == 0
        assert "(n0,r5)" in tool(daemon, "xenstore-ls", "-p", "/vm").stdout.replace(" ", "")
        assert tool(daemon, "xenstore-exists", "/vm/a").returncode == 0
        assert tool(daemon, "xenstore-rm", "/vm/a").returncode == 0
        assert tool(daemon, "xenstore-exists", "/vm/a").returncode != 0
        missing = tool(daemon, "xenstore-read", "/nope")
        assert missing.returncode != 0 and "couldn't read path" in missing.stderr
        watch = subprocess.Popen(["xenstore-watch", "-n", "2", "/vm"], stdout=subprocess.PIPE,
                                 text=True, env=dict(os.environ, XENSTORED_PATH=daemon))
        import time
        time.sleep(0.3)
        tool(daemon, "xenstore-write", "/vm/c", "x")
        out, _ = watch.communicate(timeout=20)
        assert out.split() == ["/vm", "/vm/c"]
    await trio.to_thread.run_sync(run)


@pytest.mark.skipif(not os.path.exists(TEST_XENSTORE), reason="needs xen-utils-4.17")
async def test_xen_test_xenstore_passes(daemon):
    def run():
        out = tool(daemon, TEST_XENSTORE)
        assert out.returncode == 0, out.stderr
        assert "failed" not in out.stdout, out.stdout
        assert "ta err" in out.stdout
        out = tool(daemon, TEST_XENSTORE, "-r", "3")
        assert out.returncode == 0 and "failed" not in out.stdout
    await trio.to_thread.run_sync(run)


async def test_a_sifted_watch_delivers_only_the_events_it_asked_for(daemon):
    async with open_xenstore(daemon) as xs:
        def shallow(path: str) -> bool:  # /d and its children, not their keys
            return path.count("/") <= 2
        async with xs.watch("/d", "tok", relevant=shallow) as events:
            assert await events.receive() == ("/d", b"tok")
            for path in ("/d/a/x", "/d/b", "/d/a/y", "/d/c"):
                await xs.write(path, b"1")
            assert await events.receive() == ("/d/b", b"tok")
            assert await events.receive() == ("/d/c", b"tok")
            with pytest.raises(trio.WouldBlock):  # /d/c came after /d/a/y: nothing left
                events.receive_nowait()
        assert xs.statistics().watch_events == 5  # every event came; two went no further


async def test_client_operations_transactions_and_watches(daemon):
    async with open_xenstore(daemon) as xs:
        await xs.write("/a/b/c", b"v\0with-nul")
        assert await xs.read("/a/b/c") == b"v\0with-nul"
        assert await xs.directory("/a") == ["b"]
        assert await xs.get_perms("/a/b/c") == ["n0"]
        await xs.set_perms("/a/b", ["b0", "r3"])
        assert await xs.get_perms("/a/b") == ["b0", "r3"]
        with pytest.raises(XenStoreError) as err:
            await xs.read("/a/missing")
        assert err.value.name == "ENOENT"
        # pipelining: many requests in flight at once
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(xs.write, f"/p/{i}", str(i))
        assert len(await xs.directory("/p")) == 64
        assert await xs.pipeline([]) == []  # nothing to send: no reply to wait for
        # watches: the initial event, then one per change below the path
        async with xs.watch("/w", "tok") as events:
            assert await events.receive() == ("/w", b"tok")
            await xs.write("/w/x", b"1")
            assert await events.receive() == ("/w/x", b"tok")
            await xs.rm("/w")
            assert await events.receive() == ("/w", b"tok")
        # transactions: a conflicting writer forces a retry, the retry commits
        async with open_xenstore(daemon) as other:
            attempts = 0
            async for tx in xs.transaction():
                async with tx:
                    attempts += 1
                    value = int(await tx.read("/counter")) if await tx.exists("/counter") else 0
                    if attempts == 1:
                        await other.write("/counter", b"10")
                    await tx.write("/counter", str(value + 1))
            assert attempts == 2 and await xs.read("/counter") == b"11"
            assert xs.statistics().transaction_retries == 1


async def test_domain_permissions_quotas_and_release():
    async with in_process_xenstored() as xsd:
        dom0_stream = await xsd.connect(0)
        async with open_xenstore_stream(dom0_stream) as dom0, \
                open_xenstore_stream(await xsd.connect(5)) as guest, \
                open_xenstore_stream(await xsd.connect(7)) as other:
            await dom0.write("/local/domain/5/name", b"guest")
            await dom0.set_perms("/local/domain/5", ["n5"])
            await dom0.set_perms("/local/domain/5/name", ["n5"])
            # relative paths are under the domain's own directory
            assert await guest.read("name") == b"guest"
            await guest.write("device/vbd/1/state", b"1")
            assert await guest.get_perms("device/vbd/1/state") == ["n5"]  # creator owns
            with pytest.raises(XenStoreError) as err:
                await other.read("/local/domain/5/name")
            assert err.value.name == "EACCES"
            with pytest.raises(XenStoreError) as err:
                await guest.write("/tool/x", b"1")
            assert err.value.name == "EACCES"
            for op in (guest.introduce(9), guest.release(5)):
                with pytest.raises(XenStoreError) as err:
                    await op
                assert err.value.name == "EACCES"
            # node-size quota
            with pytest.raises(XenStoreError) as err:
                await guest.write("big", b"x" * 3000)
            assert err.value.name == "E2BIG"
            # node-count quota (1000 per domain)
            xsd.server.store.quotas = type(xsd.server.store.quotas)(nodes=20)
            with pytest.raises(XenStoreError) as err:
                for i in range(30):
                    await guest.write(f"many/{i}", b"1")
            assert err.value.name == "ENOSPC"
            # @releaseDomain fires when the domain goes, and its connection is closed
            async with dom0.watch("@releaseDomain") as events:
                assert (await events.receive())[0] == "@releaseDomain"
                xsd.server.introduce_domain(5)
                xsd.server.release_domain(5)
                assert (await events.receive())[0] == "@releaseDomain"
            with pytest.raises(XenStoreError):
                await guest.read("name")


async def test_hostile_client_oversized_message_is_dropped(daemon):
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(daemon)
        raw.sendall(b"\x02\0\0\0" + b"\1\0\0\0" + b"\0" * 4 + (100000).to_bytes(4, "little"))
        raw.settimeout(5)
        assert raw.recv(100) == b""  # closed
    async with open_xenstore(daemon) as xs:  # the daemon carries on
        await xs.write("/still", b"here")


async def test_injected_eagain_and_lost_watch_events_take_only_the_domain_named(tmp_path):
    """XS_CONTROL inject (the fault harness's `ringfence inject eagain|lose-watch`): a
    domain's next commits fail with EAGAIN and its client retries them; its next watch
    events are lost and counted; dom0 and other domains are untouched, and only dom0 may
    ask."""
    from ringfence.hypervisor.io import xs_wire as W
    path = str(tmp_path / "xs.sock")
    async with in_process_xenstored(path) as xsd:
        async with open_xenstore(path) as dom0:
            for domid in (5, 6):
                await dom0.introduce(domid)
                await dom0.write(f"/local/domain/{domid}/data", b"0")
                await dom0.request(W.Op.SET_PERMS, W.join(f"/local/domain/{domid}/data", f"n{domid}"))
            assert await dom0.request(W.Op.CONTROL, W.join("inject", "eagain", "5", "2")) == b"OK\0"
            assert await dom0.request(W.Op.CONTROL, W.join("inject", "lose-watch", "5", "1")) == b"OK\0"
            for bad in (("eagain", "0", "1"), ("eagain", "5"), ("melt", "5", "1"), ("eagain", "5", "-1")):
                with pytest.raises(XenStoreError, match="EINVAL"):
                    await dom0.request(W.Op.CONTROL, W.join("inject", *bad))
            assert b"eagain 5 2" in await dom0.request(W.Op.CONTROL, W.join("inject"))
            async with open_xenstore_stream(await xsd.connect(5)) as five, \
                    open_xenstore_stream(await xsd.connect(6)) as six:
                with pytest.raises(XenStoreError, match="EACCES"):
                    await five.request(W.Op.CONTROL, W.join("inject", "eagain", "6", "1"))
                for xs, domid in ((five, 5), (six, 6)):
                    async for tx in xs.transaction():
                        async with tx:
                            await tx.write(f"/local/domain/{domid}/data", b"1")
                assert (five.retries, six.retries) == (2, 0)
                async with five.watch("/local/domain/5/data") as events:  # its first event is lost
                    await dom0.write("/local/domain/5/data", b"2")
                    with trio.fail_after(5):
                        assert (await events.receive())[0] == "/local/domain/5/data"
                    with trio.move_on_after(0.2):
                        await events.receive()
                        raise AssertionError("one write, one event")
            assert xsd.server.statistics().injected_faults == {"eagain": 2, "lose-watch": 1}
            assert await dom0.request(W.Op.CONTROL, W.join("inject")) == b"\0"
