"""xenstored crash survival: kill -9 and restart with --state-dir brings back the tree,
permissions, introduced domains and domains' watches; open transactions end with EAGAIN."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.xenbus.client import open_xenstore, open_xenstore_stream
from ringfence.xenbus.persistence import Journal
from ringfence.xenbus.server import XenStoreServer


async def start(path, state):
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ringfence", "xenstored", "--socket", path, "--state-dir", state],
        stderr=subprocess.DEVNULL)
    with trio.fail_after(20):
        while True:
            try:
                async with open_xenstore(path) as xs:
                    await xs.directory("/")
                    break
            except OSError:
                await trio.sleep(0.02)
    return proc


async def test_kill_9_and_restart_keeps_everything_acknowledged(tmp_path):
    path, state = str(tmp_path / "xs.sock"), str(tmp_path / "state")
    proc = await start(path, state)
    async with open_xenstore(path) as xs:
        for i in range(200):
            await xs.write(f"/data/{i}", f"value-{i}")
        await xs.set_perms("/data/7", ["n3", "r4"])
        await xs.rm("/data/8")
        await xs.introduce(12)
        await xs.write("/data/nul", b"a\0b")
        tx = None
        async for attempt in xs.transaction():
            tx = attempt
            break  # leave it open across the crash
    # (the transaction above is abandoned with the connection; open a fresh one to hold)
    async with open_xenstore(path) as xs:
        tx_id = int((await xs.request(6, b"\0")).rstrip(b"\0"))
        await xs.write("/data/in-tx", b"x", tx_id)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    proc = await start(path, state)
    try:
        async with open_xenstore(path) as xs:
            assert len(await xs.directory("/data")) == 200  # 0..199 minus 8, plus nul
            assert await xs.read("/data/199") == b"value-199"
            assert await xs.read("/data/nul") == b"a\0b"
            assert await xs.get_perms("/data/7") == ["n3", "r4"]
            assert not await xs.exists("/data/8")
            assert not await xs.exists("/data/in-tx")  # never committed
            assert (await xs.request(17, b"12\0")) == b"T\0"  # still introduced
            # a transaction from before the crash ends with EAGAIN, so clients retry
            with pytest.raises(XenStoreError) as err:
                await xs.request(7, b"T\0", tx_id)
            assert err.value.name == "EAGAIN"
    finally:
        proc.terminate()
        await proc.wait()


async def test_domain_watches_come_back_after_restart(tmp_path):
    state = str(tmp_path / "state")
    os.makedirs(state)
    server = XenStoreServer()
    Journal.open(state, server)

    async def connect(srv, nursery, domid):
        ours, theirs = socket.socketpair()
        nursery.start_soon(srv.serve_domain_connection,
                           trio.SocketStream(trio.socket.from_stdlib_socket(ours)), domid)
        return trio.SocketStream(trio.socket.from_stdlib_socket(theirs))

    async with trio.open_nursery() as nursery:
        async with open_xenstore_stream(await connect(server, nursery, 4)) as guest:
            await guest.request(4, b"device\0tok\0")  # WATCH, kept open across the "crash"
            await trio.sleep(0.05)
            server.journal.close()  # the daemon dies: nothing more is written
            # a new daemon from the same state directory
            reborn = XenStoreServer()
            journal = Journal.open(state, reborn)
            assert journal.restore_ms < 1000
            async with open_xenstore_stream(await connect(reborn, nursery, 4)) as again:
                events = []
                got = trio.Event()

                async def collect():
                    reader_send, reader = trio.open_memory_channel(10)
                    again._watches[b"tok"] = reader_send
                    events.append(await reader.receive())
                    got.set()
                nursery.start_soon(collect)
                await trio.sleep(0.05)
                await reborn_write(reborn)
                with trio.fail_after(5):
                    await got.wait()
                assert events[0][1] == b"tok"
        nursery.cancel_scope.cancel()


async def reborn_write(server: XenStoreServer) -> None:
    from ringfence.xenbus.store import Caller
    server._changed(server.store.write(Caller(0), "/local/domain/4/device/x", b"1"))


async def test_clients_reconnect_and_their_watches_fire_again(tmp_path):
    path, state = str(tmp_path / "xs.sock"), str(tmp_path / "state")
    proc = await start(path, state)
    try:
        async with open_xenstore(path, reconnect=True) as xs:
            await xs.write("/svc/a", b"1")
            async with xs.watch("/svc", "tok") as events:
                assert await events.receive() == ("/svc", b"tok")
                proc.send_signal(signal.SIGKILL)   # the daemon crashes...
                await proc.wait()
                proc = await start(path, state)    # ...and is restarted from its journal
                with trio.fail_after(20):
                    assert (await events.receive())[1] == b"tok"  # the watch fires again
                    assert await xs.read("/svc/a") == b"1"     # requests work again
                    await xs.write("/svc/b", b"2")
                    assert (await events.receive())[0] == "/svc/b"
                # (a redial can reach the dying daemon's listener before the kernel closes it)
                assert xs.reconnects >= 1
    finally:
        proc.terminate()
        await proc.wait()
