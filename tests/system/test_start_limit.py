"""When the supervisor gives up on a driver domain (start limit), its devices are marked
failed in XenStore and the guest's I/O fails with EIO instead of hanging."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import trio

from ringfence.isolation.supervisor import RestartPolicy
from ringfence.toolstack.config import load
from ringfence.toolstack.system import open_system

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

CONFIG = """
[[domain]]
name = "stor"
kind = "driver"

[[domain]]
name = "guest1"
kind = "guest"
disks = ["target={dir}/g.img,vdev=xvda,backend=stor"]
"""


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm-spare"])
async def test_devices_of_a_failed_driver_domain_fail_their_io(warm):
    """With a warm spare, the death that hits the limit has already switched the guest to
    the spare standing by (the hypervisor's notice): the spare goes too, and the I/O fails."""
    runtime = f"/run/ringfence-limit-{os.getpid()}"
    os.makedirs(runtime, exist_ok=True)
    try:
        with open(f"{runtime}/g.img", "wb") as f:
            f.truncate(8 << 20)
        with open(f"{runtime}/host.toml", "w") as f:
            f.write(CONFIG.format(dir=runtime))
        policy = RestartPolicy(initial_delay=0.0, burst=2, interval=60.0)
        async with open_system(load(f"{runtime}/host.toml", runtime), runtime,
                               driver_policy=policy, warm_spares=warm) as system:
            uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
            service = system.drivers["stor"]
            service.kill()
            with trio.fail_after(30):
                while service.state.value != "ready" or service.starts < 2 or (
                        warm and not system.spare_ready("stor")):
                    await trio.sleep(0.02)
            # The dead domain's directory went with it (as libxl removes a destroyed domain's).
            alive = {0, system.guests["guest1"].domid, system.driver_domids["stor"],
                     *([system.spares["stor"].domid] if warm else [])}
            assert {int(d) for d in await system.xs.directory("/local/domain")} <= alive
            service.kill()  # the third start would exceed 2 per minute
            with trio.fail_after(30):
                while service.state.value != "failed":
                    await trio.sleep(0.02)
            backend = f"/local/domain/{system.driver_domids['stor']}/backend/vbd/{system.guests['guest1'].domid}/51712"
            with trio.fail_after(10):
                while not await system.xs.exists(f"{backend}/hotplug-error"):
                    await trio.sleep(0.02)
            assert b"start limit" in await system.xs.read(f"{backend}/hotplug-error")

            def read() -> subprocess.CompletedProcess[bytes]:
                return subprocess.run(["nbdcopy", uri, f"{runtime}/out"], capture_output=True, timeout=60)

            result = await trio.to_thread.run_sync(read)
            assert result.returncode != 0  # an I/O error, promptly: not a hang
            stats = (await system.statistics())["domains"]["guest1"]["devices"]["vbd/51712"]
            assert stats["errors"] >= 1
            assert "stor" not in system.spares
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
