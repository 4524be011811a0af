"""A driver domain with a warm spare: on a crash the spare (started beforehand, its devices
staged at InitWait) takes the name and the devices, the guest's I/O carries on, and a new
spare starts behind it."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import trio

from ringfence.isolation.sandbox import innermost_pid
from ringfence.isolation.supervisor import RestartPolicy
from ringfence.toolstack import hotplug
from ringfence.toolstack import system as system_module
from ringfence.toolstack.config import load
from ringfence.toolstack.system import CONTROL_PLANE_NICE, open_system

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

CONFIG = """
[[domain]]
name = "stor"
kind = "driver"
spare = true

[[domain]]
name = "guest1"
kind = "guest"
disks = ["target={dir}/g.img,vdev=xvda,backend=stor", "target={dir}/h.img,vdev=xvdb,backend=stor"]
"""


@contextlib.contextmanager
def _host(name: str) -> Iterator[str]:
    """A runtime directory with CONFIG's host and its disk images, removed afterwards."""
    runtime = f"/run/ringfence-{name}-{os.getpid()}"
    os.makedirs(runtime, exist_ok=True)
    for image in ("g", "h"):
        with open(f"{runtime}/{image}.img", "wb") as f:
            f.truncate(32 << 20)
    with open(f"{runtime}/host.toml", "w") as f:
        f.write(CONFIG.format(dir=runtime))
    try:
        yield runtime
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def test_spare_takes_over_and_is_replaced():
    with _host("spare") as runtime:
        await _exercise(runtime)


