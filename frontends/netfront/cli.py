"""``ringfence netfront``: a guest's eth0 over a vif."""
from __future__ import annotations

import argparse

import trio

from ringfence._sdnotify import Notifier


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "netfront", help="bring up a guest's eth0 over its vif (run inside a guest domain)",
        description="Connect vif DEVID of this guest domain and give it an interface (a TAP "
        "in the guest's network namespace) with the vif's MAC and the given addresses.",
        epilog="example: ringfence netfront --devid 0 --ip 10.0.0.1/24 --ip fd00::1/64")
    parser.add_argument("--devid", type=int, default=0)
    parser.add_argument("--ifname", default="eth0")
    parser.add_argument("--ip", action="append", default=[], metavar="CIDR")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args)
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from ringfence.frontends.netfront.device import NetFront
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    async with open_domain() as domain, open_domain_xenstore(domain) as xs:
        front = NetFront(domain, xs, args.devid, ifname=args.ifname, addresses=tuple(args.ip),
                         mtu=args.mtu)
        async with trio.open_nursery() as nursery:
            await nursery.start(front.run)
            Notifier().ready(status=f"{args.ifname} up")
            print(f"netfront ready ifname={args.ifname}", flush=True)
