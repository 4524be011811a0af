"""Faults the harness injects into a storage driver domain (``ringfence inject``), through a
device's ``fault-inject`` node: what a dying disk, a broken frontend or a lossy event
channel would do to the backend, each reproducible from a seed.

The node's value is ``KIND[:COUNT[:SEED]]``:

* ``eio`` fails every read, write and flush with BLKIF_RSP_ERROR (``eio:N`` the next N);
* ``corrupt-index`` writes a request index past what the ring holds into the shared ring,
  as a broken frontend would publish it (the backend disconnects it as abusive, and the
  frontend reconnects and replays);
* ``corrupt-request`` corrupts the next request in the shared ring before the backend
  copies it (an operation that does not exist, or a sector past any disk, as the seed
  picks): the request is refused with an error response;
* ``drop-notify`` drops the next notifications the backend owes the frontend;
* ``storm`` sends the frontend COUNT notifications at once, for nothing.

COUNT defaults to 1 for the ring faults; empty heals; anything else is ignored.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

RING_FAULTS = ("corrupt-index", "corrupt-request", "drop-notify", "storm")
COUNT_MAX = 1_000_000
NO_SUCH_OPERATION = 0xEE
SECTOR_OFFSET = 16  # of every request layout (read/write, indirect, discard)


@dataclass
class RingFault:
    kind: str           # one of RING_FAULTS
    left: int           # times still to make it
    rng: random.Random  # what a corruption writes


def parse(value: str) -> tuple[int | None, RingFault | None]:
    """The node's value as (disk failures: None, -1 for every request or how many more;
    the ring fault to make, if any)."""
    kind, _, rest = value.partition(":")
    count_text, _, seed_text = rest.partition(":")
    if not all(text.isdigit() or not text for text in (count_text, seed_text)):
        return None, None
    count = min(int(count_text), COUNT_MAX) if count_text else None
    if kind == "eio" and not seed_text:
        return (-1 if count is None else count), None
    if kind in RING_FAULTS and count != 0:
        return None, RingFault(kind, count or 1, random.Random(int(seed_text or 0)))
    return None, None


def node_value(kind: str, count: int | None = None, seed: int = 0) -> str:
    """What the toolstack writes into the node for ``kind`` (``heal``: nothing), as
    :func:`parse` reads it back."""
    if kind == "heal":
        return ""
    if kind == "eio":
        return "eio" + (f":{count}" if count else "")
    return f"{kind}:{count or 1}:{seed}"


def make_on_ring(fault: RingFault, ring: Any, port: Any) -> bool:
    """Make ``fault`` on ``ring`` if it can be made now (a request to corrupt has to be
    there first; ``drop-notify`` waits for a notification due); True if it was made."""
    if fault.kind == "corrupt-index":
        # Made once the backend takes it for an overflow: a frontend pushing meanwhile
        # writes its own index over it, and it is written again the next time.
        ring.forge_request_index()
        return False
    if fault.kind == "corrupt-request":
        slot = ring.next_request_slot()
        if slot is None:
            return False
        corrupt_request(slot, fault.rng)
        return True
    if fault.kind == "storm":
        for _ in range(fault.left):
            port.notify()
        fault.left = 1  # made, all at once
        return True
    return False


def corrupt_request(slot: memoryview, rng: random.Random) -> None:
    """Make the request in ``slot`` one that no backend may carry out; its id stays, so
    that the refusal answers the frontend's request."""
    if rng.random() < 0.5:
        slot[0] = NO_SUCH_OPERATION
    else:
        sector = (1 << 63) + rng.randrange(1 << 32)
        slot[SECTOR_OFFSET:SECTOR_OFFSET + 8] = sector.to_bytes(8, "little")
