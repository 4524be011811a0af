"""``ringfence supervise -- COMMAND``: any daemon under ringfence's supervisor.

The supervisor that keeps driver domains running inside `ringfence up`, on its own: the
command runs in a sandbox (its own namespaces, cgroup, rlimits, no privileges), is watched
through sd_notify (READY=1, WATCHDOG=1, STATUS=) and restarted with exponential backoff;
after too many starts in a window it is given up (exit status 1). `supervise` reports
READY=1 itself once the command is ready, so it can be a systemd Type=notify unit.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal

import trio

from ringfence._sdnotify import Notifier
from ringfence.errors import UsageError

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  ringfence supervise --name web --ready-on-start -- python3 -m http.server 8000
  ringfence supervise --name xs -- ringfence xenstored --socket /run/xs.sock --state-dir /var/lib/xs
  ringfence supervise --no-sandbox --burst 3 --interval 10 -- ./flaky-daemon
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "supervise", help="run a command under the supervisor (sandbox, sd_notify, restarts)",
        description=__doc__.split("\n\n", 1)[1].strip(), epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="service", help="service and sandbox name (default: service)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="no namespaces; still its own cgroup and rlimits")
    parser.add_argument("--uid", type=int, help="as root: the uid to run as (default: one of its own)")
    parser.add_argument("--ready-on-start", action="store_true",
                        help="the command does not send READY=1: running counts as ready")
    parser.add_argument("--watchdog", type=float, metavar="S",
                        help="kill and restart when no WATCHDOG=1 comes for S seconds")
    parser.add_argument("--burst", type=int, default=10, help="starts allowed per --interval (default 10)")
    parser.add_argument("--interval", type=float, default=60.0, metavar="S",
                        help="the window of --burst, in seconds (default 60)")
    parser.add_argument("--runtime-dir", default="/run/ringfence-supervise", metavar="DIR",
                        help="its sd_notify sockets (default /run/ringfence-supervise)")
    add_favordynmods_argument(parser)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    parser.set_defaults(func=run_command)


def add_favordynmods_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--favordynmods", action="store_true",
                        help="remount a cgroup hierarchy with favordynmods (Linux 6.0+, as "
                        "root): a domain then joins its cgroup at once instead of waiting "
                        "5-12 ms for an RCU grace period, about a fifth of a cold recovery; "
                        "host-wide (since Linux 6.18 until the host reboots, whatever the "
                        "mount option says later), and forks and exits cost a little more")


def apply_favordynmods(args: argparse.Namespace) -> None:
    """--favordynmods: done and logged, or a warning (the sandboxes start all the same,
    each a grace period slower)."""
    if not args.favordynmods:
        return
    from ringfence.isolation.sandbox import favor_cgroup_moves
    try:
        remounted = favor_cgroup_moves()
    except OSError as exc:
        log.warning("cgroup moves not favoured", extra={"kv": {"error": str(exc)}})
    else:
        log.info("cgroup moves favoured", extra={"kv": {"remounted": remounted or "already"}})


def run_command(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("a command is needed: ringfence supervise [OPTIONS] -- COMMAND [ARGS...]")
    if args.burst < 1 or args.interval <= 0 or (args.watchdog is not None and args.watchdog <= 0):
        raise UsageError("--burst must be >= 1, --interval and --watchdog > 0")
    apply_favordynmods(args)
    return trio.run(_supervise, args, argv)


async def _supervise(args: argparse.Namespace, argv: list[str]) -> int:
    from ringfence.isolation.sandbox import SandboxSpec
    from ringfence.isolation.supervisor import Launch, RestartPolicy, Service, State, Supervisor
    spec = SandboxSpec(args.name, uid=args.uid) if not args.no_sandbox else SandboxSpec(
        args.name, namespaces=frozenset(), uid=args.uid)

    async def prepare() -> Launch:
        return Launch(argv, ready_on_start=args.ready_on_start)

    service = Service(args.name, prepare, spec,
                      RestartPolicy(burst=args.burst, interval=args.interval, watchdog=args.watchdog),
                      runtime_dir=os.path.join(args.runtime_dir, args.name))
    notifier = Notifier()
    stopping = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            supervisor = await nursery.start(Supervisor().run)

            def on_state(svc: Service) -> None:
                if svc.state == State.READY:
                    notifier.ready(status=f"{svc.name} ready (start {svc.starts})")
                elif svc.state in (State.FAILED, State.STOPPED):
                    nursery.cancel_scope.cancel()

            service.on_state = on_state
            await supervisor.add(service)

            async def stop_on_signal() -> None:
                nonlocal stopping
                async for signum in signals:
                    stopping = True
                    log.info("stopping", extra={"kv": {"signal": signal.Signals(signum).name}})
                    notifier.notify(STOPPING=1)
                    await supervisor.stop_all()
                    return
            nursery.start_soon(stop_on_signal)
    stats = service.statistics()
    log.info("supervise ended", extra={"kv": {"service": args.name, "state": stats.state,
                                              "starts": stats.starts, "crashes": stats.crashes}})
    return 0 if stopping and service.state != State.FAILED else 1