async def _exercise(runtime: str) -> None:
    # Every takeover is a start: more of them, and sooner one after another, than the
    # default start limit and backoff allow (the next spare starts after the backoff).
    policy = RestartPolicy(initial_delay=0.01, stable_after=0.0, watchdog=None, burst=TAKEOVERS + 10)
    async with open_system(load(f"{runtime}/host.toml", runtime), runtime, driver_policy=policy) as system:
        with trio.fail_after(30):
            await system.wait_spare_ready("stor")
        spare = system.spares["stor"]
        primary = system.driver_domids["stor"]
        guest = system.guests["guest1"]
        # dom0's daemons (and the toolstack's thread) yield to the domains; the hypervisor,
        # which stands in for Xen, does not.
        hypervisor = subprocess.run(["pgrep", "-f", f"ringfence hypervisor --socket {runtime}/"],
                                    capture_output=True, text=True).stdout.split()
        assert [os.getpriority(os.PRIO_PROCESS, int(pid)) for pid in hypervisor] == [0]
        assert os.getpriority(os.PRIO_PROCESS, system.xenstored.process.pid) == CONTROL_PLANE_NICE
        assert os.getpriority(os.PRIO_PROCESS, 0) == CONTROL_PLANE_NICE
        for domain in (system.drivers["stor"].process, spare.process, guest.process):
            assert os.getpriority(os.PRIO_PROCESS, innermost_pid(domain.pid)) == 0
        # The spare started at SCHED_IDLE, and stood by at normal priority, ready to serve.
        spare_program = innermost_pid(spare.process.pid)
        assert {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{spare_program}/task")} \
            == {os.SCHED_OTHER}
        devid = guest.disks[0].devid
        staged = f"/local/domain/{spare.domid}/backend/vbd/{guest.domid}/{devid}"
        frontend = f"/local/domain/{guest.domid}/device/vbd/{devid}"
        # Staged: the spare's backend serves a standby directory of the frontend's, which
        # blkfront connects over beforehand, while the device stays the primary's.
        standby = f"{frontend}/standby-{spare.domid}"
        assert await _read(system.xs, f"{staged}/frontend") == standby.encode()
        assert await _read(system.xs, f"{frontend}/standby") == standby.encode()
        with trio.fail_after(30):
            while await _read(system.xs, f"{staged}/state") != b"4":
                await trio.sleep(0.05)
        assert await _read(system.xs, f"{frontend}/backend-id") == str(primary).encode()
        assert await _read(system.xs, f"{frontend}/state") == b"4"
        # A device detached meanwhile takes what was staged for it along.
        second = guest.disks[1].devid
        await hotplug.block_detach(system, "guest1", "xvdb")
        assert await _read(system.xs, f"/local/domain/{spare.domid}/backend/vbd/{guest.domid}/{second}/state") is None
        assert ("vbd", guest.domid, second) not in spare.staged
        uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
        data = os.urandom(4 << 20)
        with open(f"{runtime}/in", "wb") as f:
            f.write(data)
        system.drivers["stor"].kill()

        def io() -> bytes:
            subprocess.run(["nbdcopy", f"{runtime}/in", uri], check=True, timeout=60)
            subprocess.run(["nbdcopy", uri, f"{runtime}/out"], check=True, timeout=60)
            with open(f"{runtime}/out", "rb") as f:
                return f.read(len(data))

        assert await trio.to_thread.run_sync(io) == data
        # The takeover only switched blkfront to the link it stood by with.
        stats = (await system.domain_statistics())["guest1"]
        assert sum(_values(stats, "promotions")) == 1, stats
        names = {d["name"]: d["domid"] for d in await system.dom0.list_domains()}
        assert names["stor"] == spare.domid == system.driver_domids["stor"]
        assert system.drivers["stor"].process is spare.process
        with trio.fail_after(30):
            await system.wait_spare_ready("stor")
        assert system.spares["stor"].domid != spare.domid
        assert await _read(system.xs, f"{frontend}/backend") == staged.encode()
        assert await _read(system.xs, f"/local/domain/{primary}/backend/vbd/{guest.domid}/{devid}/state") is None
        # Takeover after takeover in the middle of writes: each one a switch to the standby
        # link, and every byte written is there.
        for round_ in range(TAKEOVERS):
            with trio.fail_after(30):
                await system.wait_spare_ready("stor")
            taking_over = system.spares["stor"]
            data = os.urandom(4 << 20)
            with open(f"{runtime}/in", "wb") as f:
                f.write(data)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, lambda: subprocess.run(
                    ["nbdcopy", f"{runtime}/in", uri], check=True, timeout=60))
                await trio.sleep(0.01 * (round_ + 1))  # mid-write
                system.drivers["stor"].kill()
            assert await trio.to_thread.run_sync(lambda: _read_back(uri, f"{runtime}/out", len(data))) == data
            # The guest may be served before the toolstack has seen the death (blkfront
            # switches on dom0's word): the statistics below are the spare's once it has.
            with trio.fail_after(30):
                while system.drivers["stor"].process is not taking_over.process:
                    await trio.sleep(0.01)
        stats = (await system.domain_statistics())["guest1"]
        assert sum(_values(stats, "promotions")) == 1 + TAKEOVERS, stats
        # dom0 told blkfront of the takeovers on its standby links, ahead of XenStore's
        # switch (which can still win the race), and the switch left its state alone.
        assert sum(_values(stats, "signalled_takeovers")) >= 1, stats
        # As root, the hypervisor gave that word as the killed domain began to exit
        # (hypervisor/sim/exits.py): the kills left its exit unhastened, as nothing waited.
        if system.exits_announced:
            hypervisor = (await system.dom0.statistics())["hypervisor"]
            assert hypervisor["early_death_notices"] >= 1, hypervisor
            with trio.fail_after(30):
                await system.wait_spare_ready("stor")
            assert system.takes_over_on_notice("stor")
            assert system.drivers["stor"].death_awaited() is False
        assert await _read(system.xs, f"{frontend}/state") == b"4"
        # Each dead driver domain's directory went with it: nothing is left of 21 of them.
        with trio.fail_after(30):
            await system.wait_spare_ready("stor")
        alive = {0, guest.domid, system.driver_domids["stor"], system.spares["stor"].domid}
        assert {int(d) for d in await system.xs.directory("/local/domain")} <= alive
        # The spare mapped the pool pages blkfront listed for it while it stood by.
        assert sum(_values((await system.domain_statistics())["stor"], "premapped_grants")) > 0
        assert stats["devices"][f"vbd/{devid}"]["errors"] == 0, stats  # no I/O error seen
    assert not os.path.exists(f"{runtime}/control.sock")
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # the toolstack's thread as it was


