"""Listening Unix sockets whose path appears only once they accept connections.

Bound under a temporary name, listening, then renamed into place: a client that waits for
the path and connects never meets ECONNREFUSED (bind creates the file before listen).
"""
from __future__ import annotations

import contextlib
import os
import socket

import trio


async def listen_unix(path: str, *, backlog: int = 64, private: bool = True,
                      kind: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
    """A listening socket at ``path`` (mode 0600 when ``private``), replacing whatever was
    there."""
    sock = trio.socket.socket(socket.AF_UNIX, kind)
    staging = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    old_umask = os.umask(0o077) if private else None
    try:
        await sock.bind(staging)
    except BaseException:
        sock.close()
        raise
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    sock.listen(backlog)
    os.rename(staging, path)
    return sock
