"""Changing a running host: guests created and destroyed, disks and NICs attached and
detached, as xl does it — through XenStore, with the guest's and the driver domain's own
xenbus code doing the rest.

Detach follows the XenBus close handshake: the toolstack removes the frontend directory
(the guest closes the device), waits for the backend to reach Closed, then removes the
backend directory (the driver domain forgets the device).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import trio

from ringfence.errors import CommandError
from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.isolation.sandbox import sandbox_uid
from ringfence.toolstack.config import DiskSpec, DomainSpec, VifSpec, parse_disk, parse_vif
from ringfence.toolstack.devices import add_vbd, add_vif
from ringfence.xenbus.paths import DevicePaths
from ringfence.xenbus.state import XenbusState

log = logging.getLogger(__name__)

DETACH_TIMEOUT = 10.0


def find_guest(system: Any, name: str) -> Any:
    try:
        return system.guests[name]
    except KeyError:
        raise CommandError(f"no guest named {name!r} (see 'ringfence list')") from None


def _driver(system: Any, name: str, kind: str) -> int:
    if name not in system.driver_domids:
        raise CommandError(f"no driver domain named {name!r}")
    if system.driver_kinds.get(name, kind) != kind:
        raise CommandError(f"driver domain {name!r} serves {system.driver_kinds[name]} devices, not {kind}")
    return system.driver_domids[name]


async def _wait_for_node(path: str, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while not os.path.exists(path):
            await trio.sleep(0.02)


def _paths(system: Any, guest: Any, kind: str, devid: int, backend: str) -> DevicePaths:
    return DevicePaths(kind, guest.domid, system.driver_domids[backend], devid)


def check_image(system: Any, target: str) -> None:
    if not os.path.isfile(target):
        raise CommandError(f"{target}: no such image file")
    if system.sandboxed and os.path.realpath(target).startswith(("/tmp/", "/dev/shm/")):
        raise CommandError(f"{target}: driver domains have a private /tmp and /dev/shm; "
                           "put disk images elsewhere (e.g. /var/lib/ringfence)")


async def block_attach(system: Any, guest_name: str, spec_text: str) -> dict[str, Any]:
    guest = find_guest(system, guest_name)
    try:
        disk = parse_disk(spec_text)
    except ValueError as exc:
        raise CommandError(f"disk spec: {exc}") from None
    backend = _driver(system, disk.backend, "vbd")
    if any(d.devid == disk.devid for d in guest.disks):
        raise CommandError(f"{guest_name} already has {disk.vdev}")
    check_image(system, disk.target)
    if os.geteuid() == 0 and system.sandboxed:
        os.chown(disk.target, sandbox_uid(disk.backend), -1)  # the driver domain's own user
    guest.disks.append(disk)
    sock = guest.nbd_sockets[disk.vdev] = os.path.join(system.guest_home(guest), f"{disk.vdev}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)  # a leftover must not pass for the new export
    await add_vbd(system.xs, backend=backend, frontend=guest.domid, devid=disk.devid,
                  target=disk.target, mode=disk.mode, vdev=disk.vdev)
    await _wait_for_node(sock, 30)
    if not os.path.exists(sock):
        raise CommandError(f"{disk.vdev} did not come up within 30 s (see the driver domain's "
                           f"log: 'ringfence -v up'); detach it with 'ringfence block-detach {guest_name} {disk.vdev}'")
    log.info("vbd attached", extra={"kv": {"guest": guest_name, "vdev": disk.vdev, "backend": disk.backend}})
    return {"guest": guest_name, "vdev": disk.vdev, "devid": disk.devid, "nbd": f"nbd+unix:///?socket={sock}"}


async def block_detach(system: Any, guest_name: str, vdev: str) -> dict[str, Any]:
    guest = find_guest(system, guest_name)
    disk = next((d for d in guest.disks if d.vdev == vdev or str(d.devid) == vdev), None)
    if disk is None:
        raise CommandError(f"{guest_name} has no disk {vdev!r} (see 'ringfence block-list {guest_name}')")
    guest.disks.remove(disk)
    guest.nbd_sockets.pop(disk.vdev, None)
    seconds = await _detach(system, _paths(system, guest, "vbd", disk.devid, disk.backend), disk.backend)
    return {"guest": guest_name, "vdev": disk.vdev, "detach_ms": round(seconds * 1000, 1)}


async def network_attach(system: Any, guest_name: str, spec_text: str) -> dict[str, Any]:
    guest = find_guest(system, guest_name)
    try:
        vif = parse_vif(spec_text)
    except ValueError as exc:
        raise CommandError(f"vif spec: {exc}") from None
    backend = _driver(system, vif.backend, "vif")
    devid = max(guest.vifs, default=-1) + 1
    guest.vifs[devid] = vif
    await add_vif(system.xs, backend=backend, frontend=guest.domid, devid=devid, mac=vif.mac,
                  bridge=vif.bridge, ip=vif.ip)
    fe_state = f"{_paths(system, guest, 'vif', devid, vif.backend).frontend}/state"
    with trio.move_on_after(30):
        while (await _read_int(system.xs, fe_state)) != XenbusState.Connected:
            await trio.sleep(0.05)
    log.info("vif attached", extra={"kv": {"guest": guest_name, "devid": devid, "backend": vif.backend}})
    return {"guest": guest_name, "devid": devid, "ifname": f"eth{devid}", "mac": vif.mac}


async def network_detach(system: Any, guest_name: str, devid_text: str) -> dict[str, Any]:
    guest = find_guest(system, guest_name)
    devid = int(devid_text) if devid_text.isdigit() else next(
        (d for d, v in guest.vifs.items() if v.mac.lower() == devid_text.lower()), -1)
    vif = guest.vifs.pop(devid, None)
    if vif is None:
        raise CommandError(f"{guest_name} has no vif {devid_text!r} (see 'ringfence network-list {guest_name}')")
    seconds = await _detach(system, _paths(system, guest, "vif", devid, vif.backend), vif.backend)
    return {"guest": guest_name, "devid": devid, "detach_ms": round(seconds * 1000, 1)}


async def _detach(system: Any, paths: DevicePaths, driver: str) -> float:
    started = time.monotonic()
    xs = system.xs
    backends = [paths.backend]
    spare, staged = system.spares.get(driver), (paths.kind, paths.frontend_domid, paths.devid)
    if spare is not None and staged in spare.staged:
        # What was staged for the warm spare goes too: it must not outlive the device. Its
        # backend may serve a standby link, which closes with the frontend's directory.
        spare.staged.discard(staged)
        backends.append(DevicePaths(paths.kind, paths.frontend_domid, spare.domid, paths.devid).backend)
    async for tx in xs.transaction():
        async with tx:
            for backend in backends:
                if await tx.exists(backend):
                    await tx.write(f"{backend}/online", "0")
            if await tx.exists(paths.frontend):
                await tx.rm(paths.frontend)
    for backend in backends:
        with trio.move_on_after(DETACH_TIMEOUT) as waited:
            while (await _read_int(xs, f"{backend}/state")) not in (
                    XenbusState.Closed, XenbusState.Unknown, XenbusState.InitWait):
                await trio.sleep(0.02)
        if waited.cancelled_caught:
            log.warning("backend did not close in time; removing it anyway",
                        extra={"kv": {"backend": backend}})
        with contextlib.suppress(XenStoreError):
            await xs.rm(backend)
        parent = backend.rsplit("/", 1)[0]  # backend/KIND/FE, once its last device is gone
        with contextlib.suppress(XenStoreError):
            if not await xs.directory(parent):
                await xs.rm(parent)
    return time.monotonic() - started


async def _read_int(xs: Any, path: str) -> int:
    try:
        return int(await xs.read(path))
    except (XenStoreError, ValueError):
        return XenbusState.Unknown


async def inject_disk_fault(system: Any, driver: str, fault: str) -> dict[str, Any]:
    """Make every disk a storage driver domain serves fail (``eio``), fail its next N
    requests (``eio:N``), or heal (``""``): through its backend directories, as a dying
    disk would look to the driver domain."""
    _driver(system, driver, "vbd")
    paths = [f"{_paths(system, g, 'vbd', d.devid, driver).backend}/fault-inject"
             for g in system.guests.values() for d in g.disks if d.backend == driver]
    await system.xs.write_many([(path, fault) for path in paths])
    log.warning("disk fault injected", extra={"kv": {"driver": driver, "fault": fault or "healed",
                                                     "disks": len(paths)}})
    return {"driver": driver, "fault": fault or "healed", "disks": len(paths)}


async def squeeze_domain(system: Any, driver: str, limit: str) -> dict[str, Any]:
    """Lower a driver domain's memory limit to ``limit`` bytes (its cgroup's), until it
    starts again: below what it uses, the kernel reclaims, then kills in it, and its
    supervisor relaunches it with its own limit."""
    service = system.drivers.get(driver)
    if service is None:
        raise CommandError(f"no driver domain named {driver!r}")
    process = service.process
    try:
        if process is None or not process.cgroup.set_memory_max(int(limit)):
            raise CommandError(f"{driver} has no memory cgroup to squeeze (not running, or not sandboxed)")
    except OSError as exc:  # cgroup v1 refuses a limit it cannot reclaim down to (EBUSY)
        raise CommandError(f"{driver} uses {process.cgroup.memory_bytes()} bytes and the kernel could "
                           f"not reclaim them down to {limit} ({exc.strerror}): try a larger limit") from None
    using = process.cgroup.memory_bytes()
    log.warning("memory squeezed", extra={"kv": {"driver": driver, "limit": limit, "using": using}})
    return {"driver": driver, "limit": int(limit), "using": using}


def block_list(system: Any, guest_name: str) -> list[dict[str, Any]]:
    guest = find_guest(system, guest_name)
    return [{"vdev": d.vdev, "devid": d.devid, "backend": d.backend, "target": d.target,
             "access": d.access, "nbd": f"nbd+unix:///?socket={guest.nbd_sockets.get(d.vdev, '')}"}
            for d in guest.disks]


def network_list(system: Any, guest_name: str) -> list[dict[str, Any]]:
    guest = find_guest(system, guest_name)
    return [{"devid": devid, "ifname": f"eth{devid}", "mac": v.mac, "backend": v.backend,
             "bridge": v.bridge, "ip": list(v.ip)} for devid, v in sorted(guest.vifs.items())]


async def destroy_guest(system: Any, name: str) -> dict[str, Any]:
    """Kill the guest, close its devices in the driver domains, forget its XenStore tree."""
    guest = find_guest(system, name)
    started = time.monotonic()
    if guest.process is not None:
        guest.process.kill()
        with trio.move_on_after(10):
            await guest.process.wait()
    for disk in list(guest.disks):
        await _detach(system, _paths(system, guest, "vbd", disk.devid, disk.backend), disk.backend)
    for devid, vif in list(guest.vifs.items()):
        await _detach(system, _paths(system, guest, "vif", devid, vif.backend), vif.backend)
    with contextlib.suppress(XenStoreError):
        await system.xs.rm(f"/local/domain/{guest.domid}")
    del system.guests[name]
    log.info("guest destroyed", extra={"kv": {"guest": name, "domid": guest.domid}})
    return {"guest": name, "domid": guest.domid, "ms": round((time.monotonic() - started) * 1000, 1)}


def parse_guest_spec(data: dict[str, Any], source: str) -> DomainSpec:
    """One guest for ``ringfence create``: the same keys as a config's [[domain]]."""
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise CommandError(f"{source}: key 'name' must be a non-empty string")
    if data.get("kind", "guest") != "guest":
        raise CommandError(f"{source}: key 'kind': only guests can be created on a running host")
    disks: list[DiskSpec] = []
    vifs: list[VifSpec] = []
    for key, parse, out in (("disks", parse_disk, disks), ("vifs", parse_vif, vifs)):
        for j, raw in enumerate(data.get(key, [])):
            try:
                out.append(parse(raw))
            except (ValueError, TypeError) as exc:
                raise CommandError(f"{source}: key '{key}[{j}]': {exc}") from None
    return DomainSpec(name, "guest", disks, vifs)


def describe(system: Any) -> list[dict[str, Any]]:
    rows = []
    for name, service in system.drivers.items():
        stats = service.statistics()
        spare = system.spares.get(name)
        rows.append({"name": name, "kind": "driver", "serves": system.driver_kinds.get(name, ""),
                     "domid": system.driver_domids.get(name), "state": service.state.value,
                     "starts": stats.starts, "crashes": stats.crashes,
                     "spare": (spare.domid if system.spare_ready(name) else "starting") if spare else None})
    for guest in system.guests.values():
        alive = guest.process is not None and guest.process.poll() is None
        rows.append({"name": guest.name, "kind": "guest", "domid": guest.domid,
                     "state": "running" if alive else "dead", "disks": len(guest.disks),
                     "vifs": len(guest.vifs)})
    return rows


__all__ = ["block_attach", "block_detach", "block_list", "network_attach", "network_detach",
           "network_list", "destroy_guest", "parse_guest_spec", "describe"]
