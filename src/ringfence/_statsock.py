"""A domain's statistics, on request: ``$RINGFENCE_STATS_SOCKET`` names a Unix socket on
which the domain process answers each connection with one JSON document (its rings, devices
and counters) and closes. The toolstack gathers them for ``ringfence stats``. Like
sd_notify, a missing variable makes serving a no-op, so domains call it unconditionally.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import trio

from ringfence._unixsock import listen_unix

STATS_SOCKET_ENV = "RINGFENCE_STATS_SOCKET"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return repr(value)


async def serve_statistics(provider: Callable[[], Any], path: str | None = None, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    path = path if path is not None else os.environ.get(STATS_SOCKET_ENV)
    if not path:
        task_status.started()
        return
    listener = await listen_unix(path, backlog=8)
    task_status.started()
    with listener:
        while True:
            conn, _ = await listener.accept()
            with conn:
                try:
                    document = json.dumps(provider(), default=_jsonable).encode()
                except Exception as exc:  # statistics must never cost the domain
                    document = json.dumps({"error": repr(exc)}).encode()
                with trio.move_on_after(2), contextlib.suppress(OSError):
                    view = memoryview(document)
                    while view:
                        view = view[await conn.send(view):]


async def fetch_statistics(path: str, timeout: float = 2.0) -> Any:
    """The other side: one document from a domain's statistics socket, or an error dict."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            async with stream:
                chunks = []
                while chunk := await stream.receive_some(1 << 16):
                    chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:  # it died meanwhile
        return {"error": f"no statistics: {exc!r}"}
