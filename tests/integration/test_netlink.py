"""The pyroute2 adapter against real links in a real sandboxed network namespace."""
from __future__ import annotations

import os
import sys

import pytest
import trio

from ringfence.isolation import netlink
from ringfence.isolation.sandbox import SandboxSpec, spawn_sandboxed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


async def test_bridge_tap_veth_and_addresses_in_a_domain_namespace():
    box = await spawn_sandboxed(SandboxSpec("netns1"), [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = box.pid
        assert await netlink.list_links(pid) == ["lo"]
        await netlink.ensure_bridge("br0", mtu=9000, netns_pid=pid)
        fd, name = await netlink.open_tap_in("vif7.0", pid)
        try:
            assert name == "vif7.0"
            await netlink.set_link("vif7.0", mtu=9000, master="br0", up=True, netns_pid=pid)
            info = await netlink.link_info("vif7.0", pid)
            bridge = await netlink.link_info("br0", pid)
            assert info.master == bridge.index and info.mtu == 9000 and bridge.kind == "bridge"
            # a veth from the host into the domain, with addresses on both families
            await netlink.create_veth("rfv-host", "rfv-dom", peer_netns_pid=pid)
            await netlink.set_link("rfv-dom", mac="02:00:00:00:07:01", up=True, netns_pid=pid)
            await netlink.add_address("rfv-dom", "10.77.0.2/24", pid)
            await netlink.add_address("rfv-dom", "fd00:77::2/64", pid)
            await netlink.add_address("rfv-dom", "10.77.0.2/24", pid)  # idempotent
            addrs = await netlink.addresses("rfv-dom", pid)
            assert "10.77.0.2/24" in addrs and "fd00:77::2/64" in addrs
            assert (await netlink.link_info("rfv-dom", pid)).mac == "02:00:00:00:07:01"
            assert not await netlink.link_exists("br0")  # nothing leaked into the host
            assert await netlink.link_exists("rfv-host")
        finally:
            os.close(fd)
            await netlink.delete_link("rfv-host")
        with pytest.raises(netlink.LinkError):
            await netlink.set_link("nope0", up=True, netns_pid=pid)
    finally:
        await box.aclose()
