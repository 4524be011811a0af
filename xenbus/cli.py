"""``ringfence xenstored``: the XenStore daemon in the foreground."""
from __future__ import annotations

import argparse
import logging
import os
import signal

import trio

from ringfence._sdnotify import Notifier
from ringfence._statsock import serve_statistics
from ringfence.errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/ringfence/xenstored.sock"

EXAMPLES = """examples:
  ringfence xenstored --socket /tmp/xs.sock
  XENSTORED_PATH=/tmp/xs.sock xenstore-write /vm/name demo   # Xen's own tools work
  ringfence xenstored --socket /tmp/xs.sock --state-dir /var/lib/ringfence/xenstore \\
      --hypervisor /run/ringfence/hypervisor.sock            # durable; serves sim domains
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "xenstored", help="run the XenStore daemon (a drop-in for Xen's xenstored)",
        description="Serve XenStore on a Unix socket for dom0 tools (Xen's xenstore-* tools "
        "reach it with XENSTORED_PATH), and to sim domains through the hypervisor.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", default=os.environ.get("XENSTORED_PATH", DEFAULT_SOCKET),
                        metavar="PATH", help=f"dom0 socket (default $XENSTORED_PATH or {DEFAULT_SOCKET})")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="journal every change here before replying (it survives a crash "
                        "of the daemon) and restore from it on start")
    parser.add_argument("--fsync", action="store_true",
                        help="with --state-dir: flush each change to disk too (survives a "
                        "crash of the host; costs a disk round trip per change)")
    parser.add_argument("--hypervisor", metavar="SOCKET",
                        help="serve the sim domains of this hypervisor")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    directory = os.path.dirname(os.path.abspath(args.socket))
    try:
        os.makedirs(directory, exist_ok=True)
        if args.state_dir:
            os.makedirs(args.state_dir, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create {exc.filename}: {exc.strerror}") from None
    trio.run(_serve, args)
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from ringfence.xenbus.server import XenStoreServer
    server = XenStoreServer()
    if args.state_dir:
        from ringfence.xenbus.persistence import Journal
        Journal.open(args.state_dir, server, fsync=args.fsync)
    notifier = Notifier()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_unix, args.socket)
            await nursery.start(serve_statistics, lambda: {
                "server": server.statistics(),
                "engine": server.engine.statistics() if server.engine is not None else None})
            if args.hypervisor:
                from ringfence.xenbus.sim import serve_hypervisor_domains
                await nursery.start(serve_hypervisor_domains, server, args.hypervisor)
            log.info("xenstored ready", extra={"kv": {"socket": args.socket,
                                                      "nodes": len(server.store.nodes)}})
            notifier.ready(status=f"serving {args.socket}")
            async for signum in signals:
                log.info("shutting down", extra={"kv": {"signal": signal.Signals(signum).name}})
                nursery.cancel_scope.cancel()
                break
