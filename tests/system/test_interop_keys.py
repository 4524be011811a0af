"""docs/interop.md, checked: every key Linux's xen-blkfront and xen-netfront read from a
backend directory is published by our backends on a running host, and the keys Linux
blkback/netback read are written by our frontends."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

BLKFRONT_READS = {"state", "sectors", "info", "sector-size", "physical-sector-size",
                  "feature-flush-cache", "feature-discard", "discard-granularity",
                  "discard-alignment", "discard-secure", "feature-persistent",
                  "feature-max-indirect-segments", "multi-queue-max-queues", "max-ring-page-order"}
BLKBACK_READS = {"event-channel", "protocol", "feature-persistent", "state"}
NETFRONT_READS = {"state", "feature-rx-copy", "feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6",
                  "feature-ipv6-csum-offload", "feature-rx-notify", "feature-split-event-channels",
                  "multi-queue-max-queues"}
NETBACK_READS = {"tx-ring-ref", "rx-ring-ref", "event-channel", "request-rx-copy", "state",
                 "feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6"}


async def _keys(xs, path):
    return set(await xs.directory(path))


async def test_backends_publish_what_linux_frontends_read(ringfence_system):
    system = ringfence_system
    xs = system.xs
    guest = system.guests["guest1"]
    vbd_back = f"/local/domain/{system.driver_domids['stor']}/backend/vbd/{guest.domid}/51712"
    vif_back = f"/local/domain/{system.driver_domids['net']}/backend/vif/{guest.domid}/0"
    assert BLKFRONT_READS <= await _keys(xs, vbd_back)
    assert NETFRONT_READS <= await _keys(xs, vif_back)
    assert await xs.read(f"{vbd_back}/state") == b"4" and await xs.read(f"{vif_back}/state") == b"4"
    assert await xs.read(f"{vif_back}/feature-rx-copy") == b"1"
    for feature in ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6"):
        assert await xs.read(f"{vif_back}/{feature}") == b"1"
    front = f"/local/domain/{guest.domid}/device/vbd/51712"
    vbd_front = await _keys(xs, front)
    assert {"protocol", "feature-persistent", "state"} <= vbd_front
    # multi-page rings, one per queue with its own event channel, named as Linux's
    # blkfront names them (the backend offers order 4 and 4 queues; one queue a CPU)
    order = int(await xs.read(f"{front}/ring-page-order"))
    queues = min(4, os.cpu_count() or 1)
    rings = {f"ring-ref{i}" for i in range(1 << order)} | {"event-channel"}
    assert order == 3
    if queues == 1:
        assert rings <= vbd_front
    else:
        assert int(await xs.read(f"{front}/multi-queue-num-queues")) == queues
        for q in range(queues):
            assert rings <= await _keys(xs, f"{front}/queue-{q}")
    stats = (await system.statistics())["domains"]
    assert [device["queues"] for device in stats["stor"]["vbds"].values()] == [queues] * len(stats["stor"]["vbds"])
    front_stats = stats["guest1"]["devices"]["vbd/51712"]
    # 8-page rings hold 256 requests each; indirect requests carry 256 pages (1 MiB)
    assert (front_stats["queues"], front_stats["ring_slots"], front_stats["max_segments"]) == (queues, 256, 256)
    assert NETBACK_READS <= await _keys(xs, f"/local/domain/{guest.domid}/device/vif/0")
    assert await xs.read(f"/local/domain/{guest.domid}/device/vbd/51712/protocol") == b"x86_64-abi"
