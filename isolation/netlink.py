"""The one adapter for pyroute2: links, bridges, veths, addresses, MTU, namespaces; and TAPs.

Every call creates its ``IPRoute``, uses it and closes it inside one worker thread. A call
aimed at another process's network namespace runs in a thread of its own that enters that
namespace and then ends, so no thread that trio reuses ever changes namespace.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ringfence.hypervisor._lib import ffi, lib

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


class LinkError(OSError):
    pass


@dataclass(frozen=True, slots=True)
class LinkInfo:
    name: str
    index: int
    mac: str
    mtu: int
    up: bool
    master: int | None
    kind: str | None


def _in_namespace(netns_pid: int | None, fn: Callable[[], T]) -> T:
    if netns_pid is None:
        return fn()
    result: list[Any] = []

    def body() -> None:
        try:
            fd = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                status = lib.rf_setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            if status < 0:
                raise OSError(-status, f"entering netns of {netns_pid}: {os.strerror(-status)}")
            result.append((True, fn()))
        except BaseException as exc:  # handed back to the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=body, name=f"netns-{netns_pid}")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


async def _run(netns_pid: int | None, fn: Callable[[IPRoute], T]) -> T:
    def call() -> T:
        def with_ipr() -> T:
            with IPRoute() as ipr:
                try:
                    return fn(ipr)
                except NetlinkError as exc:
                    raise LinkError(exc.code, f"netlink: {os.strerror(exc.code)}") from None
        return _in_namespace(netns_pid, with_ipr)
    return await trio.to_thread.run_sync(call)


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkError(19, f"no such link: {name}")  # ENODEV
    return int(found[0])


async def link_info(name: str, netns_pid: int | None = None) -> LinkInfo:
    def get(ipr: IPRoute) -> LinkInfo:
        msg = ipr.get_links(_index(ipr, name))[0]
        linkinfo = msg.get_attr("IFLA_LINKINFO")
        return LinkInfo(name, msg["index"], msg.get_attr("IFLA_ADDRESS"), msg.get_attr("IFLA_MTU"),
                        bool(msg["flags"] & 1), msg.get_attr("IFLA_MASTER"),
                        linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo else None)
    return await _run(netns_pid, get)


async def link_exists(name: str, netns_pid: int | None = None) -> bool:
    return await _run(netns_pid, lambda ipr: bool(ipr.link_lookup(ifname=name)))


async def ensure_bridge(name: str, *, mtu: int | None = None, netns_pid: int | None = None) -> None:
    def make(ipr: IPRoute) -> None:
        if not ipr.link_lookup(ifname=name):
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:  # another vif made it meanwhile: fine
                    raise
        index = _index(ipr, name)
        if mtu:
            ipr.link("set", index=index, mtu=mtu)
        ipr.link("set", index=index, state="up")
    await _run(netns_pid, make)


async def set_link(name: str, *, up: bool | None = None, mtu: int | None = None,
                   mac: str | None = None, master: str | None = None,
                   netns_pid: int | None = None) -> None:
    def change(ipr: IPRoute) -> None:
        index = _index(ipr, name)
        if mac is not None:
            ipr.link("set", index=index, address=mac)
        if mtu is not None:
            ipr.link("set", index=index, mtu=mtu)
        if master is not None:
            ipr.link("set", index=index, master=_index(ipr, master))
        if up is not None:
            ipr.link("set", index=index, state="up" if up else "down")
    await _run(netns_pid, change)


async def add_address(name: str, cidr: str, netns_pid: int | None = None) -> None:
    address, _, prefix = cidr.partition("/")
    prefixlen = int(prefix) if prefix else (128 if ":" in address else 32)

    def add(ipr: IPRoute) -> None:
        try:
            ipr.addr("add", index=_index(ipr, name), address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST: already there
                raise
    await _run(netns_pid, add)


async def addresses(name: str, netns_pid: int | None = None) -> list[str]:
    def get(ipr: IPRoute) -> list[str]:
        return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=_index(ipr, name))]
    return await _run(netns_pid, get)


async def create_veth(name: str, peer: str, *, peer_netns_pid: int | None = None,
                      netns_pid: int | None = None) -> None:
    def make(ipr: IPRoute) -> None:
        ipr.link("add", ifname=name, kind="veth", peer=peer)
        if peer_netns_pid is not None:
            fd = os.open(f"/proc/{peer_netns_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("set", index=_index(ipr, peer), net_ns_fd=fd)
            finally:
                os.close(fd)
    await _run(netns_pid, make)


async def delete_link(name: str, netns_pid: int | None = None) -> bool:
    def delete(ipr: IPRoute) -> bool:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True
    return await _run(netns_pid, delete)


async def list_links(netns_pid: int | None = None) -> list[str]:
    return await _run(netns_pid, lambda ipr: [m.get_attr("IFLA_IFNAME") for m in ipr.get_links()])


def open_tap(name: str, *, vnet_hdr: bool = True, multi_queue: bool = False) -> tuple[int, str]:
    """Open or create TAP ``name`` in this process's namespace; returns (nonblocking fd, name)."""
    actual = ffi.new("char[16]")
    fd = lib.rf_tap_open(name.encode(), int(vnet_hdr), int(multi_queue), actual)
    if fd < 0:
        raise LinkError(-fd, f"opening TAP {name}: {os.strerror(-fd)}")
    return fd, ffi.string(actual).decode()


async def open_tap_in(name: str, netns_pid: int | None, **kwargs: Any) -> tuple[int, str]:
    """Open a TAP inside another process's network namespace (the fd works from anywhere)."""
    return await trio.to_thread.run_sync(lambda: _in_namespace(netns_pid, lambda: open_tap(name, **kwargs)))