# Each a kill in the middle of a 4 MiB write, checked byte for byte: as root, each also a
# takeover on the hypervisor's early word (the dying domain not yet gone).
TAKEOVERS = 20


def _read_back(uri: str, path: str, length: int) -> bytes:
    subprocess.run(["nbdcopy", uri, path], check=True, timeout=60)
    with open(path, "rb") as f:
        return f.read(length)


async def test_spare_dead_while_standing_by_then_a_takeover():
    """The spare dies while the frontend stands by with it: what was staged for it goes,
    the frontend lets go of that link, another spare takes its place and over, and the
    guest's data is intact."""
    with _host("spare-dead") as runtime:
        async with open_system(load(f"{runtime}/host.toml", runtime), runtime) as system:
            with trio.fail_after(30):
                await system.wait_spare_ready("stor")
            guest = system.guests["guest1"]
            frontend = f"/local/domain/{guest.domid}/device/vbd/{guest.disks[0].devid}"
            spare = system.spares["stor"]
            device = f"vbd/{guest.disks[0].devid}"
            links = (await system.domain_statistics())["guest1"]["devices"][device]["standby_links"]
            # The fault harness's way: the spare found by its driver's name (stor.spareN).
            injected = await trio.run_process(
                ["ringfence", "inject", "kill", "stor.spare", "--runtime-dir", runtime], capture_stdout=True)
            assert f"domain={spare.name} domid={spare.domid} " in injected.stdout.decode(), injected.stdout
            with trio.fail_after(30):  # the frontend lets go of the dead spare's link
                while True:
                    stats = (await system.domain_statistics())["guest1"]
                    if stats["devices"][device]["standby_backend"] == -1:
                        break
                    await trio.sleep(0.05)
            # A standby key naming the dead spare's directory (the toolstack removes it now)
            # gets one try, not a loop of them.
            await system.xs.write(f"{frontend}/standby", f"{frontend}/standby-{spare.domid}")
            await trio.sleep(0.5)
            stats = (await system.domain_statistics())["guest1"]
            assert stats["devices"][device]["standby_links"] - links <= 2, stats  # (+ the next spare's)
            uri = f"nbd+unix:///?socket={guest.nbd_sockets['xvda']}"
            data = os.urandom(4 << 20)
            with open(f"{runtime}/in", "wb") as f:
                f.write(data)
            assert await _read(system.xs, f"{frontend}/standby-{spare.domid}") is None
            with trio.fail_after(30):
                await system.wait_spare_ready("stor")
            assert system.spares["stor"].domid != spare.domid
            # Standing by again took one link: the dead spare's slot was not tried over and
            # over meanwhile (it was, some 470 times, until the next spare's staging).
            stats = (await system.domain_statistics())["guest1"]
            assert stats["devices"][device]["standby_links"] - links <= 3, stats
            system.drivers["stor"].kill()
            assert await trio.to_thread.run_sync(lambda: _write_read(uri, runtime, data)) == data
            stats = (await system.domain_statistics())["guest1"]
            assert stats["devices"][f"vbd/{guest.disks[0].devid}"]["promotions"] == 1, stats


def _write_read(uri: str, runtime: str, data: bytes) -> bytes:
    subprocess.run(["nbdcopy", f"{runtime}/in", uri], check=True, timeout=60)
    return _read_back(uri, f"{runtime}/out", len(data))


async def _read(xs, path: str) -> bytes | None:
    return (await xs.read_many([path]))[0]


