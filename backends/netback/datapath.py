"""netback's tx validation (sans-IO): a batch of tx requests, already copied out of the ring,
becomes packets to copy or refusals, each with the responses its slots are owed.

A packet is a chain of slots: the first carries the packet's total size and flags, extra-info
slots (GSO) follow it, then data slots while ``more_data`` is set. As Linux's netback:
a chain that does not end within what the frontend pushed, more slots than a packet may use
(XEN_NETIF_NR_SLOTS_MIN, 18) or an unknown extra type make the frontend broken (``Fatal``:
disconnect that vif); a bad size, a slot crossing its page or a bad GSO descriptor costs
that packet (an error response on every slot) and a counter.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ringfence.hypervisor.io import netif
from ringfence.hypervisor.io.netif import STATUS_NULL
from ringfence.hypervisor.io.netif import EXTRA_FLAG_MORE, ExtraType, GsoType

PAGE = netif.PAGE_SIZE
ETH_HLEN = 14
MAX_EXTRAS = 4


class Fatal(Exception):
    """The frontend broke the protocol: its vif is disconnected."""


@dataclass(frozen=True, slots=True)
class Segment:
    gref: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class TxPacket:
    layout: tuple[int | None, ...]   # per request slot: its id, or None for an extra-info slot
    size: int
    flags: int
    segments: tuple[Segment, ...]
    gso_type: int = 0                # Xen's GsoType, 0 for none
    gso_size: int = 0


@dataclass(frozen=True, slots=True)
class TxRefusal:
    layout: tuple[int | None, ...]
    reason: str


def responses(layout: tuple[int | None, ...], status: int) -> list[bytes]:
    """One response per request slot, in order: the status for data slots, NULL for extras."""
    return [netif.TX_RESPONSE.pack(rid, status) if rid is not None
            else netif.TX_RESPONSE.pack(0, STATUS_NULL) for rid in layout]


class TxParser:
    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()

    def parse(self, raws: list[bytes]) -> list[TxPacket | TxRefusal]:
        packets: list[TxPacket | TxRefusal] = []
        i, n = 0, len(raws)
        while i < n:
            first = netif.decode_tx_request(raws[i])
            i += 1
            layout: list[int | None] = [first.id]
            gso = None
            if first.flags & netif.TXF_EXTRA_INFO:
                while True:
                    if i >= n:
                        raise self._fatal("extra_info_missing")
                    extra = netif.decode_extra(raws[i])
                    i += 1
                    layout.append(None)
                    if not ExtraType.GSO <= extra.type <= ExtraType.HASH:
                        raise self._fatal("bad_extra_type")
                    if extra.type == ExtraType.GSO:
                        gso = extra
                    if not extra.flags & EXTRA_FLAG_MORE:
                        break
                    if layout.count(None) > MAX_EXTRAS:
                        raise self._fatal("too_many_extras")
            slots = [first]
            more = first.flags & netif.TXF_MORE_DATA
            while more:
                if i >= n:
                    raise self._fatal("slot_chain_does_not_end")
                if len(slots) >= netif.NR_SLOTS_MIN:
                    raise self._fatal("too_many_slots")
                slot = netif.decode_tx_request(raws[i])
                i += 1
                layout.append(slot.id)
                slots.append(slot)
                more = slot.flags & netif.TXF_MORE_DATA
            packets.append(self._check(tuple(layout), first, slots, gso))
        return packets

    def _check(self, layout: tuple[int | None, ...], first: netif.TxRequest,
               slots: list[netif.TxRequest], gso: netif.Extra | None) -> TxPacket | TxRefusal:
        rest = sum(slot.size for slot in slots[1:])
        if first.size < ETH_HLEN or first.size > netif.MAX_TX_SIZE or rest > first.size:
            return self._refuse(layout, "bad_size")
        segments = []
        for index, slot in enumerate(slots):
            length = first.size - rest if index == 0 else slot.size
            if slot.offset + length > PAGE:
                return self._refuse(layout, "crosses_page")
            if length:
                segments.append(Segment(slot.gref, slot.offset, length))
        if gso is not None and (gso.gso_type not in (GsoType.TCPV4, GsoType.TCPV6) or gso.gso_size == 0):
            return self._refuse(layout, "bad_gso")
        return TxPacket(layout, first.size, first.flags, tuple(segments),
                        gso.gso_type if gso else 0, gso.gso_size if gso else 0)

    def _refuse(self, layout: tuple[int | None, ...], reason: str) -> TxRefusal:
        self.rejected[reason] += 1
        return TxRefusal(layout, reason)

    def _fatal(self, reason: str) -> Fatal:
        self.rejected[reason] += 1
        return Fatal(reason)
