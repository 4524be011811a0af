"""`ringfence up` as a user runs it: the embedded default comes up sandboxed, the guests'
disks work with qemu's and libnbd's tools, killing the storage driver domain is a pause,
and SIGTERM leaves no process or cgroup behind."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from ringfence.isolation.sandbox import group_cgroups
from ringfence.toolstack.system import cgroup_group

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nbdcopy"),
                                reason="needs root and libnbd-bin")


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_up_kill_storage_domain_and_clean_shutdown(tmp_path, runtime):
    up = subprocess.Popen(["ringfence", "up", "--runtime-dir", runtime], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    try:
        uris, nics = {}, {}
        deadline = time.monotonic() + 60
        while (len(uris) < 2 or len(nics) < 2) and time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "ringfence up exited early"
            fields = dict(item.split("=", 1) for item in line.split())
            if "nbd" in fields:
                uris[fields["guest"]] = fields["nbd"]
            else:
                nics[fields["guest"]] = fields

        def ping(src: str, dst: str) -> None:
            address = nics[dst]["ip"].split(",")[0].split("/")[0]
            out = subprocess.run(["nsenter", "-t", nics[src]["netns_pid"], "-n", "ping", "-c", "2",
                                  "-W", "5", address], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr

        ping("guest1", "guest2")
        ping("guest2", "guest1")
        data = os.urandom(8 << 20)
        source = tmp_path / "data.img"
        source.write_bytes(data)
        subprocess.run(["nbdcopy", str(source), uris["guest1"]], check=True, timeout=60)
        subprocess.run(["nbdcopy", str(source), uris["guest2"]], check=True, timeout=60)
        blkback = _pids("ringfence blkback")
        assert blkback
        for pid in blkback:
            os.kill(pid, signal.SIGKILL)  # the storage driver domain crashes
        for name in ("guest1", "guest2"):
            back = tmp_path / f"{name}.img"
            subprocess.run(["nbdcopy", uris[name], str(back)], check=True, timeout=60)
            assert back.read_bytes()[:len(data)] == data
        assert set(_pids("ringfence blkback")).isdisjoint(blkback)  # a new one serves
        netback = _pids("ringfence netback")
        injected = subprocess.run(["ringfence", "inject", "kill", "net", "--runtime-dir", runtime],
                                  capture_output=True, text=True, timeout=60)
        assert injected.returncode == 0 and "injected=kill domain=net" in injected.stdout
        time.sleep(1)
        ping("guest1", "guest2")
        assert set(_pids("ringfence netback")).isdisjoint(netback)
        bad = subprocess.run(["ringfence", "inject", "kill", "nosuch", "--runtime-dir", "/nonexistent"],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    time.sleep(0.5)
    assert _pids(runtime) == []
    assert _pids("ringfence blkback") == [] and _pids("ringfence guest") == []
    assert _pids("ringfence netback") == []
    assert group_cgroups(cgroup_group(runtime)) == []  # the system's cgroups went with it


def test_up_killed_leaves_no_orphans_and_can_start_again(runtime):
    """kill -9 of `ringfence up` takes its hypervisor, xenstored and domains with it (they
    die with their parent), and a new `up` on the same runtime directory starts clean."""

    def start() -> subprocess.Popen[str]:
        up = subprocess.Popen(["ringfence", "up", "--runtime-dir", runtime], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
        for _ in range(4):  # two guests, a disk and a NIC each
            assert up.stdout.readline().startswith("guest="), "ringfence up did not come up"
        return up

    up = start()
    up.kill()
    up.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (_pids(runtime) or _pids("ringfence blkback") or _pids("ringfence guest")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pids(runtime) == [] and _pids("ringfence blkback") == [] and _pids("ringfence guest") == []
    again = start()
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0
