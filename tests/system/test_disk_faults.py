"""`ringfence inject eio|heal`: a storage driver domain's disks fail (sticky, or the next N
requests) and heal; the guest sees EIO, then its data again, and the backend counts what
was injected. `ringfence inject corrupt-index|corrupt-request|drop-notify|storm`: its rings
break as a broken frontend or event channel would break them; a request fails, or the
frontend reconnects, or I/O waits a little, and no data is lost."""
from __future__ import annotations

import os
import subprocess

import pytest
import trio

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def _inject(system, fault: str, *argv: str) -> str:
    """``ringfence inject FAULT stor ARGV...``, which must succeed: what it printed."""
    result = _run("ringfence", "inject", fault, "stor", "--runtime-dir", system.runtime_dir, *argv)
    assert result.returncode == 0, result.stderr
    assert f"injected={fault} domain=stor" in result.stdout
    return result.stdout


def _guest1_and_data(system, tmp_path, size: int) -> tuple[str, bytes]:
    """guest1's disk's NBD URI, and ``size`` random bytes in ``tmp_path/in``."""
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    return f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}", data


async def test_disk_eio_sticky_transient_and_heal(ringfence_system, tmp_path):
    system = ringfence_system
    uri, data = _guest1_and_data(system, tmp_path, 1 << 20)
    run = _run

    def inject(fault: str, *argv: str) -> str:
        return _inject(system, fault, *argv, "--observe", "0")

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


async def test_ring_faults_cost_a_request_a_reconnection_or_a_delay_never_data(ringfence_system, tmp_path):
    system = ringfence_system
    uri, data = _guest1_and_data(system, tmp_path, 4 << 20)
    run = _run

    def inject(fault: str, *argv: str) -> str:
        return _inject(system, fault, *argv)

    def intact() -> bool:
        out = tmp_path / "out"
        return run("nbdcopy", uri, str(out)).returncode == 0 and out.read_bytes()[:len(data)] == data

    def scenario() -> dict[str, str]:
        reports = {}
        assert run("nbdcopy", str(tmp_path / "in"), uri).returncode == 0
        # the seed picks the corruption: an operation that does not exist, refused
        reports["corrupt-request"] = inject("corrupt-request", "--seed", "1", "--observe", "0")
        run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri)  # its first request is refused
        assert intact()
        reports["corrupt-index"] = inject("corrupt-index", "--observe", "0")
        assert intact()  # the next request overflows the ring: reconnected and replayed
        reports["drop-notify"] = inject("drop-notify", "--count", "3", "--observe", "0")
        assert intact()
        reports["storm"] = inject("storm", "--count", "10000", "--observe", "1")
        assert intact()
        return reports

    reports = await trio.to_thread.run_sync(scenario)
    assert "count=1 seed=1" in reports["corrupt-request"]
    assert "moved=stor.vbds.1/51712.injected_faults.storm before=None after=1" in reports["storm"]
    stor = (await system.statistics())["domains"]["stor"]["vbds"]["1/51712"]
    guest = (await system.statistics())["domains"]["guest1"]["devices"]["vbd/51712"]
    assert stor["injected_faults"] == {"corrupt-request": 1, "corrupt-index": 1, "drop-notify": 3, "storm": 1}
    assert stor["rejected"].get("unknown_operation") == 1
    assert stor["disconnects_for_abuse"] == 1 and guest["connections"] == 2
    assert guest["errors"] >= 1  # the refused request


async def test_xenstore_faults_a_squeeze_and_a_revoke_are_made_and_reported(ringfence_system):
    """`ringfence inject eagain|lose-watch GUEST` through xenstored (the guest's netfront
    retries its transaction when the network driver domain comes back); `squeeze`, a
    driver domain's cgroup memory limit (refused below what the kernel can reclaim); and
    `revoke`, a guest's grants ended under its backends' mappings (each refused)."""
    system = ringfence_system

    def inject(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ringfence", "inject", *argv, "--runtime-dir", system.runtime_dir],
                              capture_output=True, text=True, timeout=60)

    def scenario() -> list[subprocess.CompletedProcess[str]]:
        return [inject("eagain", "guest1", "--count", "3", "--observe", "0"),
                inject("kill", "net"),
                inject("lose-watch", "guest2", "--observe", "0"),
                inject("squeeze", "stor", "--bytes", "1M", "--observe", "0"),
                inject("squeeze", "stor", "--bytes", "256M", "--observe", "0"),
                inject("squeeze", "stor", "--observe", "0"),
                inject("revoke", "guest1", "--observe", "0")]

    eagain, kill, lose, too_small, squeeze, no_size, revoke = await trio.to_thread.run_sync(scenario)
    # every grant of guest1's that a backend holds mapped (its rings, at least) is refused
    assert revoke.returncode == 0 and " ended=0 " in revoke.stdout, revoke.stderr
    tried = int(revoke.stdout.split(" tried=")[1].split()[0])
    assert tried > 0 and f" refused={tried} " in revoke.stdout
    assert "injected=eagain domain=guest1 domid=" in eagain.stdout and "count=3" in eagain.stdout
    assert kill.returncode == 0 and lose.returncode == 0, (kill.stderr, lose.stderr)
    assert too_small.returncode == 1 and "try a larger limit" in too_small.stderr
    assert squeeze.returncode == 0 and "limit=268435456" in squeeze.stdout, squeeze.stderr
    assert no_size.returncode == 2
    with trio.fail_after(30):  # netfront reconnects, its transaction retried past the EAGAINs
        while True:
            stats = await system.statistics()
            if (stats["domains"]["guest1"]["devices"]["vif/0"]["state"] == "Connected"
                    and stats["domains"]["guest1"]["xenstore"]["transaction_retries"] >= 3):
                break
            await trio.sleep(0.1)
    assert stats["xenstored"]["server"]["injected_faults"]["eagain"] == 3
