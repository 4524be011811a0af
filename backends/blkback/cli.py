"""``ringfence blkback``: the block backend of a storage driver domain."""
from __future__ import annotations

import argparse

import trio

from ringfence.xenbus.platforms import add_platform_argument, serve_backend_domain


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "blkback", help="serve virtual block devices (run inside a storage driver domain)",
        description="Serve the vbds the toolstack assigns to this domain in XenStore "
        "(backend/vbd/FRONTEND/DEVID with params=PATH and mode=r|w). Run as a sim domain: "
        "the domain's control socket comes in $RINGFENCE_DOMAIN_FD.",
        epilog="example: started by `ringfence up` for each storage driver domain")
    add_platform_argument(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args.platform)
    return 0


async def _serve(platform: str) -> None:
    from ringfence.backends.blkback.xenbus import serve_blkback
    await serve_backend_domain(platform, "blkback", "vbds", serve_blkback)
