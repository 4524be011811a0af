"""``ringfence up [CONFIG]``: bring up a host's driver domains and guests, in the foreground."""
from __future__ import annotations

import argparse
import logging
import os
import signal

import trio

from ringfence._sdnotify import Notifier
from ringfence.isolation.cli import add_favordynmods_argument, apply_favordynmods
from ringfence.toolstack.config import ensure_disk_images, load

log = logging.getLogger(__name__)

# Every command that works on a running host takes --runtime-dir; the environment sets
# the default for a whole shell session (and for tests).
DEFAULT_RUNTIME = os.environ.get("RINGFENCE_RUNTIME_DIR", "/run/ringfence")
EXAMPLES = """examples:
  ringfence up                        # the embedded default: stor + guest1 + guest2
  ringfence up examples/host.toml
  qemu-img info nbd+unix:///?socket=/run/ringfence/guests/guest1/xvda.sock   # a guest's disk
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "up", help="start hypervisor, xenstored, supervised driver domains and guests",
        description="Start the sim hypervisor, xenstored, the driver domains (supervised: "
        "relaunched on crash, their devices handed over, guests reconnect) and the guests of "
        "a TOML config (or the embedded default). Runs until SIGTERM, then tears down in order.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="TOML config (default: embedded)")
    parser.add_argument("--runtime-dir", default=DEFAULT_RUNTIME, metavar="DIR",
                        help=f"sockets and state (default {DEFAULT_RUNTIME}); not under /tmp")
    parser.add_argument("--no-sandbox", action="store_true", help="run domains unsandboxed")
    add_favordynmods_argument(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    config = load(args.config, os.path.join(args.runtime_dir, "disks"))
    if args.config is None:
        ensure_disk_images(config)
    apply_favordynmods(args)
    trio.run(_up, config, args)
    return 0


async def _up(config, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    from ringfence.toolstack.system import open_system
    notifier = Notifier()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_system(config, args.runtime_dir, sandboxed=not args.no_sandbox,
                               quiet=not args.verbose) as system:
            from ringfence.toolstack.system import guest_pid
            for guest in system.guests.values():
                for vdev, sock in guest.nbd_sockets.items():
                    print(f"guest={guest.name} domid={guest.domid} disk={vdev} "
                          f"nbd=nbd+unix:///?socket={sock}", flush=True)
                for i, vif in guest.vifs.items():
                    print(f"guest={guest.name} domid={guest.domid} nic=eth{i} mac={vif.mac} "
                          f"ip={','.join(vif.ip)} netns_pid={guest_pid(guest)}", flush=True)
            notifier.ready(status=f"{len(system.guests)} guests up")
            log.info("up", extra={"kv": {"config": config.source, "guests": len(system.guests)}})
            async for signum in signals:
                notifier.notify(STOPPING=1)
                log.info("shutting down", extra={"kv": {"signal": signal.Signals(signum).name}})
                break
