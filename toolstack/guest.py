"""``ringfence guest``: everything a sim guest runs in its one domain process.

A domain is one control connection, so a guest runs all its frontends together. Like a
Linux guest's xenbus probe, it watches its own ``device`` directory: every vbd the toolstack
adds becomes blkfront + an NBD export (``NBD_DIR/<dev>.sock``, the name from the backend's
``dev`` node), every vif becomes ``eth<devid>`` with the addresses of the backend's ``ip``
node; a device whose directory the toolstack removes (detach) is closed. So hotplug
(``ringfence block-attach``, ``network-detach``, ...) needs nothing from the guest but this.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
from dataclasses import asdict
from typing import Any

import trio

from ringfence._sdnotify import Notifier
from ringfence._statsock import serve_statistics
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.xenbus.paths import can_change_devices

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "guest", help="run a sim guest's frontends (disks over NBD, NICs as eth0, eth1, ...)",
        description="Run this guest domain's frontends: each vbd the toolstack gives it is "
        "exported over NBD at NBD_DIR/<dev>.sock, each vif becomes eth<devid>. Devices "
        "attached or detached later (hotplug) come and go the same way. Prints 'guest ready' "
        "once the devices present at start are connected.",
        epilog="example (inside a sim domain): ringfence guest --nbd-dir /run/ringfence/guests/g1")
    parser.add_argument("--nbd-dir", required=True, metavar="DIR",
                        help="where the NBD sockets of the guest's disks go")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args.nbd_dir)
    return 0


async def _serve(nbd_dir: str) -> None:
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    async with open_domain() as domain, open_domain_xenstore(domain) as xs:
        async with trio.open_nursery() as nursery:
            devices = GuestDevices(domain, xs, nbd_dir)
            await nursery.start(devices.run)
            await nursery.start(serve_statistics, lambda: {
                "domid": domain.domid, "xenstore": xs.statistics(), **devices.statistics()})
            Notifier().ready(status="guest frontends up")
            print("guest ready", flush=True)


class GuestDevices:
    """The guest's frontends, following its ``device`` directory in XenStore."""

    def __init__(self, domain: Any, xs: Any, nbd_dir: str) -> None:
        self.domain, self.xs, self.nbd_dir = domain, xs, nbd_dir
        self.base = f"/local/domain/{domain.domid}/device"
        self.running: dict[tuple[str, int], trio.CancelScope] = {}
        self.frontends: dict[tuple[str, int], Any] = {}
        self.attached = self.detached = 0

    def statistics(self) -> dict[str, Any]:
        return {"attached": self.attached, "detached": self.detached,
                "devices": {f"{kind}/{devid}": asdict(front.statistics())
                            for (kind, devid), front in sorted(self.frontends.items())}}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # A device is there while its 'backend' pointer is (see _present): the keys below a
        # device, most of them our frontends' own writes, are sifted out by the client.
        async with trio.open_nursery() as nursery, self.xs.watch(
                self.base, relevant=functools.partial(can_change_devices, self.base, key="backend")) as events:
            first = True
            async for _ in events:
                # The reconcile reads the directory as it is now: what else is queued is in it.
                with contextlib.suppress(trio.WouldBlock):
                    while True:
                        events.receive_nowait()
                # The devices present at start are all connected before the guest is ready;
                # later ones (hotplug) come up in the background.
                await self._reconcile(nursery, wait=first)
                if first:
                    task_status.started()
                    first = False

    async def _present(self) -> set[tuple[str, int]]:
        present = set()
        for kind in ("vbd", "vif"):
            for devid in await self._children(f"{self.base}/{kind}"):
                # A device is there while its toolstack-written 'backend' pointer is: a node
                # our own frontend writes late must not keep a detached device alive.
                if await self.xs.exists(f"{self.base}/{kind}/{devid}/backend"):
                    present.add((kind, int(devid)))
        return present

    async def _reconcile(self, nursery: trio.Nursery, *, wait: bool) -> None:
        present = await self._present()
        for key in [k for k in self.running if k not in present]:
            log.info("device detached", extra={"kv": {"kind": key[0], "devid": key[1]}})
            self.running.pop(key).cancel()
        for key in sorted(present - set(self.running)):
            scope = trio.CancelScope()
            self.running[key] = scope
            if wait:
                await nursery.start(self._run_device, key, scope)
            else:
                nursery.start_soon(self._run_device, key, scope)

    async def _run_device(self, key: tuple[str, int], scope: trio.CancelScope, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        kind, devid = key
        path = f"{self.base}/{kind}/{devid}"
        started = False
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    if kind == "vbd":
                        await self._start_vbd(nursery, devid)
                    else:
                        await self._start_vif(nursery, devid)
                    self.attached += 1
                    task_status.started()
                    started = True
        except Exception as exc:  # one device's failure must not take the guest down
            log.error("device failed", extra={"kv": {"kind": kind, "devid": devid, "error": repr(exc)}})
        finally:
            self.frontends.pop(key, None)
            if self.running.get(key) is scope:
                del self.running[key]
            if scope.cancelled_caught:
                self.detached += 1
                with trio.CancelScope(shield=True), contextlib.suppress(XenStoreError, OSError):
                    if not await self.xs.exists(f"{path}/backend"):
                        await self.xs.rm(path)  # what our frontend wrote after the detach
            if not started:
                task_status.started()

    async def _start_vbd(self, nursery: trio.Nursery, devid: int) -> None:
        from ringfence.frontends.blkfront.device import BlkFront
        from ringfence.frontends.blkfront.nbd import NbdServer
        backend = (await self.xs.read(f"{self.base}/vbd/{devid}/backend")).decode()
        name = (await self._read_or(f"{backend}/dev", str(devid).encode())).decode()
        if not name or "/" in name or name.startswith("."):
            name = str(devid)
        disk = BlkFront(self.domain, self.xs, devid)
        await nursery.start(disk.run)
        self.frontends[("vbd", devid)] = disk
        await nursery.start(NbdServer(disk).serve_unix, os.path.join(self.nbd_dir, f"{name}.sock"))

    async def _start_vif(self, nursery: trio.Nursery, devid: int) -> None:
        from ringfence.frontends.netfront.device import NetFront
        backend = (await self.xs.read(f"{self.base}/vif/{devid}/backend")).decode()
        addresses = tuple((await self._read_or(f"{backend}/ip", b"")).decode().split())
        front = NetFront(self.domain, self.xs, devid, ifname=f"eth{devid}", addresses=addresses)
        await nursery.start(front.run)
        self.frontends[("vif", devid)] = front

    async def _read_or(self, path: str, default: bytes) -> bytes:
        try:
            return await self.xs.read(path)
        except XenStoreError:
            return default

    async def _children(self, path: str) -> list[str]:
        try:
            return [c for c in await self.xs.directory(path) if c.isdigit()]
        except XenStoreError:
            return []
