"""``ringfence blkback``: the block backend of a storage driver domain."""
from __future__ import annotations

import argparse
import logging

import trio

from ringfence._sdnotify import Notifier
from ringfence._statsock import serve_statistics
from ringfence.xenbus.platforms import PLATFORMS, open_platform

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "blkback", help="serve virtual block devices (run inside a storage driver domain)",
        description="Serve the vbds the toolstack assigns to this domain in XenStore "
        "(backend/vbd/FRONTEND/DEVID with params=PATH and mode=r|w). Run as a sim domain: "
        "the domain's control socket comes in $RINGFENCE_DOMAIN_FD.",
        epilog="example: started by `ringfence up` for each storage driver domain")
    parser.add_argument("--platform", choices=PLATFORMS, default="auto",
                        help="sim (started by the sim hypervisor) or xen (a real Xen driver "
                        "domain, through libxengnttab/libxenevtchn); auto picks sim when "
                        "$RINGFENCE_DOMAIN_FD is set, else xen where /dev/xen exists")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args.platform)
    return 0


async def _serve(platform: str) -> None:
    from ringfence.backends.blkback.xenbus import serve_blkback
    async with open_platform(platform) as (domain, xs):
        async with trio.open_nursery() as nursery:
            devices = await nursery.start(serve_blkback, domain, xs)
            await nursery.start(serve_statistics, lambda: {
                "domid": domain.domid, "xenstore": xs.statistics(),
                "vbds": {f"{fe}/{devid}": d.statistics() for (fe, devid), d in sorted(devices.items())}})
            Notifier().ready(status=f"blkback serving in domain {domain.domid}")
            log.info("blkback ready", extra={"kv": {"domid": domain.domid}})
