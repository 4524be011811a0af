"""Kernel device events through pyudev: the one adapter for pyudev.

netback follows its vifs the way Xen's hotplug scripts do, by device events: the kernel's
``add`` when a TAP it made appears, ``remove`` when it goes. Events are read from the
kernel's uevent netlink socket (``source="kernel"``), so they arrive without a udev daemon
(sandboxes and containers have none), for the devices of this network namespace.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NetDeviceEvent:
    action: str      # add, remove, move, change
    name: str        # the interface name (INTERFACE)
    ifindex: int     # IFINDEX: tells a device from a later one of the same name


class NetDeviceEvents:
    """Net device uevents of this network namespace, as an async iterator."""

    def __init__(self) -> None:
        import pyudev
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.monitor.filter_by("net")
        self.monitor.start()
        self.received = 0

    async def __aiter__(self) -> AsyncIterator[NetDeviceEvent]:
        while True:
            device = self.monitor.poll(timeout=0)
            if device is None:
                await trio.lowlevel.wait_readable(self.monitor.fileno())
                continue
            self.received += 1
            try:
                ifindex = int(device.properties.get("IFINDEX", "0"))
            except ValueError:
                ifindex = 0
            yield NetDeviceEvent(device.action or "", device.properties.get("INTERFACE", ""), ifindex)

    def statistics(self) -> dict[str, int]:
        return {"received": self.received}

    def close(self) -> None:
        # pyudev closes the netlink socket when the monitor goes (it has no stop())
        trio.lowlevel.notify_closing(self.monitor.fileno())
        del self.monitor


def open_net_events() -> NetDeviceEvents | None:
    """A monitor, or None where the platform gives no uevents (then nobody is told)."""
    try:
        return NetDeviceEvents()
    except (ImportError, OSError) as exc:
        log.info("no device events here", extra={"kv": {"reason": str(exc)}})
        return None
