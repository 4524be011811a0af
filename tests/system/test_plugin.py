"""The pytest plugin other projects use: a running system as a fixture, faults as markers."""
from __future__ import annotations

import os
import subprocess

import pytest
import trio

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.mark.ringfence_fault("kill", domain="stor", after=0.3)
async def test_fixture_and_fault_marker(ringfence_system, tmp_path):
    system = ringfence_system
    uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
    data = os.urandom(4 << 20)
    (tmp_path / "in").write_bytes(data)

    def io() -> None:
        for _ in range(3):  # spans the kill 0.3 s in
            subprocess.run(["nbdcopy", str(tmp_path / "in"), uri], check=True, timeout=60)
            subprocess.run(["nbdcopy", uri, str(tmp_path / "out")], check=True, timeout=60)
            assert (tmp_path / "out").read_bytes()[:len(data)] == data

    await trio.to_thread.run_sync(io)
    with trio.fail_after(30):
        while not system.recoveries:
            await trio.sleep(0.05)
    assert system.recoveries[0][0] == "stor"


async def test_xenstored_crash_is_survived_by_every_domain(ringfence_system, tmp_path):
    """kill -9 xenstored: the supervisor restarts it from its journal, the hypervisor hands
    it every domain's XenStore ring again and the domains reset their rings (xenstore-ring.txt's
    RECONNECT), and a storage driver domain crash afterwards is still recovered (which needs
    XenStore for the handshake)."""
    system = ringfence_system
    uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
    data = os.urandom(2 << 20)
    (tmp_path / "in").write_bytes(data)
    system.xenstored.kill()
    with trio.fail_after(30):
        while system.xenstored.starts < 2 or system.xenstored.state.value != "ready":
            await trio.sleep(0.05)
    system.drivers["stor"].kill()

    def io() -> None:
        subprocess.run(["nbdcopy", str(tmp_path / "in"), uri], check=True, timeout=60)
        subprocess.run(["nbdcopy", uri, str(tmp_path / "out")], check=True, timeout=60)
        assert (tmp_path / "out").read_bytes()[:len(data)] == data

    await trio.to_thread.run_sync(io)
    assert any(name == "stor" for name, _ in system.recoveries)


async def test_the_hang_fault_stops_the_domains_program(ringfence_system):
    """``hang`` stops the driver domain's program itself (what serves the guests), which
    its watchdog then misses, not a waiter standing outside its pid namespace."""
    import signal
    from ringfence.isolation.sandbox import innermost_pid
    from ringfence.testing.plugin import ringfence_fault
    program = innermost_pid(ringfence_system.drivers["stor"].process.pid)
    await ringfence_fault(ringfence_system, "hang", "stor")
    def state() -> str:
        with open(f"/proc/{program}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    try:
        with trio.fail_after(10):  # stopped once it takes the signal
            while state() != "T":
                await trio.sleep(0.01)
    finally:
        os.kill(program, signal.SIGCONT)


@pytest.mark.ringfence_fault("corrupt-index", domain="stor", after=0.2)
async def test_every_fault_of_the_harness_through_the_plugin(ringfence_system, tmp_path):
    """The marker takes any of ``ringfence inject``'s faults (here a corrupt ring index,
    after which the frontend reconnects and replays), and ``ringfence_fault`` makes the
    others in-process: a corrupted request refused, an EAGAIN retried."""
    from ringfence.testing.plugin import ringfence_fault
    system = ringfence_system
    uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
    data = os.urandom(2 << 20)
    (tmp_path / "in").write_bytes(data)

    def io() -> None:
        for _ in range(3):
            subprocess.run(["nbdcopy", str(tmp_path / "in"), uri], check=True, timeout=60)
            subprocess.run(["nbdcopy", uri, str(tmp_path / "out")], check=True, timeout=60)
            assert (tmp_path / "out").read_bytes()[:len(data)] == data

    await trio.to_thread.run_sync(io)
    await ringfence_fault(system, "corrupt-request", "stor", seed=1)
    await ringfence_fault(system, "eagain", "guest2", count=2)
    await ringfence_fault(system, "revoke", "guest1")  # refused under every mapping, or it raises
    await trio.to_thread.run_sync(subprocess.run, ["qemu-io", "-f", "raw", "-c", "read 0 4k", uri])
    await trio.to_thread.run_sync(io)
    stor = (await system.statistics())["domains"]["stor"]["vbds"]["1/51712"]
    assert stor["injected_faults"] == {"corrupt-index": 1, "corrupt-request": 1}
    assert stor["disconnects_for_abuse"] == 1
    with pytest.raises(ValueError):
        await ringfence_fault(system, "squeeze", "stor")  # needs size=
