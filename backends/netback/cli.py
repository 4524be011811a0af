"""``ringfence netback``: the network backend of a network driver domain."""
from __future__ import annotations

import argparse

import trio

from ringfence._sdnotify import Notifier
from ringfence._statsock import serve_statistics


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "netback", help="serve vifs (run inside a network driver domain)",
        description="Serve the vifs the toolstack assigns to this domain in XenStore "
        "(backend/vif/FRONTEND/DEVID): a TAP vifFE.DEVID per vif, attached to its bridge.")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve)
    return 0


async def _serve() -> None:
    from ringfence.backends.netback.xenbus import serve_netback
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    async with open_domain() as domain, open_domain_xenstore(domain) as xs:
        async with trio.open_nursery() as nursery:
            vifs = await nursery.start(serve_netback, domain, xs)
            await nursery.start(serve_statistics, lambda: {
                "domid": domain.domid, "xenstore": xs.statistics(),
                "vifs": {f"{fe}/{devid}": v.statistics() for (fe, devid), v in sorted(vifs.items())}})
            Notifier().ready(status=f"netback serving in domain {domain.domid}")
