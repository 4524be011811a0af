"""The control socket of a running host (``RUNTIME_DIR/control.sock``, root only).

``ringfence up`` serves it; the xl-style subcommands (``list``, ``create``, ``destroy``,
``block-attach``, ``stats``, ...) are its clients. One request per connection, one JSON
line each way: ``{"op": "block-list", "args": {"guest": "guest1"}}`` is answered by
``{"ok": true, "result": [...]}`` or ``{"ok": false, "error": "one line"}``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ringfence._unixsock import listen_unix
from ringfence.errors import CommandError
from ringfence.isolation.sandbox import innermost_pid
from ringfence.toolstack import hotplug

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10
SOCKET_NAME = "control.sock"


def control_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "value"):  # enums
        return value.value
    return repr(value)


async def _create(system: Any, args: dict[str, Any]) -> Any:
    spec = hotplug.parse_guest_spec(args.get("domain") or {}, args.get("source", "<request>"))
    guest = await system.add_guest(spec)
    return {"guest": guest.name, "domid": guest.domid,
            "disks": {vdev: f"nbd+unix:///?socket={sock}" for vdev, sock in guest.nbd_sockets.items()},
            "vifs": hotplug.network_list(system, guest.name)}


async def _statistics(system: Any, args: dict[str, Any]) -> Any:
    return await system.statistics()


async def _guest_pid(system: Any, args: dict[str, Any]) -> Any:
    from ringfence.toolstack.system import guest_pid
    guest = hotplug.find_guest(system, str(args.get("guest")))
    return {"guest": guest.name, "pid": guest_pid(guest)}


def _sync(function: Callable[..., Any], *keys: str) -> Callable[[Any, dict[str, Any]], Awaitable[Any]]:
    async def call(system: Any, args: dict[str, Any]) -> Any:
        return function(system, *(str(args.get(k, "")) for k in keys))
    return call


def _async(function: Callable[..., Awaitable[Any]], *keys: str) -> Callable[[Any, dict[str, Any]], Awaitable[Any]]:
    async def call(system: Any, args: dict[str, Any]) -> Any:
        return await function(system, *(str(args.get(k, "")) for k in keys))
    return call


async def _service_pid(system: Any, args: dict[str, Any]) -> Any:
    name = str(args.get("service"))
    service = system.xenstored if name == "xenstored" else system.drivers.get(name)
    if service is None:
        raise CommandError(f"no supervised service named {name!r}")
    process = service.process
    alive = process is not None and process.process.poll() is None
    return {"service": name, "pid": innermost_pid(process.process.pid) if alive else 0,
            "state": service.state.value}


OPS: dict[str, Callable[[Any, dict[str, Any]], Awaitable[Any]]] = {
    "service-pid": _service_pid,
    "disk-fault": _async(hotplug.inject_disk_fault, "driver", "fault"),
    "squeeze": _async(hotplug.squeeze_domain, "driver", "limit"),
    "list": _sync(hotplug.describe),
    "stats": _statistics,
    "create": _create,
    "destroy": _async(hotplug.destroy_guest, "guest"),
    "guest-pid": _guest_pid,
    "block-attach": _async(hotplug.block_attach, "guest", "spec"),
    "block-detach": _async(hotplug.block_detach, "guest", "device"),
    "block-list": _sync(hotplug.block_list, "guest"),
    "network-attach": _async(hotplug.network_attach, "guest", "spec"),
    "network-detach": _async(hotplug.network_detach, "guest", "device"),
    "network-list": _sync(hotplug.network_list, "guest"),
}


async def serve_control(system: Any, path: str, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    listener = await listen_unix(path, backlog=16)  # the host's controls: root only
    # Requests change shared state (guests, devices): one at a time, as xl takes its lock.
    lock = trio.Lock()
    counters = {"requests": 0, "errors": 0}
    system.control_statistics = counters
    async with trio.open_nursery() as nursery:
        task_status.started()
        try:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_serve_one, system, trio.SocketStream(conn), lock, counters)
        finally:
            listener.close()
            with trio.CancelScope(shield=True):
                if os.path.exists(path):
                    os.unlink(path)


async def _serve_one(system: Any, stream: trio.SocketStream, lock: trio.Lock,
                     counters: dict[str, int]) -> None:
    async with stream:
        try:
            request = await _read_line(stream)
            op, args = request.get("op"), request.get("args") or {}
            if op not in OPS or not isinstance(args, dict):
                raise CommandError(f"unknown request {op!r}")
            counters["requests"] += 1
            async with lock:
                result = await OPS[op](system, args)
            reply = {"ok": True, "result": result}
        except (CommandError, ValueError, OSError) as exc:
            counters["errors"] += 1
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug costs one request, never the host
            counters["errors"] += 1
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {exc!r}"}
        try:
            await stream.send_all(json.dumps(reply, default=_jsonable).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _read_line(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    with trio.fail_after(10):
        while b"\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise CommandError("request too large")
    try:
        request = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        raise CommandError("request is not JSON") from None
    if not isinstance(request, dict):
        raise CommandError("request is not a JSON object")
    return request


def call(runtime_dir: str, op: str, timeout: float = 120, **args: Any) -> Any:
    """Client side (blocking): one request to the running host; CommandError on failure."""
    path = control_path(runtime_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise CommandError(f"no running host at {runtime_dir} (start one with 'ringfence up')") from None
        except PermissionError:
            raise CommandError(f"{path}: permission denied (the host's controls are root's)") from None
        sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise CommandError(f"the host did not answer {op!r} within {timeout:.0f} s") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise CommandError("the host closed the control connection without an answer") from None
    if not reply.get("ok"):
        raise CommandError(reply.get("error", "failed"))
    return reply.get("result")
