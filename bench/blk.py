"""``ringfence bench blk``: a guest disk through ringfence against qemu-nbd, same file.

The same RAM-backed raw file is served by qemu-nbd (peer) and by ringfence (NBD client →
blkfront → ring → blkback in a storage driver domain → file); fio's nbd engine drives both:
4 KiB random reads at queue depth 32, 1 MiB sequential reads, one 4 KiB read at a time.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable

import trio

from ringfence.bench.report import Metric

SIZE = 256 << 20


def _fio(uri: str, rw: str, bs: str, depth: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={depth}", f"--runtime={seconds}", "--time_based", "--output-format=json",
         f"--size={SIZE}"], capture_output=True, text=True, check=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    return {"iops": job["iops"], "bw": job["bw_bytes"], "lat_us": job["lat_ns"]["mean"] / 1000}


def _measure(uri: str, quick: bool) -> dict[str, float]:
    seconds = 3 if quick else 15
    return {"randread": _fio(uri, "randread", "4k", 32, seconds)["iops"],
            "seqread": _fio(uri, "read", "1m", 4, seconds)["bw"],
            "qd1": _fio(uri, "randread", "4k", 1, seconds)["lat_us"]}


@contextlib.asynccontextmanager
async def _qemu_nbd(disk: str, sock: str) -> AsyncIterator[str]:
    process = await trio.lowlevel.open_process(
        ["qemu-nbd", "--format=raw", f"--socket={sock}", "--persistent", "--shared=16", disk],
        stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(20):
            while not os.path.exists(sock):
                await trio.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def _ringfence(directory: str, disk: str, sock: str, persistent: bool = True) -> AsyncIterator[str]:
    from ringfence.toolstack.devices import add_vbd
    from ringfence.toolstack.hypervisor import open_hypervisor, spawn_domain, start_xenstored
    from ringfence.xenbus.client import open_xenstore
    async with open_hypervisor(directory, quiet=True) as (hv_path, dom0):
        xs_path = os.path.join(directory, "xs.sock")
        xenstored = await start_xenstored(xs_path, hypervisor=hv_path)
        processes = [xenstored]
        try:
            await trio.sleep(0.2)  # registered with the hypervisor
            stor_domid, stor = await spawn_domain(
                dom0, "stor", [sys.executable, "-m", "ringfence", "blkback"], stderr=subprocess.DEVNULL)
            processes.append(stor)
            guest_domid, fd = await dom0.create_domain("guest")
            async with open_xenstore(xs_path) as xs:
                await add_vbd(xs, backend=stor_domid, frontend=guest_domid, devid=51712, target=disk)
            env = dict(os.environ, RINGFENCE_DOMAIN_FD=str(fd))
            if not persistent:
                env["RINGFENCE_BLKFRONT_PERSISTENT"] = "0"
            guest = await trio.lowlevel.open_process(
                [sys.executable, "-m", "ringfence", "blkfront", "--nbd", sock], pass_fds=(fd,),
                env=env, stderr=subprocess.DEVNULL)
            os.close(fd)
            processes.append(guest)
            with trio.fail_after(30):
                while not os.path.exists(sock):
                    await trio.sleep(0.05)
            yield f"nbd+unix:///?socket={sock}"
        finally:
            for process in processes:
                process.kill()
                await process.wait()


async def _run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    if not (shutil.which("fio") and shutil.which("qemu-nbd")):
        raise RuntimeError("bench blk needs fio and qemu-nbd (apt-get install fio qemu-utils)")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=shm) as ram:
        disk = os.path.join(ram, "disk.img")
        with open(disk, "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        progress("qemu-nbd serving the RAM-backed file")
        async with _qemu_nbd(disk, os.path.join(tmp, "qemu.sock")) as uri:
            peer = await trio.to_thread.run_sync(_measure, uri, quick)
        progress("ringfence: blkfront -> ring -> blkback in a storage driver domain")
        async with _ringfence(tmp, disk, os.path.join(tmp, "rf.sock")) as uri:
            ours = await trio.to_thread.run_sync(_measure, uri, quick)
        progress("ringfence without persistent grants (a map per request)")
        async with _ringfence(tmp, disk, os.path.join(tmp, "rf-np.sock"), persistent=False) as uri:
            mapped = await trio.to_thread.run_sync(
                lambda: _fio(uri, "randread", "4k", 32, 3 if quick else 15)["iops"])
    return [
        Metric("randread_4k_qd32_iops", ours["randread"], peer["randread"], "iops", ">=1.0"),
        Metric("seqread_1m_throughput", ours["seqread"], peer["seqread"], "bytes/s", ">=1.0"),
        Metric("qd1_latency", ours["qd1"], peer["qd1"], "us", "<=1.5"),
        Metric("persistent_vs_map_iops", ours["randread"], mapped, "iops", ">=3"),
    ]


def run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    return trio.run(_run, quick, progress)