def _values(tree, key: str) -> list:
    """Every value of ``key`` anywhere in a statistics tree."""
    if isinstance(tree, dict):
        return ([tree[key]] if key in tree else []) + [v for child in tree.values() for v in _values(child, key)]
    if isinstance(tree, list):
        return [v for child in tree for v in _values(child, key)]
    return []


async def test_a_crash_while_the_spare_starts(monkeypatch):
    """The driver domain dies before its spare has been staged (the system just came up):
    the spare takes over with its devices handed over whole, and its start-up, which goes on
    behind, must not stage those devices for it as for a spare (that wrote the now active
    backend's state back to InitWait: the guest took its backend for gone and its I/O hung
    until the next crash). The guest's I/O goes on, the domain's statistics are the new
    one's, and a next spare stands by. The first spare's start-up is held before its
    staging until the takeover is over: left to itself, which comes first is a race (the
    spare was ready before the system was, in one run of two)."""
    takeover_over = trio.Event()
    wait_frontends = system_module._wait_frontends

    async def after_the_takeover(system, name):
        await takeover_over.wait()
        await wait_frontends(system, name)

    monkeypatch.setattr(system_module, "_wait_frontends", after_the_takeover)
    with _host("spare-early") as runtime:
        with open(f"{runtime}/host.toml", "w") as f:  # one disk: its frontend connects at once
            f.write(CONFIG.format(dir=runtime).replace(', "target={dir}/h.img,vdev=xvdb,backend=stor"'.format(dir=runtime), ""))
        async with open_system(load(f"{runtime}/host.toml", runtime), runtime) as system:
            first_spare = system.spares["stor"]
            guest = system.guests["guest1"]
            # Up (serving its statistics), its staging held: a spare that takes over before
            # it is up has its socket renamed by its start-up once it is, which the hold
            # above would keep from ever happening (the spare starts at SCHED_IDLE, and on
            # a busy host it was not up yet in one CI run).
            with trio.fail_after(30):
                while not os.path.exists(first_spare.stats):
                    await trio.sleep(0.02)
            assert not system.spare_ready("stor")
            system.drivers["stor"].kill()
            uri = f"nbd+unix:///?socket={guest.nbd_sockets['xvda']}"
            data = os.urandom(1 << 20)
            with open(f"{runtime}/in", "wb") as f:
                f.write(data)
            with trio.fail_after(30):
                assert await trio.to_thread.run_sync(lambda: _write_read(uri, runtime, data)) == data
                while system.drivers["stor"].process is not first_spare.process:
                    await trio.sleep(0.01)
                while "domid" not in (await system.domain_statistics())["stor"]:
                    await trio.sleep(0.05)  # its socket renamed once it is up
                # serving at normal priority: its start at SCHED_IDLE did not outlast the takeover
                program = innermost_pid(first_spare.process.pid)
                assert {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{program}/task")} \
                    == {os.SCHED_OTHER}
                takeover_over.set()
                await system.wait_spare_ready("stor")
            assert (await system.domain_statistics())["stor"]["domid"] == first_spare.domid
            backend = f"/local/domain/{first_spare.domid}/backend/vbd/{guest.domid}/{guest.disks[0].devid}"
            assert await _read(system.xs, f"{backend}/state") == b"4"
            # the guest stands by with the next spare, as after any takeover
            device = f"vbd/{guest.disks[0].devid}"
            with trio.fail_after(10):
                while (await system.domain_statistics())["guest1"]["devices"][device]["standby_backend"] \
                        != system.spares["stor"].domid:
                    await trio.sleep(0.05)
            # and the next takeover, from a spare that stood by, is as usual
            system.drivers["stor"].kill()
            data = os.urandom(1 << 20)
            with open(f"{runtime}/in", "wb") as f:
                f.write(data)
            with trio.fail_after(30):
                assert await trio.to_thread.run_sync(lambda: _write_read(uri, runtime, data)) == data
