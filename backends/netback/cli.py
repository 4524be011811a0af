"""``ringfence netback``: the network backend of a network driver domain."""
from __future__ import annotations

import argparse

import trio

from ringfence.xenbus.platforms import add_platform_argument, serve_backend_domain


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "netback", help="serve vifs (run inside a network driver domain)",
        description="Serve the vifs the toolstack assigns to this domain in XenStore "
        "(backend/vif/FRONTEND/DEVID): a TAP vifFE.DEVID per vif, attached to its bridge.")
    add_platform_argument(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args.platform)
    return 0


async def _serve(platform: str) -> None:
    from ringfence.backends.netback.xenbus import serve_netback
    await serve_backend_domain(platform, "netback", "vifs", serve_netback)
