"""How netback moves packet bytes between the frontend's granted pages and its own memory.

:class:`GrantCopier` issues one batched grant copy per direction and batch, as Linux's
netback does: the only choice on Xen, where Linux's netfront ends access to a page as soon
as its packet is answered (a mapping kept would break it). :class:`MappingCopier` maps each
page the first time it is seen and keeps it (an LRU bound), then copies with memmove: for
platforms whose frontends keep their buffers granted while connected (ringfence's netfront
on sim), it takes the hypervisor off the per-packet path, as persistent grants do for blkback.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from ringfence.hypervisor.platform import GrantCopy

PAGE = 4096
MAPPINGS_MAX = 1024  # pages kept mapped per vif (netfront grants 512)

Gather = Sequence[tuple[int, int, int]]    # (gref, offset, length) per piece, in order
Scatter = Sequence[tuple[int, memoryview]]  # (gref, bytes to put at offset 0)


class GrantCopier:
    def __init__(self, grant_table: Any, domid: int) -> None:
        self.gt, self.domid = grant_table, domid

    async def gather(self, packets: Sequence[tuple[Gather, memoryview]]) -> list[bool]:
        """Copy each packet's pieces into its buffer; True per packet that arrived whole."""
        copies, ends = [], []
        for pieces, buffer in packets:
            at = 0
            for gref, offset, length in pieces:
                copies.append(GrantCopy(length, source_gref=(self.domid, gref, offset),
                                        dest_local=buffer[at:at + length]))
                at += length
            ends.append(len(copies))
        return _per_packet(await self.gt.copy(copies) if copies else [], ends)

    async def scatter(self, packets: Sequence[Scatter]) -> list[bool]:
        copies, ends = [], []
        for pieces in packets:
            copies += [GrantCopy(len(data), source_local=data, dest_gref=(self.domid, gref, 0))
                       for gref, data in pieces]
            ends.append(len(copies))
        return _per_packet(await self.gt.copy(copies) if copies else [], ends)

    async def prepare(self, grefs: set[int], writable: bool) -> None:
        pass

    async def close(self) -> None:
        pass

    def statistics(self) -> dict[str, int]:
        return {}


class MappingCopier:
    """Maps the pages a batch needs that are not mapped yet in one call, keeps them, and
    copies with memmove. Past ``limit`` pages (a frontend cycling through grants) every
    mapping is dropped and the next batches map afresh: bounded, never wrong. A page that
    cannot be mapped (a sim domain may grant plain RAM frames) is grant-copied instead, so
    a packet gets the same answer either way."""

    def __init__(self, grant_table: Any, domid: int, limit: int = MAPPINGS_MAX) -> None:
        self.gt, self.domid, self.limit = grant_table, domid, limit
        self.pages: dict[int, tuple[memoryview, bool]] = {}  # gref: (page, writable)
        self.groups: list[Any] = []
        self.mapped = self.maps = self.failures = self.resets = 0
        self.unmappable: set[int] = set()  # grefs to copy, not map (bounded by ``limit``)
        self.fallback = GrantCopier(grant_table, domid)
        self.fast: Any = None  # told of every page kept and of their unmapping (fastpath.py)

    async def prepare(self, grefs: set[int], writable: bool) -> None:
        """Map pages ahead of their first packet (rx buffers as the guest posts them)."""
        await self._ensure(grefs, writable)

    async def _ensure(self, grefs: set[int], writable: bool) -> None:
        pages = self.pages
        missing = [g for g in grefs if (g not in pages or (writable and not pages[g][1]))
                   and g not in self.unmappable]
        if not missing:
            return
        if self.mapped + len(missing) > self.limit:
            self.resets += 1
            await self.close()
        for start in range(0, len(missing), 64):
            chunk = missing[start:start + 64]
            try:
                self._keep(await self.gt.map(self.domid, chunk, readonly=not writable), chunk, writable)
            except OSError:
                for gref in chunk:  # one bad gref fails the call: the good ones still map
                    try:
                        self._keep(await self.gt.map(self.domid, [gref], readonly=not writable),
                                   [gref], writable)
                    except OSError:
                        self.failures += 1
                        if len(self.unmappable) >= self.limit:
                            self.unmappable.clear()
                        self.unmappable.add(gref)

    def _keep(self, mapping: Any, grefs: list[int], writable: bool) -> None:
        self.groups.append(mapping)
        self.maps += 1
        self.mapped += len(grefs)
        view = mapping.buffer
        for i, gref in enumerate(grefs):
            page = view[i * PAGE:(i + 1) * PAGE]
            self.pages[gref] = (page, writable)
            if self.fast is not None:
                self.fast.remember(gref, page, writable)

    async def gather(self, packets: Sequence[tuple[Gather, memoryview]]) -> list[bool]:
        await self._ensure({gref for pieces, _ in packets for gref, _, _ in pieces}, False)
        pages, results, copied = self.pages, [], []
        for pieces, buffer in packets:
            if not all(gref in pages for gref, _, _ in pieces):
                copied.append(len(results))
                results.append(False)
                continue
            at = 0
            for gref, offset, length in pieces:
                buffer[at:at + length] = pages[gref][0][offset:offset + length]
                at += length
            results.append(True)
        if copied:
            for index, whole in zip(copied, await self.fallback.gather([packets[i] for i in copied])):
                results[index] = whole
        return results

    async def scatter(self, packets: Sequence[Scatter]) -> list[bool]:
        await self._ensure({gref for pieces in packets for gref, _ in pieces}, True)
        pages, results, copied = self.pages, [], []
        for pieces in packets:
            if not all(gref in pages and pages[gref][1] for gref, _ in pieces):
                copied.append(len(results))
                results.append(False)
                continue
            for gref, data in pieces:
                pages[gref][0][:len(data)] = data
            results.append(True)
        if copied:
            for index, whole in zip(copied, await self.fallback.scatter([packets[i] for i in copied])):
                results[index] = whole
        return results

    async def close(self) -> None:
        if self.fast is not None:
            self.fast.forget_all()
        self.pages.clear()
        self.unmappable.clear()
        groups, self.groups, self.mapped = self.groups, [], 0
        for mapping in groups:
            with contextlib.suppress(OSError):
                await self.gt.unmap(mapping)

    def statistics(self) -> dict[str, int]:
        return {"mapped": self.mapped, "maps": self.maps, "failures": self.failures,
                "resets": self.resets}


def _per_packet(statuses: list[int], ends: list[int]) -> list[bool]:
    results, start = [], 0
    for end in ends:
        results.append(not any(statuses[start:end]))
        start = end
    return results
