"""What every backend driver does with its XenStore directory, as Linux's xenbus_probe
does for a driver domain: one device per ``backend/KIND/FRONTEND/DEVID`` the toolstack
writes, started once the directory is complete and cancelled when the toolstack removes
it (detach, or its guest destroyed)."""
from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import trio

from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.xs_wire import Op, XenStoreError
from ringfence.xenbus.client import XenStore
from ringfence.xenbus.paths import can_change_devices
from ringfence.xenbus.state import XenbusState

log = logging.getLogger(__name__)

Device = TypeVar("Device")


# A device's keys as its directory's scan read them (None: unreadable).
Found = dict[str, bytes | None]


async def serve_devices(xs: XenStore, base: str, keys: tuple[str, ...],
                        make: Callable[[str, int, int, Found | None], Device], *,
                        task_status: trio.TaskStatus[dict[tuple[int, int], Device]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``make(path, frontend, devid, found).run()`` for each device directory under
    ``base`` holding ``keys[0]``; the dict of running devices is given to the starter.
    ``found``: ``keys`` as read with the scan that found the device (a relaunched driver
    domain's device starts on them, without a round trip of its own), or None if the
    device is started again by a scan that took it for running."""
    complete_key = keys[0]
    devices: dict[tuple[int, int], Device] = {}
    scopes: dict[tuple[int, int], trio.CancelScope] = {}
    failures: dict[tuple[int, int], int] = {}
    # The keys below a device, most of them the backend's own writes, are sifted out by
    # the client (no task switch here for each). The first scan's listing comes with the
    # watch's registration: a relaunched driver domain handed its devices waits on each
    # round trip.
    async with trio.open_nursery() as nursery, xs.watch_and(
            base, [(Op.DIRECTORY, W.join(base), 0)],
            relevant=functools.partial(can_change_devices, base, key=complete_key)) as (events, (listing,)):
        task_status.started(devices)
        def start(key: tuple[int, int], path: str, found: Found | None) -> None:
            if key not in devices:
                devices[key] = make(path, *key, found)
                scopes[key] = trio.CancelScope()
                nursery.start_soon(_run, devices, scopes, failures, key)

        def scanned(complete: list[tuple[tuple[int, int], str, Found | None]]) -> None:
            """Start the devices a scan found, stop those it did not."""
            for key, device_path, found in complete:
                start(key, device_path, found)
            present = {key for key, _, _ in complete}
            for key in [k for k in devices if k not in present]:
                scopes[key].cancel()

        scanned(await _complete_devices(xs, base, keys, devices, listing))
        async for path, _ in events:
            # A toolstack writes a device as a burst of nodes: one scan answers them all.
            changed = [path]
            while True:
                try:
                    changed.append(events.receive_nowait()[0])
                except trio.WouldBlock:
                    break
            # A device whose complete key was just written starts after one read of its
            # keys (a relaunched driver domain handed its devices waits on this), not after
            # the scan, which then finds the others and the removals.
            fresh: dict[tuple[int, int], str] = {}
            for changed_path in changed:
                key, device_path = _written(base, changed_path, complete_key)
                if key is not None and key not in devices:
                    fresh[key] = device_path
            if fresh:
                replies = await xs.pipeline([(Op.READ, W.join(f"{device_path}/{name}"), 0)
                                             for device_path in fresh.values() for name in keys])
                for index, (key, device_path) in enumerate(fresh.items()):
                    found = _found(keys, replies[index * len(keys):(index + 1) * len(keys)])
                    if found is not None:
                        start(key, device_path, found)
            scanned(await _complete_devices(xs, base, keys, devices))


# What a backend's judge of its frontend's state says (follow_frontend).
Verdict = Literal["gone", "again", "wait"]


async def follow_frontend(xs: XenStore, frontend_path: str,
                          judge: Callable[[Any], Awaitable[Verdict]]) -> None:
    """One watch of the frontend's state for a device's life: ``judge(frontend_states)``
    after each event, until it says "gone". A connection it serves takes the watch's
    events while it lasts (:func:`watch_for_close`), so once it says "again" (a connection
    has ended) it is asked again at once: the event that ended the connection was taken,
    and the frontend may wait for us, with none to come."""
    async with xs.watch(f"{frontend_path}/state") as frontend_states:
        async for _ in frontend_states:
            verdict = await judge(frontend_states)
            while verdict == "again":
                verdict = await judge(frontend_states)
            if verdict == "gone":
                return


async def watch_for_close(xs: XenStore, frontend_path: str, frontend_states: Any,
                          scope: trio.CancelScope) -> None:
    """Cancel ``scope`` (a connection being served) once the frontend leaves it: its state
    is no longer Initialised or Connected (closing, closed, gone, starting over, or
    anything else it may write). ``frontend_states``: the events of the device's watch of
    that state, which the connection takes while it lasts."""
    async for _ in frontend_states:
        try:
            state = int(await xs.read(f"{frontend_path}/state"))
        except (XenStoreError, ValueError):
            state = XenbusState.Unknown
        if state not in (XenbusState.Initialised, XenbusState.Connected):
            scope.cancel()
            return


def _written(base: str, path: str, complete_key: str) -> tuple[tuple[int, int] | None, str]:
    """The device (frontend, devid) whose ``complete_key`` ``path`` is, and its directory."""
    parts = path[len(base):].strip("/").split("/") if path.startswith(base + "/") else []
    if len(parts) == 3 and parts[2] == complete_key and parts[0].isdigit() and parts[1].isdigit():
        return (int(parts[0]), int(parts[1])), f"{base}/{parts[0]}/{parts[1]}"
    return None, ""


def _found(keys: tuple[str, ...], replies: list[Any]) -> Found | None:
    """``keys``' values from their replies; None if the first, which says the device is
    complete, is not there."""
    if isinstance(replies[0], XenStoreError):
        return None
    return {name: None if isinstance(value, XenStoreError) else value for name, value in zip(keys, replies)}


async def _complete_devices(xs: XenStore, base: str, keys: tuple[str, ...], running: dict[tuple[int, int], Any],
                            listing: bytes | XenStoreError | None = None,
                            ) -> list[tuple[tuple[int, int], str, Found | None]]:
    """The device directories under ``base`` that hold ``keys[0]``, with ``keys`` as read
    for those not ``running`` (None for those running, of which only ``keys[0]`` is read):
    three round trips whatever their number (each level's requests go together), two
    given ``base``'s ``listing``."""
    if listing is None:
        (listing,) = await xs.pipeline([(Op.DIRECTORY, W.join(base), 0)])
    frontends = _numbered(listing)
    listings = await xs.pipeline([(Op.DIRECTORY, W.join(f"{base}/{fe}"), 0) for fe in frontends])
    candidates = [((int(fe), int(devid)), f"{base}/{fe}/{devid}")
                  for fe, listing in zip(frontends, listings) for devid in _numbered(listing)]
    wanted = [keys[:1] if key in running else keys for key, _ in candidates]
    replies = await xs.pipeline([(Op.READ, W.join(f"{path}/{name}"), 0)
                                 for (_, path), names in zip(candidates, wanted) for name in names])
    complete, at = [], 0
    for (key, path), names in zip(candidates, wanted):
        mine, at = replies[at:at + len(names)], at + len(names)
        if not isinstance(mine[0], XenStoreError):
            complete.append((key, path, _found(keys, mine) if len(names) == len(keys) else None))
    return complete


async def _run(devices: dict[tuple[int, int], Any], scopes: dict[tuple[int, int], trio.CancelScope],
               failures: dict[tuple[int, int], int], key: tuple[int, int]) -> None:
    try:
        with scopes[key]:
            await devices[key].run()
        failures.pop(key, None)
    except Exception as exc:  # one device's failure must never take the others down
        failures[key] = failures.get(key, 0) + 1
        log.error("device failed", extra={"kv": {"frontend": key[0], "devid": key[1],
                                                 "error": repr(exc), "failures": failures[key]}})
        # Restarted at the next change of its directory, but not in a loop: whatever a
        # frontend writes, a failing device costs at most a few starts per second. (A
        # scope serves one block: the wait gets its own, which a removal cancels too.)
        scopes[key] = backoff = trio.CancelScope()
        with backoff:
            await trio.sleep(min(0.05 * 2 ** failures[key], 5.0))
    finally:
        devices.pop(key, None)
        scopes.pop(key, None)


def _numbered(listing: bytes | XenStoreError) -> list[str]:
    """The numbered children a DIRECTORY reply names (none if it failed)."""
    return [] if isinstance(listing, XenStoreError) else [c for c in W.strings(listing) if c.isdigit()]

