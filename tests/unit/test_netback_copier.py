"""netback's copiers: pages that map are kept mapped and copied with memmove; a page that
cannot be mapped is grant-copied instead; the mapping cache stays bounded."""
from __future__ import annotations

import trio

from ringfence.backends.netback.copier import MappingCopier

PAGE = 4096


class _Mapping:
    def __init__(self, pages: list[bytearray], readonly: bool) -> None:
        self.storage = bytearray(b"".join(pages))
        self.sources = pages
        view = memoryview(self.storage)
        self.buffer = view.toreadonly() if readonly else view


class FakeGrantTable:
    """Grefs 1..99 are mappable pages; 100 and up can only be copied; 999 is not granted."""

    def __init__(self) -> None:
        self.pages = {g: bytearray(bytes([g % 256]) * PAGE) for g in range(1, 200)}
        self.maps = self.unmaps = self.copies = 0

    async def map(self, domid, grefs, readonly=False):
        if any(g >= 100 for g in grefs):
            raise OSError(22, "not mappable")
        self.maps += 1
        return _Mapping([self.pages[g] for g in grefs], readonly)

    async def unmap(self, mapping):
        self.unmaps += 1

    async def copy(self, segments):
        statuses = []
        for seg in segments:
            self.copies += 1
            if seg.source_gref:
                _, gref, offset = seg.source_gref
                if gref not in self.pages:
                    statuses.append(-1)
                    continue
                seg.dest_local[:seg.length] = self.pages[gref][offset:offset + seg.length]
            else:
                _, gref, offset = seg.dest_gref
                if gref not in self.pages:
                    statuses.append(-1)
                    continue
                self.pages[gref][offset:offset + seg.length] = bytes(seg.source_local[:seg.length])
            statuses.append(0)
        return statuses


def test_mapped_copied_and_refused_pages_each_get_their_answer():
    async def main():
        gt = FakeGrantTable()
        copier = MappingCopier(gt, 5, limit=8)
        frames = [bytearray(300) for _ in range(4)]
        arrived = await copier.gather([([(1, 0, 100), (2, 10, 200)], memoryview(frames[0])),
                                       ([(3, 0, 300)], memoryview(frames[3]))])
        assert arrived == [True, True] and gt.maps == 1  # a batch's new pages in one call
        assert bytes(frames[0]) == b"\x01" * 100 + b"\x02" * 200
        arrived = await copier.gather([([(150, 0, 300)], memoryview(frames[1])),
                                       ([(999, 0, 300)], memoryview(frames[2]))])
        assert arrived == [True, False] and bytes(frames[1]) == b"\x96" * 300  # copied; refused
        again = bytearray(100)
        assert await copier.gather([([(1, 0, 100)], memoryview(again))]) == [True]
        assert gt.maps == 1 and bytes(again) == b"\x01" * 100  # kept mapped
        assert await copier.scatter([[(3, memoryview(b"xyz"))], [(160, memoryview(b"abc"))]]) == [True, True]
        assert gt.pages[160][:3] == b"abc"  # copied, not mapped
        # cycling through more pages than the limit drops every mapping and starts over
        for g in range(10, 30):
            await copier.gather([([(g, 0, 1)], memoryview(bytearray(1)))])
        assert copier.statistics()["resets"] >= 1 and copier.statistics()["mapped"] <= 8
        await copier.close()
        assert gt.unmaps == copier.maps and copier.statistics()["mapped"] == 0

    trio.run(main)
