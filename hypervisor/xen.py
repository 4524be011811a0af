"""The xen platform: GrantTable and EventChannel over Xen's libxengnttab, libxengntshr and
libxenevtchn (DESIGN.md §2), for backends running in a real Xen driver domain.

The calls are the ioctls of /dev/xen/gntdev, /dev/xen/gntalloc and /dev/xen/evtchn: they
do not block, so they run inline on trio's thread. Every port has its own evtchn handle, so
its fd becomes readable only for that port and a port's ``wait`` is one ``wait_readable``.

Frontends in Xen guests are the guest kernel's (xen-blkfront, xen-netfront). Sharing pages
with another domain, as a userspace frontend would, is :meth:`XenGrantTable.share_pages`
(gntalloc allocates the pages itself: memory from elsewhere cannot be granted on Xen).
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ringfence.hypervisor.platform import PAGE_SIZE, GrantCopy, PortStatistics

try:
    from ringfence.hypervisor._xenffi import ffi, lib
except ImportError as exc:  # built without libxen-dev, or the libraries are missing
    ffi = lib = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

MAX_COPY_LENGTH = PAGE_SIZE  # a grant copy segment stays within one page
MAX_MAPPED_GRANTS = 1 << 16  # rings plus persistent grants of every device, with room


class XenUnavailable(OSError):
    """The xen platform cannot run here (no bindings, no libraries or no /dev/xen)."""


def _require_bindings() -> None:
    if _IMPORT_ERROR is not None:
        raise XenUnavailable(errno.ENOSYS, f"xen platform bindings unavailable: {_IMPORT_ERROR}")


def _oserror(what: str) -> OSError:
    code = ffi.errno or errno.EIO
    return OSError(code, f"{what}: {os.strerror(code)}")


class XenMappedPages:
    """Foreign pages mapped by gntdev, contiguously."""

    def __init__(self, domid: int, grefs: Sequence[int], readonly: bool, address: Any) -> None:
        self.domid = domid
        self.grefs = tuple(grefs)
        self.readonly = readonly
        self._address = address
        view = memoryview(ffi.buffer(address, len(self.grefs) * PAGE_SIZE))
        self._view: memoryview | None = view.toreadonly() if readonly else view

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise ValueError("pages are unmapped")
        return self._view


class XenSharedPages:
    """Pages of ours that gntalloc allocated and granted to one domain."""

    def __init__(self, domid: int, refs: Sequence[int], address: Any) -> None:
        self.domid = domid
        self.grefs = tuple(refs)
        self._address = address
        self._view: memoryview | None = memoryview(ffi.buffer(address, len(self.grefs) * PAGE_SIZE))

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise ValueError("pages are no longer shared")
        return self._view


@dataclass(frozen=True, slots=True)
class XenGrantTableStatistics:
    maps: int
    unmaps: int
    mapped_pages: int
    copies: int
    copy_bytes: int
    shared_pages: int
    failures: int


class XenGrantTable:
    persistent_maps = False  # Linux's netfront ends access to each page once answered

    def __init__(self) -> None:
        _require_bindings()
        self._gnttab = lib.xengnttab_open(ffi.NULL, 0)
        if self._gnttab == ffi.NULL:
            raise _oserror("xengnttab_open")
        # Kernels with a per-handle limit (128 by default) would refuse persistent grants.
        lib.xengnttab_set_max_grants(self._gnttab, MAX_MAPPED_GRANTS)
        self._gntshr: Any = None
        self._maps = self._unmaps = self._mapped = self._copies = self._copy_bytes = 0
        self._shared = self._failures = 0

    async def map(self, domid: int, grefs: Sequence[int], readonly: bool = False) -> XenMappedPages:
        refs = ffi.new("uint32_t[]", list(grefs))
        prot = lib.PROT_READ | (0 if readonly else lib.PROT_WRITE)
        address = lib.xengnttab_map_domain_grant_refs(self._gnttab, len(grefs), domid, refs, prot)
        if address == ffi.NULL:
            self._failures += 1
            raise _oserror(f"map of {len(grefs)} grefs from dom{domid}")
        self._maps += 1
        self._mapped += len(grefs)
        return XenMappedPages(domid, grefs, readonly, address)

    async def map_each(self, domid: int, grefs: Sequence[int], readonly: bool = False) -> list[XenMappedPages]:
        """Each gref a mapping of its own (gntdev maps are ioctls: nothing to batch)."""
        mapped: list[XenMappedPages] = []
        try:
            for gref in grefs:
                mapped.append(await self.map(domid, [gref], readonly))
        except BaseException:
            for pages in mapped:
                with contextlib.suppress(OSError):
                    await self.unmap(pages)
            raise
        return mapped

    async def unmap(self, pages: XenMappedPages) -> None:
        if pages._view is None:
            return
        pages._view.release()
        pages._view = None
        self._unmaps += 1
        self._mapped -= len(pages.grefs)
        if lib.xengnttab_unmap(self._gnttab, pages._address, len(pages.grefs)) < 0:
            self._failures += 1
            raise _oserror("unmap")

    async def copy(self, segments: Sequence[GrantCopy]) -> list[int]:
        """Batched grant copy (one hypercall); returns one GNTST status per segment."""
        segs = ffi.new("xengnttab_grant_copy_segment_t[]", len(segments))
        keep = []
        for seg, out in zip(segments, segs):
            if seg.length > MAX_COPY_LENGTH:
                raise ValueError("a grant copy segment stays within one page")
            out.len = seg.length
            flags = 0
            for gref, local, side, flag, writable in (
                    (seg.source_gref, seg.source_local, out.source, lib.GNTCOPY_source_gref, False),
                    (seg.dest_gref, seg.dest_local, out.dest, lib.GNTCOPY_dest_gref, True)):
                if gref is not None:
                    side.foreign.domid, side.foreign.ref, side.foreign.offset = gref
                    flags |= flag
                else:
                    view = memoryview(local)
                    if view.nbytes < seg.length:
                        raise ValueError("local buffer shorter than the copy")
                    cdata = ffi.from_buffer(view, require_writable=writable)
                    keep.append(cdata)
                    side.virt = cdata
            out.flags = flags
        if segments and lib.xengnttab_grant_copy(self._gnttab, len(segments), segs) < 0:
            self._failures += 1
            raise _oserror("grant copy")
        statuses = [int(s.status) for s in segs]
        del keep
        self._copies += 1
        self._copy_bytes += sum(seg.length for seg, s in zip(segments, statuses) if s == 0)
        self._failures += any(statuses)
        return statuses

    def share_pages(self, domid: int, count: int, *, writable: bool = True) -> XenSharedPages:
        """Allocate ``count`` pages and grant them to ``domid`` (a userspace frontend's rings)."""
        if self._gntshr is None:
            self._gntshr = lib.xengntshr_open(ffi.NULL, 0)
            if self._gntshr == ffi.NULL:
                self._gntshr = None
                raise _oserror("xengntshr_open")
        refs = ffi.new("uint32_t[]", count)
        address = lib.xengntshr_share_pages(self._gntshr, domid, count, refs, int(writable))
        if address == ffi.NULL:
            self._failures += 1
            raise _oserror(f"share {count} pages with dom{domid}")
        self._shared += count
        return XenSharedPages(domid, list(refs), address)

    def unshare(self, pages: XenSharedPages) -> None:
        if pages._view is None:
            return
        pages._view.release()
        pages._view = None
        self._shared -= len(pages.grefs)
        if lib.xengntshr_unshare(self._gntshr, pages._address, len(pages.grefs)) < 0:
            raise _oserror("unshare")

    # Granting arbitrary frames is the sim platform's (and a kernel's) business: a Xen
    # userspace process can grant only what gntalloc allocated (share_pages).
    def grant_access(self, domid: int, frame: int, readonly: bool = False) -> int:
        raise XenUnavailable(errno.EOPNOTSUPP, "on Xen, userspace grants pages with share_pages()")

    def end_access(self, gref: int) -> bool:
        raise XenUnavailable(errno.EOPNOTSUPP, "on Xen, shared pages end with unshare()")

    def grant_access_many(self, domid: int, frames: Sequence[int], readonly: bool = False) -> list[int]:
        return [self.grant_access(domid, frame, readonly) for frame in frames]

    def end_access_many(self, grefs: Sequence[int]) -> list[int]:
        return [gref for gref in grefs if not self.end_access(gref)]

    def close(self) -> None:
        if self._gntshr is not None:
            lib.xengntshr_close(self._gntshr)
            self._gntshr = None
        if self._gnttab is not None:
            lib.xengnttab_close(self._gnttab)
            self._gnttab = None

    def statistics(self) -> XenGrantTableStatistics:
        return XenGrantTableStatistics(self._maps, self._unmaps, self._mapped, self._copies,
                                       self._copy_bytes, self._shared, self._failures)


class XenPort:
    """One bound port on an evtchn handle of its own."""

    def __init__(self, handle: Any, port: int, remote_domid: int) -> None:
        self._handle = handle
        self.port = port
        self.remote_domid = remote_domid
        self._fd = lib.xenevtchn_fd(handle)
        os.set_blocking(self._fd, False)  # so pending() says EAGAIN instead of blocking trio
        self._sent = self._wakeups = self._received = 0

    def notify(self) -> None:
        if lib.xenevtchn_notify(self._handle, self.port) < 0:
            raise _oserror("evtchn notify")
        self._sent += 1

    def pending(self) -> int:
        """Consume the events that arrived (0 if none), unmasking the port again."""
        count = 0
        while self._handle is not None:
            port = lib.xenevtchn_pending(self._handle)
            if port < 0:
                break
            lib.xenevtchn_unmask(self._handle, port)
            count += 1
        self._received += count
        return count

    async def wait(self) -> int:
        while True:
            count = self.pending()
            if count:
                self._wakeups += 1
                return count
            if self._handle is None:
                raise trio.ClosedResourceError("event channel closed")
            await trio.lowlevel.wait_readable(self._fd)

    async def close(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        trio.lowlevel.notify_closing(self._fd)
        lib.xenevtchn_unbind(handle, self.port)
        lib.xenevtchn_close(handle)

    def statistics(self) -> PortStatistics:
        return PortStatistics(self.port, self.remote_domid, self._sent, self._wakeups,
                                 self._received)


class XenEventChannel:
    def __init__(self) -> None:
        _require_bindings()

    def _open(self) -> Any:
        handle = lib.xenevtchn_open(ffi.NULL, 0)
        if handle == ffi.NULL:
            raise _oserror("xenevtchn_open")
        return handle

    async def alloc_unbound(self, remote_domid: int) -> XenPort:
        handle = self._open()
        port = lib.xenevtchn_bind_unbound_port(handle, remote_domid)
        if port < 0:
            error = _oserror(f"alloc unbound port for dom{remote_domid}")
            lib.xenevtchn_close(handle)
            raise error
        return XenPort(handle, port, remote_domid)

    async def bind_interdomain(self, remote_domid: int, remote_port: int) -> XenPort:
        handle = self._open()
        port = lib.xenevtchn_bind_interdomain(handle, remote_domid, remote_port)
        if port < 0:
            error = _oserror(f"bind to dom{remote_domid} port {remote_port}")
            lib.xenevtchn_close(handle)
            raise error
        return XenPort(handle, port, remote_domid)


class XenMemory:
    """No page allocator: on Xen a userspace process shares pages with
    :meth:`XenGrantTable.share_pages`, which allocates them."""

    async def alloc_pages(self, count: int) -> Any:
        raise XenUnavailable(errno.EOPNOTSUPP, "on Xen, allocate shared pages with share_pages()")

    async def free_pages(self, pages: Any) -> None:
        raise XenUnavailable(errno.EOPNOTSUPP, "on Xen, shared pages end with unshare()")

    def ram_page(self, frame: int) -> memoryview:
        raise XenUnavailable(errno.EOPNOTSUPP, "a Xen domain's RAM is not addressable by frame")


@dataclass
class XenDomain:
    """A Xen domain as a driver sees it: its domid and the platform interfaces."""
    domid: int
    grant_table: XenGrantTable
    events: XenEventChannel
    memory: XenMemory

    def close(self) -> None:
        self.grant_table.close()


@contextlib.contextmanager
def open_xen_domain(domid: int) -> Any:
    """The platform interfaces for this Xen domain (its domid comes from XenStore)."""
    domain = XenDomain(domid, XenGrantTable(), XenEventChannel(), XenMemory())
    try:
        yield domain
    finally:
        domain.close()
