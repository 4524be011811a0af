"""The README's first session, as a new user types it: every command of its shell block,
in order, against a real host (``ringfence up`` with the embedded default), each must
succeed. Only the runtime directory and the data image move somewhere private."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ringfence.isolation.sandbox import group_cgroups
from ringfence.toolstack.system import cgroup_group

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nbdinfo")
                                or not shutil.which("qemu-img"),
                                reason="needs root, libnbd-bin and qemu-utils")

README = Path(__file__).resolve().parents[2] / "README.md"


def first_session() -> list[str]:
    text = README.read_text()
    section = text[text.index("## A first session"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_first_session(runtime):
    commands = first_session()
    assert commands[0] == "ringfence up &" and commands[-1] == "kill %1"
    env = dict(os.environ, RINGFENCE_RUNTIME_DIR=runtime)

    def localize(command: str) -> str:
        return (command.replace("/run/ringfence/", f"{runtime}/")
                .replace("/var/lib/ringfence-data.img", f"{runtime}/data.img"))

    up = subprocess.Popen(["ringfence", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [up.stdout.readline() for _ in range(4)]  # the guests' disks and NICs
        assert all(line.startswith("guest=") for line in lines), lines
        held = {}
        for command in commands[1:-1]:
            if command.startswith(("ringfence block-attach", "ringfence network-attach")):
                held[command.split()[1]] = _mappings_held(env)
            result = subprocess.run(["bash", "-c", localize(command)], env=env, capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            if command.startswith("ringfence stats"):
                assert '"domains"' in result.stdout and '"hypervisor"' in result.stdout
            if command.startswith("ringfence list"):
                assert "guest1" in result.stdout and "stor" in result.stdout
        # Detached devices gave back every page and port they had from the guest.
        _until_released(env, held["block-attach"])
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", runtime], capture_output=True, text=True).stdout
    assert left == ""
    assert not os.path.exists(f"{runtime}/control.sock")
    # Nothing left behind: TAPs and bridges lived in the domains' own network namespaces,
    # mounts in their mount namespaces, and the cgroups go with their processes.
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "vif" not in links and "xenbr" not in links
    assert runtime not in Path("/proc/self/mounts").read_text()
    assert group_cgroups(cgroup_group(runtime)) == []  # the system's cgroups went with it


def _mappings_held(env: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Each driver domain's mapped foreign pages and event channel ports; for netback, the
    pages its remaining vifs account for instead of the count (they map the guests' buffer
    pages as traffic first uses them, so the count may grow for the vifs that stay)."""
    out = subprocess.run(["ringfence", "stats"], env=env, capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)
    held = {d["name"]: (d["mappings_held"], d["ports"]) for d in stats["hypervisor"]["domains"]
            if d["name"] in ("stor", "net")}
    vifs = (stats["domains"].get("net") or {}).get("vifs") or {}
    accounted = sum(v["copier"].get("mapped", 0) + 2 * (v["state"] == "Connected") for v in vifs.values())
    # Not accounted for: leaked. The hypervisor's count is read before netback's, so a page
    # netback maps in between counts for netback only: below zero is no leak (CI saw -1).
    held["net"] = (max(0, held["net"][0] - accounted), held["net"][1])
    return held


def _until_released(env: dict[str, str], before: dict[str, tuple[int, int]]) -> None:
    """Back to the ports held before attaching, and no more mapped pages (persistent grants
    of the disks that stay come and go with their I/O; netback's pages are all accounted for
    by the vifs that stay)."""
    deadline = time.monotonic() + 15
    while True:
        now = _mappings_held(env)
        if all(now[d][1] == before[d][1] and now[d][0] <= before[d][0] for d in before):
            return
        assert time.monotonic() < deadline, f"driver domains hold {now}, held {before} before attaching"
        time.sleep(0.2)


def test_usage_and_runtime_errors_are_one_line(tmp_path):
    env = dict(os.environ, RINGFENCE_RUNTIME_DIR=str(tmp_path / "none"))
    for argv, status in ((["list"], 1), (["block-attach", "guest1"], 2), (["exec", "guest1"], 2),
                         (["create", str(tmp_path / "missing.toml")], 1), (["xenstore-ls"], 1)):
        result = subprocess.run(["ringfence", *argv], env=env, capture_output=True, text=True)
        assert result.returncode == status, (argv, result.stderr)
        assert result.stderr.count("\n") <= 1 or status == 2, (argv, result.stderr)
