"""`ringfence inject eio|heal`: a storage driver domain's disks fail (sticky, or the next N
requests) and heal; the guest sees EIO, then its data again, and the backend counts what
was injected."""
from __future__ import annotations

import os
import subprocess

import pytest
import trio

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


async def test_disk_eio_sticky_transient_and_heal(ringfence_system, tmp_path):
    system = ringfence_system
    uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
    data = os.urandom(1 << 20)
    (tmp_path / "in").write_bytes(data)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)

    def inject(*argv: str) -> str:
        result = run("ringfence", "inject", *argv, "stor", "--runtime-dir", system.runtime_dir)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def scenario() -> None:
        assert run("nbdcopy", str(tmp_path / "in"), uri).returncode == 0
        assert "injected=eio domain=stor disks=2" in inject("eio")
        assert run("nbdcopy", uri, str(tmp_path / "out")).returncode != 0  # EIO, not a hang
        inject("heal")
        assert run("nbdcopy", uri, str(tmp_path / "out")).returncode == 0
        assert (tmp_path / "out").read_bytes()[:len(data)] == data
        inject("eio", "--count", "3")
        assert run("nbdcopy", uri, str(tmp_path / "out")).returncode != 0
        assert run("nbdcopy", uri, str(tmp_path / "out")).returncode == 0  # transient: over
        bad = run("ringfence", "inject", "heal", "stor", "--count", "2", "--runtime-dir", system.runtime_dir)
        assert bad.returncode == 2

    async def guest_vbd() -> dict:
        return (await system.statistics())["domains"]["guest1"]["devices"]["vbd/51712"]

    pool = (await guest_vbd())["free_pages"]
    await trio.to_thread.run_sync(scenario)
    stats = (await system.statistics())["domains"]["stor"]["vbds"]
    assert sum(device["injected_errors"] for device in stats.values()) >= 4
    # Clients that gave up mid-I/O (on EIO) must not cost the frontend its pages.
    with trio.fail_after(10):
        while (vbd := await guest_vbd())["in_flight"]:
            await trio.sleep(0.05)
    assert vbd["free_pages"] == pool
