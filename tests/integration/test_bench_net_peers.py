"""The net benchmark's own C tools (bench/net_peers.c) do what its numbers assume: the relay
that measures the floor carries frames between real TAPs across a real bridge, the paced
sender keeps its rate, the receiver counts what arrives, and the TAP writer writes."""
from __future__ import annotations

import subprocess

from ringfence.bench import net
from ringfence.bench.cbuild import build


def test_the_relay_carries_paced_datagrams_between_two_namespaces_over_a_bridge(tmp_path):
    binary = build("net_peers.c", str(tmp_path), "-pthread")
    with net._tap_relay(binary) as (a, b):
        subprocess.run(a + ["ping", "-c", "1", "-W", "5", "10.98.0.2"], check=True,
                       capture_output=True)
        received = net._udp(binary, a, b, "10.98.0.2", 1.0, 20_000)
    # paced at 20 000/s: the rate received is the rate offered, give or take the clock
    assert 17_000 < received < 23_000
    assert net._tap_peer(binary, 0.2) > 10_000


def test_the_tools_refuse_a_command_line_they_do_not_know(tmp_path):
    binary = build("net_peers.c", str(tmp_path), "-pthread")
    result = subprocess.run([binary, "udpsend", "10.0.0.1"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: net_peers" in result.stderr
