"""``ringfence blkfront``: a guest's virtual disk, exported over NBD inside the guest."""
from __future__ import annotations

import argparse
import logging
import os

import trio

from ringfence._sdnotify import Notifier

log = logging.getLogger(__name__)

EXAMPLES = """examples (inside a guest domain):
  ringfence blkfront --devid 51712 --nbd /run/xvda.sock
  qemu-img info nbd+unix:///?socket=/run/xvda.sock
  nbdcopy disk.img nbd+unix:///?socket=/run/xvda.sock
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "blkfront", help="connect a guest's vbd and export it over NBD",
        description="Connect the vbd DEVID of this guest domain to its backend and serve it as "
        "an NBD export (fixed newstyle) on a Unix socket, and optionally TCP. Requests pause "
        "while the backend restarts; nothing acknowledged is lost.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devid", type=int, default=51712, help="virtual device number (51712 = xvda)")
    parser.add_argument("--nbd", metavar="SOCKET", required=True, help="Unix socket to serve NBD on")
    parser.add_argument("--nbd-tcp", type=int, metavar="PORT", help="also serve on 127.0.0.1:PORT")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    trio.run(_serve, args)
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from ringfence.frontends.blkfront.device import BlkFront
    from ringfence.frontends.blkfront.nbd import NbdServer
    from ringfence.hypervisor.sim.client import open_domain
    from ringfence.xenbus.sim import open_domain_xenstore
    async with open_domain() as domain, open_domain_xenstore(domain) as xs:
        persistent = os.environ.get("RINGFENCE_BLKFRONT_PERSISTENT", "1") != "0"
        front = BlkFront(domain, xs, args.devid, persistent=persistent)
        async with trio.open_nursery() as nursery:
            await nursery.start(front.run)
            server = NbdServer(front)
            await nursery.start(server.serve_unix, args.nbd)
            if args.nbd_tcp:
                await nursery.start(server.serve_tcp, args.nbd_tcp)
            Notifier().ready(status=f"vbd {args.devid} on {args.nbd}")
            log.info("blkfront exporting", extra={"kv": {"devid": args.devid, "socket": args.nbd,
                                                         "size": front.size}})
