"""Device set-up in XenStore, as Xen's toolstack (libxl) lays it out."""
from __future__ import annotations

from typing import Any

from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.xs_wire import Op, XenStoreError
from ringfence.xenbus.client import XenStore
from ringfence.xenbus.paths import DevicePaths
from ringfence.xenbus.state import XenbusState


async def add_vbd(xs: XenStore, *, backend: int, frontend: int, devid: int, target: str,
                  mode: str = "w", vdev: str = "xvda", replaces: str | None = None) -> DevicePaths:
    """Write the backend and frontend directories of a virtual block device.

    The backend directory belongs to the driver domain and is readable by the guest; the
    frontend directory belongs to the guest and is readable by the driver domain.
    """
    paths = DevicePaths("vbd", frontend, backend, devid)
    await _write_device(xs, paths,
                        (("frontend", paths.frontend), ("frontend-id", frontend), ("params", target),
                         ("mode", mode), ("online", 1), ("type", "raw"), ("dev", vdev)),
                        (("virtual-device", devid), ("device-type", "disk")), replaces=replaces)
    return paths


async def _write_device(xs: XenStore, paths: DevicePaths, backend_keys: Any, frontend_keys: Any,
                        *, replaces: str | None = None) -> None:
    """Both halves of a device, with their permissions, in one transaction: a driver domain
    watching its directory never sees a node it may not read yet. ``replaces``: the backend
    directory of a driver domain that died, removed in the same transaction (the frontend
    then sees its new backend and the old one gone at once, and keeps its own state).
    Four round trips in all: a handover after a crash waits on this."""
    be, fe = paths.backend, paths.frontend
    backend, frontend, kind = paths.backend_domid, paths.frontend_domid, paths.kind
    async for tx in xs.transaction():
        async with tx:
            writes = [(f"{be}/{key}", value) for key, value in
                      (*backend_keys, ("state", int(XenbusState.Initialising)))]
            writes += [(f"{fe}/{key}", value) for key, value in
                       (("backend", be), ("backend-id", backend), *frontend_keys)]
            halves = ((be, backend, frontend), (fe, frontend, backend))
            requests = [(Op.WRITE, W.write_payload(path, str(value)), tx.id) for path, value in writes]
            requests += [(Op.READ, W.join(f"{fe}/state"), tx.id)]
            requests += [(Op.DIRECTORY, W.join(top), tx.id) for top, _, _ in halves]
            *written, fe_state, be_list, fe_list = await xs.pipeline(requests)
            for result in (*written, be_list, fe_list):
                if isinstance(result, XenStoreError):
                    raise result
            # Each domain owns its own directory; each half is readable by the other.
            perms = [(f"/local/domain/{d}", [f"n{d}"]) for d in (backend, frontend)]
            perms += [(parent, [f"n{backend}"]) for parent in (
                f"/local/domain/{backend}/backend", f"/local/domain/{backend}/backend/{kind}",
                f"/local/domain/{backend}/backend/{kind}/{frontend}")]
            perms += [(parent, [f"n{frontend}"]) for parent in (
                f"/local/domain/{frontend}/device", f"/local/domain/{frontend}/device/{kind}")]
            for (top, owner, reader), listing in zip(halves, (be_list, fe_list)):
                nodes = [top] + [f"{top}/{child}" for child in W.strings(listing)]  # type: ignore[arg-type]
                perms += [(node, [f"n{owner}", f"r{reader}"]) for node in nodes]
            requests = [(Op.SET_PERMS, W.join(path, *p), tx.id) for path, p in perms]
            if isinstance(fe_state, XenStoreError):  # a new frontend starts Initialising;
                # a live one keeps its own state
                requests.append((Op.WRITE, W.write_payload(f"{fe}/state", str(int(XenbusState.Initialising))), tx.id))
                requests.append((Op.SET_PERMS, W.join(f"{fe}/state", f"n{frontend}", f"r{backend}"), tx.id))
            if replaces is not None:
                requests.append((Op.RM, W.join(replaces), tx.id))
            for result in await xs.pipeline(requests):
                if isinstance(result, XenStoreError) and not (
                        result.name == "ENOENT" and replaces is not None):  # gone with its domain
                    raise result


async def move_vbd(xs: XenStore, *, old_backend: int, new_backend: int, frontend: int,
                   devid: int, target: str, mode: str = "w") -> DevicePaths:
    """Hand a vbd to a relaunched driver domain: the new backend directory first, then the
    frontend's pointers, then the old directory goes (which is what the frontend watches)."""
    old = DevicePaths("vbd", frontend, old_backend, devid)
    return await add_vbd(xs, backend=new_backend, frontend=frontend, devid=devid,
                         target=target, mode=mode, replaces=old.backend)


async def add_vif(xs: XenStore, *, backend: int, frontend: int, devid: int, mac: str,
                  bridge: str = "xenbr0", ip: tuple[str, ...] = (), mtu: int | None = None,
                  replaces: str | None = None) -> DevicePaths:
    """Write the backend and frontend directories of a virtual network interface (``ip``
    as libxl writes it: space-separated; a sim guest configures these addresses itself;
    ``mtu`` for the vif in the driver domain, 1500 when absent)."""
    paths = DevicePaths("vif", frontend, backend, devid)
    await _write_device(xs, paths,
                        (("frontend", paths.frontend), ("frontend-id", frontend), ("mac", mac),
                         ("bridge", bridge), ("online", 1), ("handle", devid),
                         *((("ip", " ".join(ip)),) if ip else ()),
                         *((("mtu", mtu),) if mtu else ())),
                        (("mac", mac), ("handle", devid)), replaces=replaces)
    return paths


async def move_vif(xs: XenStore, *, old_backend: int, new_backend: int, frontend: int,
                   devid: int, mac: str, bridge: str = "xenbr0",
                   ip: tuple[str, ...] = ()) -> DevicePaths:
    """Hand a vif to a relaunched network driver domain (see :func:`move_vbd`)."""
    old = DevicePaths("vif", frontend, old_backend, devid)
    return await add_vif(xs, backend=new_backend, frontend=frontend, devid=devid, mac=mac,
                         bridge=bridge, ip=ip, replaces=old.backend)
