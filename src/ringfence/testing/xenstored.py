"""An in-process xenstored for tests: one daemon, and connections to it as domains get them
(the domid given here, as the sim hypervisor gives it, never claimed by the client)."""
from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import trio

from ringfence.xenbus.server import XenStoreServer


class InProcessXenstored:
    def __init__(self, server: XenStoreServer, nursery: trio.Nursery) -> None:
        self.server, self.nursery = server, nursery

    async def connect(self, domid: int) -> trio.SocketStream:
        """A new connection the daemon knows as ``domid``'s."""
        ours, theirs = socket.socketpair()
        self.nursery.start_soon(self.server.serve_domain_connection,
                                trio.SocketStream(trio.socket.from_stdlib_socket(ours)), domid)
        return trio.SocketStream(trio.socket.from_stdlib_socket(theirs))


@contextlib.asynccontextmanager
async def in_process_xenstored(dom0_socket: str | None = None) -> AsyncIterator[InProcessXenstored]:
    """The daemon and its connections, all closed when the block ends; with ``dom0_socket``,
    dom0's Unix socket too, served by the C engine as ``ringfence xenstored`` serves it."""
    async with trio.open_nursery() as nursery:
        server = XenStoreServer()
        if dom0_socket is not None:
            await nursery.start(server.serve_unix, dom0_socket)
        yield InProcessXenstored(server, nursery)
        nursery.cancel_scope.cancel()
