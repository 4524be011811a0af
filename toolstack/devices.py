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
    await _write_device(xs, paths, *_vbd_keys(paths, target=target, mode=mode, vdev=vdev),
                        replaces=replaces)
    return paths


def _vbd_keys(paths: DevicePaths, *, target: str, mode: str = "w", vdev: str = "xvda") -> tuple[Any, Any]:
    return ((("frontend", paths.frontend), ("frontend-id", paths.frontend_domid), ("params", target),
             ("mode", mode), ("online", 1), ("type", "raw"), ("dev", vdev)),
            (("virtual-device", paths.devid), ("device-type", "disk")))


async def _write_device(xs: XenStore, paths: DevicePaths, backend_keys: Any, frontend_keys: Any,
                        *, replaces: str | None = None, staged_beside: int | None = None,
                        standby: str | None = None) -> None:
    """Both halves of a device, with their permissions, in one transaction: a driver domain
    watching its directory never sees a node it may not read yet. ``replaces``: the backend
    directory of a driver domain that died, removed in the same transaction (the frontend
    then sees its new backend and the old one gone at once); the frontend's state goes back
    to Initialising with it, as in switch_backends: its Connected was the dead backend's,
    and a new backend up already (a warm spare handed the device whole) would act on it,
    with keys it may not read, before the frontend says otherwise.
    Four round trips in all: a handover after a crash waits on this.

    ``staged_beside``: the domid of the driver domain serving the device now; the backend
    half is written for a warm spare and the frontend's is left pointing at the current
    one, readable by both (:func:`stage_device`). ``standby``: the frontend's directory
    the spare's backend serves instead of the device's own (its ``backend``, ``backend-id``
    and ``state``, readable by the spare), named in the device's ``standby``; the device's
    own keys then stay unreadable by the spare, which reads the standby directory only."""
    be, fe = paths.backend, paths.frontend
    backend, frontend, kind = paths.backend_domid, paths.frontend_domid, paths.kind
    readers = [f"r{backend}"] if staged_beside is None else [f"r{staged_beside}", f"r{backend}"]
    # A node takes its parent's permissions when it is created (as in Xen's daemons): the
    # backend's directory, and the standby one, get theirs before their keys are written,
    # one request for each directory rather than one for each key.
    backend_perms = [f"n{backend}", f"r{frontend}"]
    async for tx in xs.transaction():
        async with tx:
            def perms_of(path: str, perms: list[str]) -> tuple[int, bytes, int]:
                return Op.SET_PERMS, W.join(path, *perms), tx.id

            def writes(*items: tuple[str, Any]) -> list[tuple[int, bytes, int]]:
                return [(Op.WRITE, W.write_payload(path, str(value)), tx.id) for path, value in items]

            # (Keys of a backend directory there already, rarely, get theirs below.)
            requests = [(Op.DIRECTORY, W.join(be), tx.id), (Op.MKDIR, W.join(be), tx.id),
                        perms_of(f"/local/domain/{backend}", [f"n{backend}"]),
                        *(perms_of(parent, [f"n{backend}"]) for parent in (
                            f"/local/domain/{backend}/backend", f"/local/domain/{backend}/backend/{kind}",
                            f"/local/domain/{backend}/backend/{kind}/{frontend}")),
                        perms_of(be, backend_perms)]
            if standby is not None:
                # The spare's own frontend directory, and where the frontend looks for it.
                requests += [(Op.MKDIR, W.join(standby), tx.id), perms_of(standby, [f"n{frontend}", f"r{backend}"]),
                             *writes((f"{standby}/backend", be), (f"{standby}/backend-id", backend),
                                     (f"{standby}/state", int(XenbusState.Initialising)), (f"{fe}/standby", standby))]
            requests += writes(*((f"{be}/{key}", value) for key, value in
                                 (*backend_keys, ("state", int(XenbusState.Initialising)))))
            if staged_beside is None:
                requests += writes(*((f"{fe}/{key}", value) for key, value in
                                     (("backend", be), ("backend-id", backend), *frontend_keys)))
            requests += [(Op.READ, W.join(f"{fe}/state"), tx.id), (Op.DIRECTORY, W.join(fe), tx.id)]
            be_before, *written, fe_state, fe_list = await xs.pipeline(requests)
            for result in (*written, fe_list):
                if isinstance(result, XenStoreError):
                    raise result
            requests = [perms_of(f"{be}/{key}", backend_perms) for key in (
                [] if isinstance(be_before, XenStoreError) else W.strings(be_before))]
            if isinstance(fe_state, XenStoreError):
                # A new device (no state yet): its parents get the frontend's permissions. A
                # device there already had them given (again, they would fire the guest's
                # watch on its devices, and it would read them all over, at each crash and
                # each staging).
                requests += [perms_of(parent, [f"n{frontend}"]) for parent in (
                    f"/local/domain/{frontend}", f"/local/domain/{frontend}/device",
                    f"/local/domain/{frontend}/device/{kind}")]
            if standby is None:
                # The frontend's keys, there already, become readable by the new backend. A
                # spare on a standby link reads the standby directory only.
                requests += [perms_of(node, [f"n{frontend}", *readers]) for node in
                             [fe] + [f"{fe}/{child}" for child in W.strings(fe_list)]]  # type: ignore[arg-type]
            if (isinstance(fe_state, XenStoreError) or replaces is not None) and staged_beside is None:
                # a new frontend starts Initialising; a live one keeps its own state, unless
                # that was with a backend now dead
                requests += writes((f"{fe}/state", int(XenbusState.Initialising)))
                requests.append(perms_of(f"{fe}/state", [f"n{frontend}", *readers]))
            if replaces is not None:
                requests.append((Op.RM, W.join(replaces), tx.id))
            for result in await xs.pipeline(requests):
                if isinstance(result, XenStoreError) and not (
                        result.name == "ENOENT" and replaces is not None):  # gone with its domain
                    raise result


