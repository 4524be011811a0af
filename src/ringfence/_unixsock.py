"""Listening Unix sockets whose path appears only once they accept connections.

Bound under a temporary name, listening, then renamed into place: a client that waits for
the path and connects never meets ECONNREFUSED (bind creates the file before listen).
"""
from __future__ import annotations

import contextlib
import os
import socket

import trio


def bound_unix(path: str, kind: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
    """A Unix socket bound to ``path`` right here. trio's ``bind`` goes through a worker
    thread: a thread started in each new domain, a wake-up each time, and other tasks run
    meanwhile, which must not happen while the caller has the umask changed. Our paths
    are on a local filesystem (/run), where bind does not block."""
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def listen_unix(path: str, *, backlog: int = 64, private: bool = True,
                      kind: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
    """A listening socket at ``path`` (mode 0600 when ``private``), replacing whatever was
    there."""
    staging = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    old_umask = os.umask(0o077) if private else None
    try:
        sock = bound_unix(staging, kind)
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    sock.listen(backlog)
    os.rename(staging, path)
    await trio.lowlevel.checkpoint()
    return sock
