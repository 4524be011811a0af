"""``ringfence hypervisor``: run the sim hypervisor daemon in the foreground."""
from __future__ import annotations

import argparse
import logging
import os
import signal

import trio

from ringfence._sdnotify import Notifier
from ringfence.errors import CommandError
from ringfence.hypervisor.sim.hypervisor import Hypervisor

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/ringfence/hypervisor.sock"
SOCKET_ENV = "RINGFENCE_HYPERVISOR"

EXAMPLES = """examples:
  ringfence hypervisor --socket /tmp/hv.sock     # serve; dom0 tools connect to /tmp/hv.sock
  RINGFENCE_HYPERVISOR=/tmp/hv.sock ringfence demo
"""


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV, DEFAULT_SOCKET)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "hypervisor", help="run the sim hypervisor (domains, grant tables, event channels)",
        description="Run the sim hypervisor daemon in the foreground. It owns the domain "
        "table, the grant tables and the event channels of every sim domain; dom0 tools "
        "reach it on a Unix socket that only its owner may open.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", default=default_socket(), metavar="PATH",
                        help=f"control socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    directory = os.path.dirname(os.path.abspath(args.socket))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700)
        except OSError as exc:
            raise CommandError(f"cannot create {directory}: {exc.strerror}") from None
    trio.run(_serve, args.socket)
    return 0


async def _serve(path: str) -> None:
    hypervisor = Hypervisor()
    notifier = Notifier()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(hypervisor.serve, path)
            log.info("hypervisor ready", extra={"kv": {"socket": path}})
            notifier.ready(status=f"serving on {path}")
            async for signum in signals:
                log.info("shutting down", extra={"kv": {"signal": signal.Signals(signum).name}})
                notifier.notify(STOPPING=1)
                nursery.cancel_scope.cancel()
                break
    try:
        os.unlink(path)
    except OSError:
        pass