async def stage_device(xs: XenStore, paths: DevicePaths, current_backend: int, **keys: Any) -> bool:
    """Write a device's backend half for a warm spare (``paths.backend_domid``) while the
    driver domain ``current_backend`` still serves it: the spare's backend starts on it,
    publishes its features and InitWait and waits, for it connects only to a frontend that
    names it (``backend``); the frontend's directory becomes readable by the spare too. A
    takeover then only points the frontend at the spare (:func:`switch_backends`). ``keys``:
    as for :func:`add_vbd` or :func:`add_vif`, by ``paths.kind``.

    A vbd whose frontend offers ``feature-standby`` (ringfence's blkfront) is staged on a
    standby directory of the frontend's instead (``DevicePaths.standby``), which the frontend
    connects over beforehand, on rings of its own, so that a takeover does no handshake at
    all: the frontend switches to that link and replays. The spare reads that directory
    only: the device's own directory is not made readable by it. Returns whether it was."""
    if paths.kind == "vif" or (await xs.read_many([f"{paths.frontend}/feature-standby"]))[0] != b"1":
        backend_keys = (_vbd_keys if paths.kind == "vbd" else _vif_keys)(paths, **keys)[0]
        await _write_device(xs, paths, backend_keys, (), staged_beside=current_backend)
        return False
    # A vbd's backend serves a standby directory of the frontend's (DevicePaths.standby), which the
    # frontend connects over beforehand: a takeover then only switches links.
    standby = paths.standby
    backend_keys = tuple(("frontend", standby) if key == "frontend" else (key, value)
                         for key, value in _vbd_keys(paths, **keys)[0])
    await _write_device(xs, paths, backend_keys, (), staged_beside=current_backend, standby=standby)
    return True


async def switch_backends(xs: XenStore, moves: list[tuple[DevicePaths, DevicePaths, bool]]) -> None:
    """Point frontends at the warm spare their devices were staged for, (old, new, on a
    standby link) a device, in one pipeline that the daemon applies in order (a takeover
    waits on no transaction, and a guest's own write cannot make it start over): each
    frontend is reset to Initialising first (its Connected was the dead backend's: the spare
    must not act on the keys that went with it, and it acts only for a frontend that names
    it), then names its new backend, and last the old backend directory goes, which is what
    the frontend watches. A frontend on a standby link keeps its state: the spare serves
    that link's keys, and the frontend may have switched to it already (told on its
    takeover channel). Should the daemon restart part way, the client sends again what it
    had not answered."""
    requests = []
    for old, new, on_standby in moves:
        fe = new.frontend
        keys = (("backend-id", new.backend_domid), ("backend", new.backend))
        if not on_standby:
            keys = (("state", int(XenbusState.Initialising)), *keys)
        requests += [(Op.WRITE, W.write_payload(f"{fe}/{key}", str(value)), 0) for key, value in keys]
        requests.append((Op.RM, W.join(old.backend), 0))
    for result in await xs.pipeline(requests):
        if isinstance(result, XenStoreError) and result.name != "ENOENT":  # gone with its domain
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
    await _write_device(xs, paths, *_vif_keys(paths, mac=mac, bridge=bridge, ip=ip, mtu=mtu),
                        replaces=replaces)
    return paths


def _vif_keys(paths: DevicePaths, *, mac: str, bridge: str = "xenbr0", ip: tuple[str, ...] = (),
              mtu: int | None = None) -> tuple[Any, Any]:
    return ((("frontend", paths.frontend), ("frontend-id", paths.frontend_domid), ("mac", mac),
             ("bridge", bridge), ("online", 1), ("handle", paths.devid),
             *((("ip", " ".join(ip)),) if ip else ()), *((("mtu", mtu),) if mtu else ())),
            (("mac", mac), ("handle", paths.devid)))


async def move_vif(xs: XenStore, *, old_backend: int, new_backend: int, frontend: int,
                   devid: int, mac: str, bridge: str = "xenbr0",
                   ip: tuple[str, ...] = ()) -> DevicePaths:
    """Hand a vif to a relaunched network driver domain (see :func:`move_vbd`)."""
    old = DevicePaths("vif", frontend, old_backend, devid)
    return await add_vif(xs, backend=new_backend, frontend=frontend, devid=devid, mac=mac,
                         bridge=bridge, ip=ip, replaces=old.backend)
