"""The interfaces every driver is written against (DESIGN.md §2).

Drivers receive objects implementing these and never check which platform they run on: the
sim platform (``ringfence.hypervisor.sim.client``) and the xen platform implement the same.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

PAGE_SIZE = 4096
REVOKE_GRACE = 2.0  # seconds a backend that just died may keep its mappings (its teardown)


@dataclass(frozen=True, slots=True)
class GrantCopy:
    """One grant copy segment. Exactly one of the sides is usually local memory.

    A granted side is ``(domid, gref, offset)``; a local side is a writable (dest) or
    readable (source) buffer of this process.
    """
    length: int
    source_gref: tuple[int, int, int] | None = None
    source_local: Any = None
    dest_gref: tuple[int, int, int] | None = None
    dest_local: Any = None


class MappedPages(Protocol):
    """Foreign pages mapped contiguously into this process."""
    domid: int
    grefs: tuple[int, ...]
    readonly: bool

    @property
    def buffer(self) -> memoryview: ...


class GrantTable(Protocol):
    # Whether a backend may keep a frontend's pages mapped across requests: True on sim,
    # whose frontends (ours) keep their buffers granted while connected; False on Xen, where
    # Linux's netfront ends access to each page once it is answered.
    persistent_maps: bool

    def grant_access(self, domid: int, frame: int, readonly: bool = False) -> int: ...

    def end_access(self, gref: int) -> bool: ...

    def grant_access_many(self, domid: int, frames: Sequence[int], readonly: bool = False) -> list[int]: ...

    def end_access_many(self, grefs: Sequence[int]) -> list[int]: ...  # those still mapped

    async def map(self, domid: int, grefs: Sequence[int], readonly: bool = False) -> MappedPages: ...

    # each gref a mapping of its own, in one call
    async def map_each(self, domid: int, grefs: Sequence[int], readonly: bool = False) -> list[MappedPages]: ...

    async def unmap(self, pages: MappedPages) -> None: ...

    async def copy(self, segments: Sequence[GrantCopy]) -> list[int]: ...

    def statistics(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class PortStatistics:
    port: int
    remote_domid: int
    notifications_sent: int
    wakeups: int
    events_received: int


class Port(Protocol):
    """One end of an interdomain event channel."""
    port: int
    remote_domid: int

    def notify(self) -> None: ...

    async def wait(self) -> int: ...

    async def close(self) -> None: ...

    def statistics(self) -> Any: ...


class EventChannel(Protocol):
    async def alloc_unbound(self, remote_domid: int) -> Port: ...

    async def bind_interdomain(self, remote_domid: int, remote_port: int) -> Port: ...


class PageRange(Protocol):
    """Pages of this domain, mapped contiguously, that it may grant for mapping."""
    frames: tuple[int, ...]

    @property
    def buffer(self) -> memoryview: ...


class Memory(Protocol):
    async def alloc_pages(self, count: int) -> PageRange: ...

    async def free_pages(self, pages: PageRange) -> None: ...

    def ram_page(self, frame: int) -> memoryview: ...


async def end_access_settled(grant_table: GrantTable, grefs: Sequence[int],
                             grace: float = REVOKE_GRACE) -> list[int]:
    """End access to these grants, one atomic try each (XSA-396). A backend that has just
    died keeps its mappings until the hypervisor has torn its domain down, so the grants
    still mapped are tried again for up to ``grace`` seconds. Returns those mapped even then:
    a backend that does not let go; their pages must never be reused."""
    left = grant_table.end_access_many(grefs)
    deadline = trio.current_time() + grace
    pause = 0.001  # a teardown under way ends within milliseconds: look again soon, then less often
    while left and trio.current_time() < deadline:
        await trio.sleep(pause)
        pause = min(pause * 2, 0.02)
        left = grant_table.end_access_many(left)
    return left
