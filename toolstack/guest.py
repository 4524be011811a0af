"""``ringfence guest``: everything a sim guest runs in its one domain process.

A domain is one control connection, so a guest with disks and NICs runs them together:
each disk as blkfront + an NBD export, each NIC as netfront (an interface in the guest's
network namespace).
"""
from __future__ import annotations

import argparse

import trio

from ringfence._sdnotify import Notifier


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "guest", help="run a sim guest's frontends (disks over NBD, NICs as eth0, eth1, ...)",
        description="Connect this guest domain's vbds and vifs: each --disk DEVID:SOCKET is "
        "exported over NBD on SOCKET, each --vif DEVID[:CIDR[,CIDR...]] becomes ethN.",
        epilog="example: ringfence guest --disk 51712:/run/g1/xvda.sock --vif 0:10.0.0.1/24")
    parser.add_argument("--disk", action="append", default=[], metavar="DEVID:SOCKET")
    parser.add_argument("--vif", action="append", default=[], metavar="DEVID[:CIDR,...]")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args)
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from ringfence.frontends.blkfront.device import BlkFront
    from ringfence.frontends.blkfront.nbd import NbdServer
    from ringfence.frontends.netfront.device import NetFront
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    async with open_domain() as domain, open_domain_xenstore(domain) as xs:
        async with trio.open_nursery() as nursery:
            for i, spec in enumerate(args.vif):
                devid, _, cidrs = spec.partition(":")
                front = NetFront(domain, xs, int(devid), ifname=f"eth{i}",
                                 addresses=tuple(c for c in cidrs.split(",") if c))
                await nursery.start(front.run)
            for spec in args.disk:
                devid, _, sock = spec.partition(":")
                disk = BlkFront(domain, xs, int(devid))
                await nursery.start(disk.run)
                await nursery.start(NbdServer(disk).serve_unix, sock)
            Notifier().ready(status="guest frontends up")
            print("guest ready", flush=True)
