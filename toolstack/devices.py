"""Device set-up in XenStore, as Xen's toolstack (libxl) lays it out."""
from __future__ import annotations

from typing import Any

from ringfence.hypervisor.io.xs_wire import XenStoreError
from ringfence.xenbus.client import XenStore, gather
from ringfence.xenbus.paths import DevicePaths
from ringfence.xenbus.state import XenbusState


async def add_vbd(xs: XenStore, *, backend: int, frontend: int, devid: int, target: str,
                  mode: str = "w", vdev: str = "xvda") -> DevicePaths:
    """Write the backend and frontend directories of a virtual block device.

    The backend directory belongs to the driver domain and is readable by the guest; the
    frontend directory belongs to the guest and is readable by the driver domain.
    """
    paths = DevicePaths("vbd", frontend, backend, devid)
    await _write_device(xs, paths,
                        (("frontend", paths.frontend), ("frontend-id", frontend), ("params", target),
                         ("mode", mode), ("online", 1), ("type", "raw"), ("dev", vdev)),
                        (("virtual-device", devid), ("device-type", "disk")))
    return paths


async def _write_device(xs: XenStore, paths: DevicePaths, backend_keys: Any, frontend_keys: Any) -> None:
    """Both halves of a device, with their permissions, in one transaction: a driver domain
    watching its directory never sees a node it may not read yet. The requests of each step
    go out together (pipelined): a handover after a crash waits on this."""
    be, fe = paths.backend, paths.frontend
    backend, frontend, kind = paths.backend_domid, paths.frontend_domid, paths.kind
    async for tx in xs.transaction():
        async with tx:
            fresh = not await tx.exists(f"{fe}/state")
            writes = [(f"{be}/{key}", value) for key, value in
                      (*backend_keys, ("state", int(XenbusState.Initialising)))]
            writes += [(f"{fe}/{key}", value) for key, value in
                       (("backend", be), ("backend-id", backend), *frontend_keys,
                        ("state", int(XenbusState.Initialising)))
                       if key != "state" or fresh]  # a live frontend keeps its own state
            await tx.write_many([(path, str(value)) for path, value in writes])
            # Each domain owns its own directory; each half is readable by the other.
            perms = [(f"/local/domain/{d}", [f"n{d}"]) for d in (backend, frontend)]
            perms += [(parent, [f"n{backend}"]) for parent in (
                f"/local/domain/{backend}/backend", f"/local/domain/{backend}/backend/{kind}",
                f"/local/domain/{backend}/backend/{kind}/{frontend}")]
            perms += [(parent, [f"n{frontend}"]) for parent in (
                f"/local/domain/{frontend}/device", f"/local/domain/{frontend}/device/{kind}")]
            halves = ((be, backend, frontend), (fe, frontend, backend))
            listings = await gather([xs.directory(top, tx.id) for top, _, _ in halves])
            for (top, owner, reader), children in zip(halves, listings):
                nodes = [top] + [f"{top}/{child}" for child in children]
                perms += [(node, [f"n{owner}", f"r{reader}"]) for node in nodes]
            await gather([xs.set_perms(path, p, tx.id) for path, p in perms])


async def move_vbd(xs: XenStore, *, old_backend: int, new_backend: int, frontend: int,
                   devid: int, target: str, mode: str = "w") -> DevicePaths:
    """Hand a vbd to a relaunched driver domain: the new backend directory first, then the
    frontend's pointers, then the old directory goes (which is what the frontend watches)."""
    old = DevicePaths("vbd", frontend, old_backend, devid)
    paths = await add_vbd(xs, backend=new_backend, frontend=frontend, devid=devid,
                          target=target, mode=mode)
    try:
        await xs.rm(old.backend)
    except XenStoreError:  # already gone with its domain
        pass
    return paths


async def add_vif(xs: XenStore, *, backend: int, frontend: int, devid: int, mac: str,
                  bridge: str = "xenbr0", ip: tuple[str, ...] = (), mtu: int | None = None) -> DevicePaths:
    """Write the backend and frontend directories of a virtual network interface (``ip``
    as libxl writes it: space-separated; a sim guest configures these addresses itself;
    ``mtu`` for the vif in the driver domain, 1500 when absent)."""
    paths = DevicePaths("vif", frontend, backend, devid)
    await _write_device(xs, paths,
                        (("frontend", paths.frontend), ("frontend-id", frontend), ("mac", mac),
                         ("bridge", bridge), ("online", 1), ("handle", devid),
                         *((("ip", " ".join(ip)),) if ip else ()),
                         *((("mtu", mtu),) if mtu else ())),
                        (("mac", mac), ("handle", devid)))
    return paths


async def move_vif(xs: XenStore, *, old_backend: int, new_backend: int, frontend: int,
                   devid: int, mac: str, bridge: str = "xenbr0",
                   ip: tuple[str, ...] = ()) -> DevicePaths:
    """Hand a vif to a relaunched network driver domain (see :func:`move_vbd`)."""
    old = DevicePaths("vif", frontend, old_backend, devid)
    paths = await add_vif(xs, backend=new_backend, frontend=frontend, devid=devid, mac=mac,
                          bridge=bridge, ip=ip)
    try:
        await xs.rm(old.backend)
    except XenStoreError:
        pass
    return paths
