"""The xen platform's code, run without Xen: blkback and netback with ``--platform xen`` call
libxengnttab and libxenevtchn (here a stand-in forwarding to the sim hypervisor, see
ringfence.testing.xen_standin) and reach XenStore through a xenbus device; sim guests use
them. A blk and a net device come up, carry data and go down."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV
from ringfence.isolation.sandbox import SandboxSpec, innermost_pid, spawn_sandboxed
from ringfence.testing.sim import program_output, start_domain_program
from ringfence.testing.streams import LineReader
from ringfence.testing.xen_standin import build_standin, spawn_xen_domain
from ringfence.toolstack.devices import add_vbd, add_vif
from ringfence.toolstack.hypervisor import open_hypervisor, start_xenstored
from ringfence.xenbus.client import open_xenstore

pytest.importorskip("ringfence.hypervisor._xenffi", reason="built without libxen-dev")

@dataclass
class XenHost:
    dom0: Any
    xs: Any
    spawn: Callable[..., Awaitable[tuple[int, trio.Process]]]


@contextlib.asynccontextmanager
async def xen_host(tmp_path) -> AsyncIterator[XenHost]:
    """A sim hypervisor and xenstored; ``spawn(name, argv, **kwargs)`` starts a driver on the
    stand-in xen platform. Every process is stopped at the end, whatever happened."""
    # The stand-in and the xenbus sockets must be reachable from sandboxes (their /tmp is
    # their own).
    runtime = pathlib.Path(tempfile.mkdtemp(prefix="rf-xen-", dir="/run" if os.geteuid() == 0 else None))
    libdir = build_standin(runtime / "standin")
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        xs_path = str(tmp_path / "xs.sock")
        processes = [await start_xenstored(xs_path, hypervisor=hv_path)]
        try:
            async with open_xenstore(xs_path) as xs, trio.open_nursery() as nursery:
                async def spawn(name: str, argv: list[str], **kwargs: Any) -> tuple[int, trio.Process]:
                    domid, process = await spawn_xen_domain(nursery, dom0, xs, name, argv, libdir=libdir,
                                                            directory=runtime, **kwargs)
                    processes.append(process)
                    return domid, process

                yield XenHost(dom0, xs, spawn)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                for process in reversed(processes):
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
            shutil.rmtree(runtime, ignore_errors=True)


async def _until_mappings_released(dom0, domid: int) -> None:
    stats: dict[str, Any] = {}
    with trio.move_on_after(20):
        while True:
            stats = next(d for d in (await dom0.statistics())["domains"] if d["domid"] == domid)
            if stats["mappings_held"] == 0 and stats["ports"] == 0:
                return
            await trio.sleep(0.1)
    raise AssertionError(f"dom{domid} still holds mappings or ports: {stats}")


GUEST = textwrap.dedent("""
    import json, sys, trio
    from dataclasses import asdict
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    from ringfence.frontends.blkfront.device import BlkFront

    async def main():
        async with open_domain() as dom, open_domain_xenstore(dom) as xs:
            front = BlkFront(dom, xs, 51712, persistent=sys.argv[1] == "1")
            async with trio.open_nursery() as nursery:
                await nursery.start(front.run)
                await front.write(8192, b"x" * 4096 + b"y" * 8192)
                await front.write(1 << 20, bytes(range(256)) * 512)
                await front.flush()
                assert await front.read(8192, 12288) == b"x" * 4096 + b"y" * 8192
                first = await front.read(0, 4096)
                await front.discard(2 << 20, 65536)
                print(json.dumps({"size": front.size, "first": first.hex(),
                                  "stats": asdict(front.statistics())}), flush=True)
                nursery.cancel_scope.cancel()

    trio.run(main)
""")


async def _until_loaded(process: trio.Process) -> None:
    """Until the driver has loaded the xen platform's libraries."""
    with trio.fail_after(30):
        while process.poll() is None:
            if any("libxen" in line for line in open(f"/proc/{process.pid}/maps")):
                return
            await trio.sleep(0.05)
    raise AssertionError(f"driver exited with {process.returncode}: {await process.stderr.receive_some()!r}")


