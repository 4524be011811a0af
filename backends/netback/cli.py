"""``ringfence netback``: the network backend of a network driver domain."""
from __future__ import annotations

import argparse

import trio

from ringfence._sdnotify import Notifier
from ringfence._statsock import serve_statistics
from ringfence.xenbus.platforms import PLATFORMS, open_platform


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "netback", help="serve vifs (run inside a network driver domain)",
        description="Serve the vifs the toolstack assigns to this domain in XenStore "
        "(backend/vif/FRONTEND/DEVID): a TAP vifFE.DEVID per vif, attached to its bridge.")
    parser.add_argument("--platform", choices=PLATFORMS, default="auto",
                        help="sim (started by the sim hypervisor) or xen (a real Xen driver "
                        "domain, through libxengnttab/libxenevtchn); auto picks sim when "
                        "$RINGFENCE_DOMAIN_FD is set, else xen where /dev/xen exists")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args.platform)
    return 0


async def _serve(platform: str) -> None:
    from ringfence.backends.netback.xenbus import serve_netback
    async with open_platform(platform) as (domain, xs):
        async with trio.open_nursery() as nursery:
            vifs = await nursery.start(serve_netback, domain, xs)
            await nursery.start(serve_statistics, lambda: {
                "domid": domain.domid, "xenstore": xs.statistics(),
                "vifs": {f"{fe}/{devid}": v.statistics() for (fe, devid), v in sorted(vifs.items())}})
            Notifier().ready(status=f"netback serving in domain {domain.domid}")
