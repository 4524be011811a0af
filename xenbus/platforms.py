"""Which platform a driver runs on, and opening it: a domain's grant table, event channels
and memory plus its XenStore connection. The only place that knows both platforms, so the
drivers never check which one they are on.

* ``sim``: the domain's control socket comes from the sim hypervisor ($RINGFENCE_DOMAIN_FD)
  and so does its XenStore connection;
* ``xen``: a real Xen domain (``/dev/xen`` exists): grants and events through libxengnttab
  and libxenevtchn (:mod:`ringfence.hypervisor.xen`), XenStore through the kernel's xenbus
  device, the dom0 daemon's socket, or ``$XENSTORED_PATH`` as libxenstore honours it.
  The domain's id is XenStore's ``domid`` node, which Xen's toolstack writes.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

import trio

from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV
from ringfence.xenbus.client import XenStore, dial_unix, open_xenstore_stream

log = logging.getLogger(__name__)

PLATFORMS = ("auto", "sim", "xen")
XENBUS_DEVICE = "/dev/xen/xenbus"
DOM0_SOCKET = "/run/xenstored/socket"


def choose_platform(requested: str = "auto") -> str:
    """``auto`` is sim when the sim hypervisor started us, else xen where /dev/xen exists."""
    if requested not in PLATFORMS:
        raise ValueError(f"unknown platform {requested!r} (choose from {', '.join(PLATFORMS)})")
    if requested != "auto":
        return requested
    if DOMAIN_FD_ENV not in os.environ and os.path.isdir("/dev/xen"):
        return "xen"
    return "sim"


def xenstore_endpoint() -> str:
    """Where this Xen domain reaches XenStore, in libxenstore's order of preference."""
    if os.environ.get("XENSTORED_PATH"):
        return os.environ["XENSTORED_PATH"]
    return DOM0_SOCKET if os.path.exists(DOM0_SOCKET) else XENBUS_DEVICE


class MessagePerWrite(trio.abc.Stream):
    """Writes each XenStore message with a write of its own: Linux's xenbus device takes one
    message per write() and drops whatever follows it in the same call."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._partial = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pending = self._partial + bytes(data)
        while len(pending) >= W.HEADER.size:
            end = W.HEADER.size + W.HEADER.unpack_from(pending)[3]
            if len(pending) < end:
                break
            await self._stream.send_all(pending[:end])
            pending = pending[end:]
        self._partial = pending

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def dial_xenstore(endpoint: str) -> trio.abc.Stream:
    """A stream to XenStore at a Unix socket or a xenbus character device."""
    if os.path.exists(endpoint) and not _is_socket(endpoint):
        fd = os.open(endpoint, os.O_RDWR | os.O_CLOEXEC)
        return MessagePerWrite(trio.lowlevel.FdStream(fd))
    return MessagePerWrite(await dial_unix(endpoint))


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.stat(path).st_mode)


@contextlib.asynccontextmanager
async def open_platform(requested: str = "auto") -> AsyncIterator[tuple[Any, XenStore]]:
    """This process's domain and its XenStore connection: ``(domain, xs)``."""
    platform = choose_platform(requested)
    if platform == "sim":
        from ringfence.hypervisor.sim.client import open_domain
        from ringfence.xenbus.sim import open_domain_xenstore
        async with open_domain() as domain, open_domain_xenstore(domain) as xs:
            yield domain, xs
        return
    from ringfence.hypervisor.xen import open_xen_domain
    endpoint = xenstore_endpoint()
    try:
        stream = await dial_xenstore(endpoint)
    except OSError as exc:
        raise OSError(exc.errno or errno.ENOENT, f"XenStore at {endpoint}: {exc.strerror}") from None
    reconnect = (lambda: dial_xenstore(endpoint)) if endpoint != XENBUS_DEVICE else None
    async with open_xenstore_stream(stream, reconnect) as xs:
        domid = int(await xs.read("domid"))
        with open_xen_domain(domid) as domain:
            yield domain, xs


def add_platform_argument(parser: Any) -> None:
    """``--platform`` for a program that runs inside a domain."""
    parser.add_argument("--platform", choices=PLATFORMS, default="auto",
                        help="sim (started by the sim hypervisor) or xen (a real Xen driver "
                        "domain, through libxengnttab/libxenevtchn); auto picks sim when "
                        "$RINGFENCE_DOMAIN_FD is set, else xen where /dev/xen exists")


async def serve_backend_domain(platform: str, program: str, kind: str, serve: Any) -> None:
    """A driver domain's main: connect to the platform, run ``serve(domain, xs)`` (which
    starts with the dict of its devices), answer statistics (the devices under ``kind``)
    and tell the supervisor it is ready."""
    from ringfence._sdnotify import Notifier
    from ringfence._statsock import serve_statistics
    async with open_platform(platform) as (domain, xs):
        async with trio.open_nursery() as nursery:
            devices = await nursery.start(serve, domain, xs)
            await nursery.start(serve_statistics, lambda: {
                "domid": domain.domid, "xenstore": xs.statistics(),
                kind: {f"{fe}/{devid}": d.statistics() for (fe, devid), d in sorted(devices.items())}})
            Notifier().ready(status=f"{program} serving in domain {domain.domid}")
            log.info(f"{program} ready", extra={"kv": {"domid": domain.domid}})
