"""A guest's disk, through blkfront and a storage driver domain, used by qemu-img, nbdinfo
and nbdcopy over NBD, unchanged; checked byte for byte against the backing file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import trio

from ringfence.toolstack.devices import add_vbd
from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain, start_xenstored
from ringfence.xenbus.client import open_xenstore

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("nbdcopy")),
                                reason="needs qemu-utils and libnbd-bin")
SIZE = 16 << 20


async def test_qemu_img_nbdinfo_nbdcopy_through_the_driver_domain(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SIZE))
    sock = str(tmp_path / "xvda.sock")
    uri = f"nbd+unix:///?socket={sock}"
    async with open_hypervisor(tmp_path, quiet=True) as (hv_path, dom0):
        xs_path = str(tmp_path / "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        try:
            stor_domid, stor = await spawn_domain(
                dom0, "stor", [sys.executable, "-m", "ringfence", "blkback"], stderr=subprocess.DEVNULL)
            guest_domid, fd = await dom0.create_domain("guest")
            async with open_xenstore(xs_path) as xs:
                await add_vbd(xs, backend=stor_domid, frontend=guest_domid, devid=51712,
                              target=str(disk))
            env = dict(os.environ, RINGFENCE_DOMAIN_FD=str(fd))
            guest = await trio.lowlevel.open_process(
                [sys.executable, "-m", "ringfence", "blkfront", "--devid", "51712", "--nbd", sock],
                pass_fds=(fd,), env=env, stderr=subprocess.DEVNULL)
            os.close(fd)
            with trio.fail_after(30):
                while not os.path.exists(sock):
                    await trio.sleep(0.05)

            def clients() -> None:
                info = subprocess.run(["qemu-img", "info", "--output=json", uri], capture_output=True,
                                      text=True, check=True)
                assert f'"virtual-size": {SIZE}' in info.stdout
                nbdinfo = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, check=True)
                assert str(SIZE) in nbdinfo.stdout
                source = tmp_path / "random.img"
                source.write_bytes(os.urandom(SIZE))
                subprocess.run(["nbdcopy", str(source), uri], check=True)
                back = tmp_path / "back.img"
                subprocess.run(["nbdcopy", uri, str(back)], check=True)
                assert back.read_bytes() == source.read_bytes()
                subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri],
                               check=True, capture_output=True)
                other = tmp_path / "other.img"
                other.write_bytes(os.urandom(SIZE))
                subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(other), uri],
                               check=True)
                subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), uri],
                               check=True, capture_output=True)
                assert disk.read_bytes() == other.read_bytes()  # it reached the backing file
                # discard leaves zeroes
                subprocess.run(["nbdsh", "-u", uri, "-c", "h.trim(1048576, 0); h.flush()"],
                               check=True) if shutil.which("nbdsh") else None

            await trio.to_thread.run_sync(clients)
            guest.kill()
            stor.kill()
        finally:
            xenstored.terminate()
            await xenstored.wait()