def _assert_uses_the_standin(pid: int) -> None:
    libraries = {line.split()[-1] for line in open(f"/proc/{pid}/maps") if "libxen" in line}
    assert any(lib.endswith("libxen-standin.so") for lib in libraries), libraries
    assert not any("libxengnttab.so" in lib or "libxenevtchn.so" in lib for lib in libraries), libraries


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "map-per-request"])
async def test_blkback_on_the_xen_platform_serves_a_sim_guest(tmp_path, persistent):
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    original = disk.read_bytes()
    async with xen_host(tmp_path) as host:
        stor_domid, stor = await host.spawn(
            "stor", [sys.executable, "-m", "ringfence", "blkback", "--platform", "xen"],
            stderr=subprocess.DEVNULL)
        await _until_loaded(stor)
        _assert_uses_the_standin(stor.pid)
        guest_domid, fd = await host.dom0.create_domain("guest")
        await add_vbd(host.xs, backend=stor_domid, frontend=guest_domid, devid=51712, target=str(disk))
        guest = await start_domain_program(GUEST, fd, "1" if persistent else "0")
        with trio.fail_after(60):
            out = await program_output(guest, timeout=60)
            assert await guest.wait() == 0, out
        result = json.loads(out)
        assert result["size"] == 4 << 20
        assert bytes.fromhex(result["first"]) == original[:4096]
        assert result["stats"]["errors"] == 0 and result["stats"]["in_flight"] == 0
        data = disk.read_bytes()
        assert data[8192:8192 + 12288] == b"x" * 4096 + b"y" * 8192
        assert data[1 << 20:(1 << 20) + 131072] == bytes(range(256)) * 512
        assert data[2 << 20:(2 << 20) + 65536] == bytes(65536)
        assert data[(4 << 20) - 4096:] == original[(4 << 20) - 4096:]
        # Down: the guest is gone and the toolstack removes its vbd (as xl destroy does),
        # so blkback lets go of every page and port it had from that guest.
        await host.xs.rm(f"/local/domain/{guest_domid}/device/vbd/51712")
        await host.xs.rm(f"/local/domain/{stor_domid}/backend/vbd/{guest_domid}/51712")
        await _until_mappings_released(host.dom0, stor_domid)
        assert stor.poll() is None


