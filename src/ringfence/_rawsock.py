"""A connected nonblocking socket driven directly: the system call first, and a trip through
trio's scheduler only when it would block (trio's own socket methods add two a call, which
is most of the cost of a small request). Used where a request is a few microseconds of work:
xenstored's connections and the NBD exports of blkfront.
"""
from __future__ import annotations

import socket

import trio


class RawSocket:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.raw = socket.socket(fileno=sock.detach())
        self.raw.setblocking(False)

    async def recv(self, max_bytes: int = 65536) -> bytes:
        while True:
            try:
                return self.raw.recv(max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.raw)

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.raw.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.raw)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes now; returns how many bytes."""
        try:
            return self.raw.send(data)
        except BlockingIOError:
            return 0

    # the trio.abc.Stream spelling, for code written against streams
    receive_some = recv
    send_all = send

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self.raw)
        self.raw.close()
