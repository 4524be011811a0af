"""``ringfence inject``: faults for a running system, reproducible and reported.

Faults act on what a real failure would hit: a driver domain's processes (kill -9, SIGSTOP
to hang it, SIGCONT), found through the hypervisor's domain table, never by guessing pids.
Each run prints what it injected as key=value lines.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import time

import trio

from ringfence.errors import CommandError, UsageError
from ringfence.toolstack.up import DEFAULT_RUNTIME

SIGNALS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "resume": signal.SIGCONT}
DISK_FAULTS = ("eio", "heal")
EXAMPLES = """examples:
  ringfence inject kill stor                 # kill -9 the storage driver domain
  ringfence inject kill xenstored            # it restarts from its journal; domains redial
  ringfence inject hang net; ringfence inject resume net
  ringfence inject eio stor                  # every disk stor serves fails I/O with EIO
  ringfence inject eio stor --count 10       # ... the next 10 requests only (transient)
  ringfence inject heal stor
  ringfence inject kill stor --repeat 5 --interval 2 --seed 7   # jittered, reproducible
  ringfence inject kill stor.spare           # the warm spare of stor (spare = true): replaced
"""
SPARE = ".spare"  # DRIVER.spare: the warm spare of driver domain DRIVER (named DRIVER.spareN)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "inject", help="inject faults into a running system (kill, hang, resume, disk EIO)",
        description="Inject a fault into a domain of a running `ringfence up`, found by name "
        "in the hypervisor's domain table: kill -9 it, stop (hang) or continue (resume) it, "
        "or make the disks of a storage driver domain fail (eio, sticky or --count N "
        "requests) and heal.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fault", choices=sorted([*SIGNALS, *DISK_FAULTS]), help="what to do")
    parser.add_argument("--count", type=int, metavar="N",
                        help="eio: fail only the next N requests of each disk")
    parser.add_argument("domain", help="domain name, e.g. stor or net; stor.spare for stor's warm spare")
    parser.add_argument("--runtime-dir", default=DEFAULT_RUNTIME, metavar="DIR",
                        help=f"the host's runtime directory (default {DEFAULT_RUNTIME})")
    parser.add_argument("--repeat", type=int, default=1, metavar="N")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="mean time between repeats (jittered by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="makes the jitter reproducible")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.interval < 0:
        raise UsageError("--repeat must be >= 1 and --interval >= 0")
    if args.fault in DISK_FAULTS:
        if args.count is not None and (args.count < 1 or args.fault != "eio"):
            raise UsageError("--count N (N >= 1) goes with eio")
        from ringfence.toolstack.control import call
        fault = "" if args.fault == "heal" else "eio" + (f":{args.count}" if args.count else "")
        result = call(args.runtime_dir, "disk-fault", driver=args.domain, fault=fault)
        print(f"injected={args.fault} domain={args.domain} disks={result['disks']} "
              f"count={args.count or 'all'} t={time.time():.3f}", flush=True)
        return 0
    socket_path = os.path.join(args.runtime_dir, "hv.sock")
    if not os.path.exists(socket_path):
        raise CommandError(f"no running system in {args.runtime_dir} (no {socket_path})")
    try:
        trio.run(_inject, args, socket_path)
    except trio.TooSlowError:
        if args.domain.endswith(SPARE):
            raise CommandError(f"no warm spare of {args.domain.removesuffix(SPARE)} ran within 30 s "
                               "(its config needs spare = true)") from None
        raise CommandError(f"{args.domain} is not running and did not come back within 30 s "
                           "(its supervisor may have given up: see 'ringfence list')") from None
    return 0


async def _inject(args: argparse.Namespace, socket_path: str) -> None:
    from ringfence.hypervisor.sim.client import open_dom0
    rng = random.Random(args.seed)
    async with open_dom0(socket_path) as dom0:
        for i in range(args.repeat):
            if i:
                await trio.sleep(args.interval * rng.uniform(0.5, 1.5))
            with trio.fail_after(30):
                while True:  # a relaunch may be under way: wait for the domain to be back
                    domains = await dom0.list_domains()
                    match = [d for d in domains if _names(args.domain, d["name"])
                             and d["state"] == "running" and d["pid"] > 0]
                    if match:
                        break
                    if args.domain in DAEMONS:  # not a domain: a supervised dom0 daemon
                        pid = await trio.to_thread.run_sync(_daemon_pid, args.runtime_dir, args.domain)
                        if pid:
                            match = [{"domid": 0, "pid": pid}]
                            break
                    elif not any(_names(args.domain, d["name"]) for d in domains) and i == 0 and not _known(
                            args.runtime_dir, args.domain.removesuffix(SPARE)):
                        raise CommandError(f"no domain named {args.domain!r} (see 'ringfence list')")
                    await trio.sleep(0.05)
            domain = match[0]
            os.kill(domain["pid"], SIGNALS[args.fault])
            print(f"injected={args.fault} domain={domain.get('name', args.domain)} domid={domain['domid']} "
                  f"pid={domain['pid']} seed={args.seed} n={i + 1} t={time.time():.3f}", flush=True)


def _names(wanted: str, name: str) -> bool:
    """Whether the domain ``name`` is the one ``wanted`` names: itself, or for DRIVER.spare
    whichever spare of DRIVER runs now (a spare that took over is DRIVER itself)."""
    if wanted.endswith(SPARE):
        return name.startswith(wanted) and name[len(wanted):].isdigit()
    return name == wanted


DAEMONS = ("xenstored",)  # faults for dom0's own daemons: xenstored restarts from its journal


def _daemon_pid(runtime_dir: str, name: str) -> int:
    from ringfence.toolstack.control import call
    return int(call(runtime_dir, "service-pid", service=name).get("pid") or 0)


def _known(runtime_dir: str, name: str) -> bool:
    """A driver domain of the running host, perhaps between a crash and its relaunch."""
    from ringfence.toolstack.control import call
    try:
        return any(row["name"] == name for row in call(runtime_dir, "list"))
    except CommandError:
        return True  # no control socket to ask: keep waiting for the domain