def _in_netns(pid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TAP")
async def test_netback_on_the_xen_platform_carries_two_sim_guests_pings(tmp_path):
    boxes = []
    async with xen_host(tmp_path) as host:
        try:
            net_domid, net = await host.spawn(
                "net", [sys.executable, "-m", "ringfence", "netback", "--platform", "xen"],
                sandbox=SandboxSpec("xnet", uid=0), stderr=subprocess.DEVNULL)
            pids = {}
            for n in (1, 2):
                domid, fd = await host.dom0.create_domain(f"g{n}")
                await add_vif(host.xs, backend=net_domid, frontend=domid, devid=0, mac=f"02:00:00:00:01:0{n}")
                out = open(tmp_path / f"g{n}.out", "wb")
                box = await spawn_sandboxed(
                    SandboxSpec(f"xg{n}", uid=0),
                    [sys.executable, "-m", "ringfence", "netfront", "--ip", f"10.78.0.{n}/24"],
                    pass_fds=(fd,), env=dict(os.environ, **{DOMAIN_FD_ENV: str(fd)}),
                    stdout=out, stderr=subprocess.DEVNULL)
                os.close(fd)
                boxes.append(box)
                with trio.fail_after(30):
                    while b"netfront ready" not in (tmp_path / f"g{n}.out").read_bytes():
                        assert box.process.poll() is None, f"g{n} exited"
                        await trio.sleep(0.05)
                pids[n] = innermost_pid(box.pid)
            _assert_uses_the_standin(innermost_pid(net.pid))

            def pings() -> None:
                one = _in_netns(pids[1], "ping", "-c", "3", "-W", "5", "10.78.0.2")
                assert one.returncode == 0, one.stdout + one.stderr
                two = _in_netns(pids[2], "ping", "-c", "3", "-s", "1400", "-W", "5", "10.78.0.1")
                assert two.returncode == 0, two.stdout + two.stderr

            await trio.to_thread.run_sync(pings)
            # Down: the toolstack removes the vifs; netback lets go of rings and channels.
            for n, box in enumerate(boxes, 1):
                await box.aclose()
            for domid in [int(d) for d in await host.xs.directory(f"/local/domain/{net_domid}/backend/vif")]:
                await host.xs.rm(f"/local/domain/{domid}/device/vif/0")
                await host.xs.rm(f"/local/domain/{net_domid}/backend/vif/{domid}")
            await _until_mappings_released(host.dom0, net_domid)
        finally:
            for box in boxes:
                await box.aclose()


SHARER = textwrap.dedent("""
    import json, sys, trio
    from ringfence.hypervisor.platform import GrantCopy
    from ringfence.hypervisor.xen import XenEventChannel, XenGrantTable

    async def main():
        peer = int(sys.argv[1])
        grants, events = XenGrantTable(), XenEventChannel()
        shared = grants.share_pages(peer, 2)
        shared.buffer[:5], shared.buffer[4096:4101] = b"hello", b"world"
        port = await events.alloc_unbound(peer)
        print(json.dumps({"refs": shared.grefs, "port": port.port}), flush=True)
        gref = int(sys.stdin.readline())
        with trio.fail_after(10):
            await port.wait()
        reply = bytes(shared.buffer[100:105])
        copied = bytearray(16)
        statuses = await grants.copy([GrantCopy(16, source_gref=(peer, gref, 0), dest_local=copied),
                                      GrantCopy(16, source_gref=(peer, 4095, 0), dest_local=bytearray(16))])
        mapped = await grants.map(peer, [gref], readonly=True)
        first = bytes(mapped.buffer[:16])
        await grants.unmap(mapped)
        port.notify()
        grants.unshare(shared)
        await port.close()
        print(json.dumps({"reply": reply.hex(), "copied": copied.hex(), "statuses": statuses,
                          "mapped": first.hex(), "stats": grants.statistics().__repr__()}), flush=True)
        grants.close()

    trio.run(main)
""")


async def test_grant_sharing_and_event_channels_between_xen_and_sim_domains(tmp_path):
    """gntshr pages and an unbound port on the xen side; the sim side maps, writes, binds and
    notifies; the xen side copies and maps the sim side's grant, then lets everything go."""
    from ringfence.testing.sim import open_agent
    async with xen_host(tmp_path) as host, open_agent(host.dom0, "peer") as agent:
        if True:
            xen_domid, sharer = await host.spawn(
                "sharer", [sys.executable, "-c", SHARER, str(agent.domid)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            lines = LineReader(sharer.stdout)
            offer = json.loads(await lines.next())
            mapping = (await agent.ok("map", domid=xen_domid, grefs=offer["refs"]))["map"]
            page = await agent.ok("read", map=mapping, length=5)
            assert bytes.fromhex(page["data"]) == b"hello"
            second = await agent.ok("read", map=mapping, offset=4096, length=5)
            assert bytes.fromhex(second["data"]) == b"world"
            await agent.ok("write", map=mapping, offset=100, data=b"reply".hex())
            allocated = await agent.ok("alloc", count=1)
            await agent.ok("write", range=allocated["range"], data=(b"0123456789abcdef" * 2).hex())
            frame = allocated["frames"][0]
            gref = (await agent.ok("grant", to=xen_domid, frame=frame))["gref"]
            local = (await agent.ok("evt_bind", domid=xen_domid, port=offer["port"]))["port"]
            await sharer.stdin.send_all(f"{gref}\n".encode())
            await agent.ok("notify", port=local)
            assert (await agent.ok("wait", port=local))["count"] >= 1
            result = json.loads(await lines.next())
            assert bytes.fromhex(result["reply"]) == b"reply"
            assert bytes.fromhex(result["copied"]) == b"0123456789abcdef"
            assert result["statuses"][0] == 0 and result["statuses"][1] != 0  # a bad gref fails alone
            assert bytes.fromhex(result["mapped"]) == b"0123456789abcdef"
            await agent.ok("unmap", map=mapping)
            with trio.fail_after(10):
                assert await sharer.wait() == 0


class StateRecorder:
    """A backend's XenbusState changes, as a watch on its ``state`` node sees them."""

    def __init__(self, xs, path: str) -> None:
        self.xs, self.path = xs, path
        self.states: list[int] = []
        self._changed = trio.Event()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.xs.watch(self.path) as events:
            task_status.started()
            async for _ in events:
                raw = await self.xs.read(self.path) if await self.xs.exists(self.path) else b""
                if raw and (not self.states or self.states[-1] != int(raw)):
                    self.states.append(int(raw))
                    self._changed.set()
                    self._changed = trio.Event()

    async def until(self, state: int) -> None:
        with trio.fail_after(20):
            while not self.states or self.states[-1] != state:
                await self._changed.wait()

    def seen(self) -> list[int]:
        """The states, without the toolstack's Initialising that InitWait may or may not
        have replaced before the watch read it."""
        return self.states[self.states[:1] == [1]:]


async def test_blkback_on_the_xen_platform_follows_linux_blkfronts_handshake(tmp_path):
    """The XenBus conversation of Linux's xen-blkfront (talk_to_blkback, blkfront_connect,
    blkfront_closing), played key by key from a sim domain against blkback on the xen
    platform; the backend's states are recorded from a watch (docs/interop.md)."""
    from ringfence.testing.sim import open_agent
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    async with xen_host(tmp_path) as host, open_agent(host.dom0, "linux") as guest, \
            trio.open_nursery() as nursery:
        xs = host.xs
        stor_domid, _ = await host.spawn(
            "stor", [sys.executable, "-m", "ringfence", "blkback", "--platform", "xen"],
            stderr=subprocess.DEVNULL)
        await add_vbd(xs, backend=stor_domid, frontend=guest.domid, devid=51712, target=str(disk))
        be = f"/local/domain/{stor_domid}/backend/vbd/{guest.domid}/51712"
        fe = f"/local/domain/{guest.domid}/device/vbd/51712"
        recorder = StateRecorder(xs, f"{be}/state")
        await nursery.start(recorder.run)
        await recorder.until(2)  # InitWait: features published before the frontend reads them
        assert await xs.read(f"{be}/feature-persistent") == b"1"
        ring = await guest.ok("alloc", count=1)
        gref = (await guest.ok("grant", to=stor_domid, frame=ring["frames"][0]))["gref"]
        port = (await guest.ok("evt_alloc", remote=stor_domid))["port"]
        async for tx in xs.transaction():  # as talk_to_blkback: one transaction
            async with tx:
                await tx.write_many([(f"{fe}/ring-ref", str(gref)), (f"{fe}/event-channel", str(port)),
                                     (f"{fe}/protocol", "x86_64-abi"), (f"{fe}/feature-persistent", "1")])
        await xs.write(f"{fe}/state", "3")  # Initialised
        await recorder.until(4)  # Connected
        assert int(await xs.read(f"{be}/sectors")) == (1 << 20) // 512  # blkfront_connect reads
        assert await xs.read(f"{be}/sector-size") == b"512"
        await xs.write(f"{fe}/state", "4")
        await xs.write(f"{fe}/state", "5")  # Closing (blkfront_remove)
        await recorder.until(6)  # the backend unmaps, then Closing -> Closed
        await xs.write(f"{fe}/state", "6")
        await xs.write(f"{fe}/state", "1")  # a new frontend driver: Initialising again
        await recorder.until(2)
        # (Closing may be overwritten by Closed before the watch reads it)
        assert recorder.seen() in ([2, 4, 5, 6, 2], [2, 4, 6, 2]), recorder.states
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TAP")
async def test_netback_on_the_xen_platform_follows_linux_netfronts_handshake(tmp_path):
    """xen-netfront's XenBus conversation (talk_to_netback: the keys, then straight to
    Connected without Initialised; xennet_remove: Closing, then Closed) against netback on
    the xen platform."""
    from ringfence.testing.sim import open_agent
    async with xen_host(tmp_path) as host, open_agent(host.dom0, "linux") as guest, \
            trio.open_nursery() as nursery:
        xs = host.xs
        net_domid, _ = await host.spawn(
            "net", [sys.executable, "-m", "ringfence", "netback", "--platform", "xen"],
            sandbox=SandboxSpec("xnet2", uid=0))
        await add_vif(xs, backend=net_domid, frontend=guest.domid, devid=0, mac="02:00:00:00:02:01")
        be = f"/local/domain/{net_domid}/backend/vif/{guest.domid}/0"
        fe = f"/local/domain/{guest.domid}/device/vif/0"
        recorder = StateRecorder(xs, f"{be}/state")
        await nursery.start(recorder.run)
        await recorder.until(2)
        assert await xs.read(f"{be}/feature-rx-copy") == b"1"
        rings = await guest.ok("alloc", count=2)
        tx, rx = [(await guest.ok("grant", to=net_domid, frame=f))["gref"] for f in rings["frames"]]
        port = (await guest.ok("evt_alloc", remote=net_domid))["port"]
        async for t in xs.transaction():
            async with t:
                await t.write_many([
                    (f"{fe}/tx-ring-ref", str(tx)), (f"{fe}/rx-ring-ref", str(rx)),
                    (f"{fe}/event-channel", str(port)), (f"{fe}/request-rx-copy", "1"),
                    (f"{fe}/feature-rx-notify", "1"), (f"{fe}/feature-sg", "1"),
                    (f"{fe}/feature-gso-tcpv4", "1"), (f"{fe}/feature-gso-tcpv6", "1"),
                    (f"{fe}/feature-ipv6-csum-offload", "1")])
        await xs.write(f"{fe}/state", "4")  # netfront skips Initialised
        await recorder.until(4)
        await xs.write(f"{fe}/state", "5")  # xennet_remove
        await recorder.until(6)
        await xs.write(f"{fe}/state", "6")
        await xs.write(f"{fe}/state", "1")  # the driver loaded again
        await recorder.until(2)
        assert recorder.seen() in ([2, 4, 5, 6, 2], [2, 4, 6, 2]), recorder.states
        nursery.cancel_scope.cancel()
