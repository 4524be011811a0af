"""``ringfence bench net``: guest-to-guest networking through a network driver domain.

TCP: iperf3 between two network namespaces joined by a plain veth pair (peer) against
iperf3 between two sandboxed guests through netfront → rings → netback → bridge (ours).
Small packets: 64-byte UDP datagrams per second received guest to guest (iperf3 -u -l 64)
against the rate at which 64-byte frames can be written straight into a TAP (peer, C).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable

import trio

from ringfence.bench.report import Metric

TAP_WRITER = r"""
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    int fd = open("/dev/net/tun", O_RDWR);
    struct ifreq ifr; memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI; strcpy(ifr.ifr_name, "rfbench0");
    if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("tap"); return 1; }
    int s = socket(AF_INET, SOCK_DGRAM, 0);   /* a TAP that is down refuses writes */
    ioctl(s, SIOCGIFFLAGS, &ifr); ifr.ifr_flags |= IFF_UP; ioctl(s, SIOCSIFFLAGS, &ifr);
    unsigned char frame[64 + 42]; memset(frame, 0xff, 6); memset(frame + 6, 2, 6);
    frame[12] = 0x08; frame[13] = 0x00;
    struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
    long n = 0; double t;
    do { for (int i = 0; i < 10000; i++) if (write(fd, frame, sizeof frame) > 0) n++;
         clock_gettime(CLOCK_MONOTONIC, &b); t = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    } while (t < 2.0);
    printf("%.0f\n", n / t); return 0;
}
"""


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def _iperf(client_ns: list[str], server_ns: list[str], address: str, extra: list[str],
           seconds: int) -> dict[str, object]:
    server = subprocess.Popen(server_ns + ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = _run(client_ns + ["iperf3", "-c", address, "-t", str(seconds), "-J", *extra])
        return json.loads(out.stdout)  # type: ignore[no-any-return]
    finally:
        server.kill()
        server.wait()


def _veth_peer(seconds: int) -> float:
    """TCP bits/s over a veth pair between two fresh network namespaces."""
    a, b = f"rfa{os.getpid()}", f"rfb{os.getpid()}"
    try:
        for ns in (a, b):
            _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", "rfva", "netns", a, "type", "veth", "peer", "rfvb", "netns", b])
        for ns, dev, ip in ((a, "rfva", "10.99.0.1/24"), (b, "rfvb", "10.99.0.2/24")):
            _run(["ip", "-n", ns, "addr", "add", ip, "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        result = _iperf(["ip", "netns", "exec", a], ["ip", "netns", "exec", b], "10.99.0.2", [], seconds)
        return float(result["end"]["sum_received"]["bits_per_second"])  # type: ignore[index]
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _tap_peer(directory: str) -> float:
    source = os.path.join(directory, "tapw.c")
    binary = os.path.join(directory, "tapw")
    with open(source, "w") as f:
        f.write(TAP_WRITER)
    _run(["gcc", "-O2", "-o", binary, source])
    ns = f"rft{os.getpid()}"
    try:
        _run(["ip", "netns", "add", ns])
        rate = float(_run(["ip", "netns", "exec", ns, binary]).stdout)
        if rate <= 0:
            raise RuntimeError("TAP writer peer measured nothing")
        return rate
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.asynccontextmanager
async def _guests(directory: str) -> AsyncIterator[dict[int, int]]:
    """Two netfront guests on a network driver domain: their process ids, for nsenter."""
    from ringfence.testing.sim import open_net_host
    async with open_net_host(directory, name="bench-net") as host:
        pids = {}
        for n in (1, 2):
            guest = await host.start_guest(f"bench-g{n}", mac=f"02:00:00:00:01:0{n}",
                                           netfront_args=["--ip", f"10.88.0.{n}/24"])
            pids[n] = guest.pid
        yield pids


async def _run_async(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    seconds = 3 if quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        progress("peer: iperf3 TCP over a veth pair")
        veth = await trio.to_thread.run_sync(_veth_peer, seconds)
        progress("peer: 64-byte frames written straight into a TAP")
        tap = await trio.to_thread.run_sync(_tap_peer, tmp)
        progress("ours: two guests through the network driver domain")
        async with _guests(tmp) as pids:
            g1, g2 = (["nsenter", "-t", str(pids[n]), "-n"] for n in (1, 2))
            tcp = await trio.to_thread.run_sync(_iperf, g1, g2, "10.88.0.2", [], seconds)
            udp = await trio.to_thread.run_sync(_iperf, g1, g2, "10.88.0.2",
                                                ["-u", "-l", "64", "-b", "0"], seconds)
    ours_tcp = float(tcp["end"]["sum_received"]["bits_per_second"])  # type: ignore[index]
    udp_sum = udp["end"]["sum"]  # type: ignore[index]
    received = udp_sum["packets"] - udp_sum["lost_packets"]
    ours_pps = received / udp_sum["seconds"]
    return [Metric("tcp_throughput", ours_tcp, veth, "bits/s", ">=0.5"),
            Metric("udp_64b_pps", ours_pps, tap, "packets/s", ">=0.2")]


def run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    return trio.run(_run_async, quick, progress)
