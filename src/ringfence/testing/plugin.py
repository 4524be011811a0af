"""pytest plugin (entry point ``ringfence``): fixtures and markers for other projects.

    async def test_my_guest_survives(ringfence_system):
        system = ringfence_system                    # the embedded default, running
        uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
        ...
        await ringfence_kill(system, "stor")         # the storage driver domain crashes

    @pytest.mark.ringfence_fault("kill", domain="stor", after=0.5)
    async def test_under_fault(ringfence_system): ...   # killed 0.5 s into the test

    @pytest.mark.ringfence_fault("corrupt-request", domain="stor", count=3, seed=7)
    @pytest.mark.ringfence_fault("eagain", domain="guest1", count=5)

Every fault of ``ringfence inject`` is there: kill, hang, eio, heal, corrupt-index,
corrupt-request, drop-notify, storm, eagain, lose-watch, squeeze (``size=`` bytes), revoke.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ringfence_fault(kind, domain, after=0.0, count=None, seed=0, size=None): "
        "inject a fault (any of ringfence inject's) into a domain of the ringfence_system "
        "fixture, `after` seconds into the test")


@pytest.fixture
async def ringfence_system(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A running system (the embedded default: stor, net, guest1, guest2), torn down after."""
    from ringfence.toolstack.config import ensure_disk_images, load
    from ringfence.toolstack.system import open_system
    runtime = f"/run/ringfence-pytest-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**6}"
    config = load(None, os.path.join(runtime, "disks"))
    ensure_disk_images(config, 32 << 20)
    try:
        async with open_system(config, runtime) as system:
            marker = request.node.get_closest_marker("ringfence_fault")
            async with trio.open_nursery() as nursery:
                if marker is not None:
                    nursery.start_soon(_fault_later, system, marker)
                yield system
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


async def _fault_later(system: Any, marker: pytest.Mark) -> None:
    kind = marker.args[0] if marker.args else marker.kwargs.get("kind", "kill")
    options = {key: marker.kwargs[key] for key in ("count", "seed", "size") if key in marker.kwargs}
    await trio.sleep(float(marker.kwargs.get("after", 0.0)))
    await ringfence_fault(system, kind, marker.kwargs.get("domain", "stor"), **options)


async def ringfence_fault(system: Any, kind: str, domain: str, *, count: int | None = None,
                          seed: int = 0, size: int | None = None) -> None:
    """Inject ``kind`` into a domain of a running system, as ``ringfence inject`` does: kill
    or hang a driver domain; eio (every request, or the next ``count``) or heal its disks;
    break its rings (corrupt-index, corrupt-request, drop-notify, storm: ``count`` times,
    corruptions picked by ``seed``); make xenstored fail a domain's next ``count`` commits
    (eagain) or lose its next watch events (lose-watch); lower a driver domain's memory
    limit to ``size`` bytes (squeeze); or end a domain's grants another holds mapped
    (revoke: each must be refused, else AssertionError)."""
    import signal
    from ringfence.backends.blkback.faults import RING_FAULTS, node_value
    from ringfence.toolstack import hotplug

    def domid() -> int:
        return next(row["domid"] for row in hotplug.describe(system) if row["name"] == domain)
    if kind in ("kill", "hang"):
        service = system.drivers[domain]
        if kind == "kill":
            service.kill()
        elif service.process is not None:
            # the program, not an exec'd domain's waiter (which serves nothing)
            from ringfence.isolation.sandbox import innermost_pid
            os.kill(innermost_pid(service.process.pid), signal.SIGSTOP)
    elif kind in ("eio", "heal", *RING_FAULTS):
        await hotplug.inject_disk_fault(system, domain, node_value(kind, count, seed))
    elif kind in ("eagain", "lose-watch"):
        await system.xs.control("inject", kind, str(domid()), str(count or 1))
    elif kind == "squeeze" and size is not None:
        await hotplug.squeeze_domain(system, domain, str(size))
    elif kind == "revoke":
        result = await system.dom0.revoke_mapped(domid())
        if result["ended"]:
            raise AssertionError(f"{result['ended']} grants ended under a mapping")
    else:
        raise ValueError(f"unknown fault {kind!r} (squeeze needs size=)")


ringfence_kill = ringfence_fault
