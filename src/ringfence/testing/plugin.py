"""pytest plugin (entry point ``ringfence``): fixtures and markers for other projects.

    async def test_my_guest_survives(ringfence_system):
        system = ringfence_system                    # the embedded default, running
        uri = f"nbd+unix:///?socket={system.guests['guest1'].nbd_sockets['xvda']}"
        ...
        await ringfence_kill(system, "stor")         # the storage driver domain crashes

    @pytest.mark.ringfence_fault("kill", domain="stor", after=0.5)
    async def test_under_fault(ringfence_system): ...   # killed 0.5 s into the test
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
        "markers", "ringfence_fault(kind, domain, after=0.0): inject a fault (kill or hang) "
        "into a driver domain of the ringfence_system fixture, `after` seconds into the test")


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
    domain = marker.kwargs.get("domain", "stor")
    await trio.sleep(float(marker.kwargs.get("after", 0.0)))
    await ringfence_fault(system, kind, domain)


async def ringfence_fault(system: Any, kind: str, domain: str) -> None:
    """Inject ``kind`` ("kill" or "hang") into a driver domain of a running system."""
    import signal
    service = system.drivers[domain]
    if kind == "kill":
        service.kill()
    elif kind == "hang" and service.process is not None:
        # the program, not an exec'd domain's waiter (which serves nothing)
        from ringfence.isolation.sandbox import innermost_pid
        os.kill(innermost_pid(service.process.pid), signal.SIGSTOP)
    else:
        raise ValueError(f"unknown fault {kind!r}")


ringfence_kill = ringfence_fault
