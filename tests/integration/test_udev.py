"""Device events without a udev daemon: the kernel's add and remove for a TAP, in a network
namespace of its own, through isolation/udev.py (pyudev, source="kernel")."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TAP")

SCRIPT = """
import os, socket, trio
from ringfence.isolation import netlink, udev

async def main():
    events = udev.open_net_events()
    assert events is not None
    fd, name = netlink.open_tap("rfudev0")
    index = socket.if_nametoindex(name)
    os.close(fd)  # a non-persistent TAP goes with its last fd
    seen = []
    with trio.fail_after(10):
        async for event in events:
            if event.name == "rfudev0":
                seen.append((event.action, event.ifindex == index))
                if event.action == "remove":
                    break
    events.close()
    print(seen)

trio.run(main)
"""


def test_add_and_remove_of_a_tap_arrive_with_its_ifindex():
    ns = f"rfudev{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[('add', True), ('remove', True)]"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
