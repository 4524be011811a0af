"""The storage driver domain is killed with -9 in the middle of a write workload and a new
one is started: the guest sees a pause, no error, and every acknowledged write is on disk."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import trio

from ringfence.testing.sim import relaunch_storage_domain
from ringfence.testing.streams import LineReader
from ringfence.toolstack.devices import add_vbd
from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain, start_xenstored
from ringfence.xenbus.client import open_xenstore

BLOCK = 65536
BLOCKS = 48

GUEST = textwrap.dedent(f"""
    import hashlib, json, sys, trio, logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    from ringfence.frontends.blkfront.device import BlkFront
    from dataclasses import asdict

    def block(i):
        seed = hashlib.sha256(str(i).encode()).digest()
        return (seed * ({BLOCK} // 32))

    async def main():
        async with open_domain() as dom, open_domain_xenstore(dom) as xs:
            front = BlkFront(dom, xs, 51712)
            async with trio.open_nursery() as nursery:
                await nursery.start(front.run)
                acked = 0
                stop = trio.Event()

                async def stopper():
                    await trio.to_thread.run_sync(sys.stdin.readline)
                    stop.set()
                nursery.start_soon(stopper)

                async def writer(lane):
                    nonlocal acked
                    i = lane
                    while not stop.is_set():
                        await front.write((i % {BLOCKS}) * {BLOCK}, block(i))
                        acked = max(acked, i)
                        print(json.dumps({{"acked": i}}), flush=True)
                        i += 8
                async with trio.open_nursery() as writers:
                    for lane in range(8):
                        writers.start_soon(writer, lane)
                await front.flush()
                print(json.dumps({{"done": True, "stats": asdict(front.statistics())}}), flush=True)
                nursery.cancel_scope.cancel()

    trio.run(main)
""")


def block(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (BLOCK // 32)


@pytest.mark.parametrize("kills", [3, 100], ids=["3-kills", "crash-battery-100"])
async def test_kill_storage_domain_mid_write_loses_nothing_acknowledged(tmp_path, kills):
    """With 100 kills at random moments this is issue 7's crash battery for storage."""
    rng = random.Random(kills)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(BLOCK * BLOCKS))
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        xs_path = str(tmp_path / "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        try:
            argv = [sys.executable, "-m", "ringfence", "blkback"]
            stor_domid, stor = await spawn_domain(dom0, "stor", argv, stderr=subprocess.DEVNULL)
            guest_domid, fd = await dom0.create_domain("guest")
            async with open_xenstore(xs_path) as xs:
                await add_vbd(xs, backend=stor_domid, frontend=guest_domid, devid=51712,
                              target=str(disk))
                env = dict(os.environ, RINGFENCE_DOMAIN_FD=str(fd))
                guest = await trio.lowlevel.open_process(
                    [sys.executable, "-c", GUEST], pass_fds=(fd,), env=env,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=open(tmp_path / "guest.log", "wb"))
                os.close(fd)
                lines = LineReader(guest.stdout, "guest exited")
                acked: set[int] = set()

                async def progress(count: int) -> None:
                    # New writes, not lines already buffered: indices beyond what was seen.
                    target = max(acked, default=0) + count
                    while max(acked, default=0) < target:
                        acked.add(json.loads(await lines.next())["acked"])

                with trio.fail_after(60):
                    await progress(100)
                for round_ in range(kills):
                    await trio.sleep(rng.uniform(0, 0.05))  # a random moment
                    stor_domid, stor = await relaunch_storage_domain(
                        dom0, xs, stor, domid=stor_domid, name=f"stor{round_}", argv=argv,
                        frontend=guest_domid, devid=51712, target=str(disk))
                    with trio.fail_after(60):
                        await progress(64 if kills < 10 else 16)  # the guest carries on
                await guest.stdin.send_all(b"stop\n")
                with trio.fail_after(60):
                    while True:
                        record = json.loads(await lines.next())
                        if record.get("done"):
                            break
                        acked.add(record["acked"])
                assert await guest.wait() == 0
            stats = record["stats"]
            assert stats["errors"] == 0 and 1 < stats["connections"] <= kills + 1
            data = disk.read_bytes()
            # every block holds its last acknowledged write, or a later one that was issued
            top = max(acked) + 8 * BLOCKS
            for b in range(BLOCKS):
                content = data[b * BLOCK:(b + 1) * BLOCK]
                last_acked = max(i for i in acked if i % BLOCKS == b)
                matches = [i for i in range(b, top, BLOCKS) if block(i) == content]
                assert matches and matches[0] >= last_acked, f"block {b}: stale or corrupt"
            stor.kill()
        finally:
            xenstored.terminate()
            await xenstored.wait()
