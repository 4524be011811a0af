"""fio --verify through the NBD export while the storage driver domain is killed with -9:
the requests blkfront's C path had in flight are replayed on the new backend, fio sees a
pause and no error, and every block it wrote reads back as written."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import trio

from ringfence.testing.sim import relaunch_storage_domain
from ringfence.toolstack.devices import add_vbd
from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain, start_xenstored
from ringfence.xenbus.client import open_xenstore

pytestmark = pytest.mark.skipif(not shutil.which("fio"), reason="needs fio")
SIZE = 24 << 20
KILLS = 3


async def test_fio_verify_through_nbd_survives_storage_domain_kills(tmp_path):
    rng = random.Random(7)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SIZE))
    sock = str(tmp_path / "xvda.sock")
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        xs_path = str(tmp_path / "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        argv = [sys.executable, "-m", "ringfence", "blkback"]
        processes = []
        try:
            stor_domid, stor = await spawn_domain(dom0, "stor", argv, stderr=subprocess.DEVNULL)
            guest_domid, fd = await dom0.create_domain("guest")
            async with open_xenstore(xs_path) as xs:
                await add_vbd(xs, backend=stor_domid, frontend=guest_domid, devid=51712,
                              target=str(disk))
                guest = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "ringfence", "blkfront", "--nbd", sock], pass_fds=(fd,),
                    env=dict(os.environ, RINGFENCE_DOMAIN_FD=str(fd)), stderr=subprocess.DEVNULL)
                processes.append(guest)
                os.close(fd)
                with trio.fail_after(30):
                    while not os.path.exists(sock):
                        await trio.sleep(0.05)
                # Random 64 KiB writes, 8 in flight, at a rate that keeps them going for a
                # couple of seconds; then fio reads every block back and checks it.
                fio = await trio.lowlevel.open_process(
                    ["fio", "--name=verify", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                     "--rw=randwrite", "--bs=64k", "--iodepth=8", f"--size={SIZE}", "--rate=12m",
                     "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                processes.append(fio)
                for round_ in range(KILLS):
                    await trio.sleep(rng.uniform(0.2, 0.4))
                    assert fio.poll() is None, "fio finished before the kills"
                    stor_domid, stor = await relaunch_storage_domain(
                        dom0, xs, stor, domid=stor_domid, name=f"stor{round_}", argv=argv,
                        frontend=guest_domid, devid=51712, target=str(disk))
                output = b""
                with trio.fail_after(90):
                    async for chunk in fio.stdout:
                        output += chunk
                    assert await fio.wait() == 0, output.decode(errors="replace")[-2000:]
                assert b"err= 0" in output
        finally:
            for process in processes + [stor]:
                process.kill()
            xenstored.terminate()
            await xenstored.wait()
