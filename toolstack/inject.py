"""``ringfence inject``: faults for a running system, reproducible and reported.

Faults act on what a real failure would hit: a driver domain's processes (kill -9, SIGSTOP
to hang it, SIGCONT), found through the hypervisor's domain table, never by guessing pids;
a storage driver domain's disks and rings, through its devices' ``fault-inject`` nodes
(:mod:`ringfence.backends.blkback.faults`); a domain's XenStore requests (xenstored's
XS_CONTROL ``inject``); a driver domain's memory limit (its cgroup's); a guest's grants
under its backends' mappings (the hypervisor's REVOKE_MAPPED). Each run prints what it
injected as key=value lines, and for every fault but a signal what the system did about
it: the statistics of the domain, its guests' devices, xenstored's and the hypervisor's
injected faults that moved.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import trio

from ringfence.backends.blkback.faults import RING_FAULTS, node_value
from ringfence.errors import CommandError, UsageError
from ringfence.toolstack.up import DEFAULT_RUNTIME

SIGNALS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "resume": signal.SIGCONT}
DISK_FAULTS = ("eio", "heal")
XENSTORE_FAULTS = ("eagain", "lose-watch")  # of a domain's requests, made by xenstored
EXAMPLES = """examples:
  ringfence inject kill stor                 # kill -9 the storage driver domain
  ringfence inject kill xenstored            # it restarts from its journal; domains redial
  ringfence inject hang net; ringfence inject resume net
  ringfence inject eio stor                  # every disk stor serves fails I/O with EIO
  ringfence inject eio stor --count 10       # ... the next 10 requests only (transient)
  ringfence inject heal stor
  ringfence inject corrupt-index stor        # a request index past the ring: stor disconnects
                                             # the frontend, which reconnects and replays
  ringfence inject corrupt-request stor --count 3 --seed 7   # refused with an error response
  ringfence inject drop-notify stor --count 5  # lost events: the guest looks after 1 s
  ringfence inject storm stor --count 10000  # spurious events: the guest backs off
  ringfence inject eagain guest1 --count 5   # its next 5 transaction commits fail: retried
  ringfence inject lose-watch guest1         # xenstored loses its next watch event
  ringfence inject squeeze stor --bytes 8M   # its cgroup's memory limit: reclaimed, or
                                             # killed and relaunched
  ringfence inject revoke guest1             # end its grants a backend holds mapped:
                                             # every one refused while mapped
  ringfence inject kill stor --repeat 5 --interval 2 --seed 7   # jittered, reproducible
  ringfence inject kill stor.spare           # the warm spare of stor (spare = true): replaced
"""
SPARE = ".spare"  # DRIVER.spare: the warm spare of driver domain DRIVER (named DRIVER.spareN)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "inject", help="inject faults into a running system (kill, hang, disk EIO, rings, XenStore, memory, grants)",
        description="Inject a fault into a domain of a running `ringfence up`, found by name "
        "in the hypervisor's domain table: kill -9 it, stop (hang) or continue (resume) it; "
        "make the disks of a storage driver domain fail (eio, sticky or --count N "
        "requests) and heal; or break its rings as a broken frontend or event channel "
        "would (corrupt-index, corrupt-request, drop-notify, storm: --count times, "
        "corruptions picked by --seed); make xenstored fail a domain's next transaction "
        "commits with EAGAIN or lose its next watch events (eagain, lose-watch: --count); "
        "lower a driver domain's memory limit (squeeze --bytes); or try to end a "
        "domain's grants that another holds mapped (revoke: each must be refused). "
        "Every fault but a "
        "signal's is reported with the statistics that moved over the next --observe "
        "seconds.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fault", choices=sorted([*SIGNALS, *DISK_FAULTS, *RING_FAULTS, *XENSTORE_FAULTS, "squeeze", "revoke"]),
                        help="what to do")
    parser.add_argument("--bytes", metavar="SIZE", help="squeeze: the memory limit (e.g. 8M, 1G)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="eio: fail only the next N requests of each disk; a ring fault, "
                        "eagain or lose-watch: make it N times (default 1; storm: N "
                        "notifications)")
    parser.add_argument("--observe", type=float, default=2.0, metavar="SECONDS",
                        help="how long to watch what the system does about a fault (default 2)")
    parser.add_argument("domain", help="domain name, e.g. stor or net; stor.spare for stor's warm spare")
    parser.add_argument("--runtime-dir", default=DEFAULT_RUNTIME, metavar="DIR",
                        help=f"the host's runtime directory (default {DEFAULT_RUNTIME})")
    parser.add_argument("--repeat", type=int, default=1, metavar="N")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="mean time between repeats (jittered by --seed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="makes the jitter and the corruptions reproducible")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.interval < 0:
        raise UsageError("--repeat must be >= 1 and --interval >= 0")
    if args.observe < 0:
        raise UsageError("--observe must be >= 0")
    if (args.bytes is not None) != (args.fault == "squeeze"):
        raise UsageError("--bytes SIZE goes with squeeze, and squeeze needs it")
    if args.count is not None and args.fault not in (*DISK_FAULTS, *RING_FAULTS, *XENSTORE_FAULTS):
        raise UsageError(f"--count goes with eio, a ring fault, eagain or lose-watch, not {args.fault}")
    if args.fault in DISK_FAULTS or args.fault in RING_FAULTS:
        return _device_fault(args)
    if args.fault in XENSTORE_FAULTS:
        return _reported(args, _xenstore_fault)
    if args.fault in ("squeeze", "revoke"):
        return _reported(args, _squeeze if args.fault == "squeeze" else _revoke)
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


def _device_fault(args: argparse.Namespace) -> int:
    """A fault of the disks or rings of a storage driver domain's devices."""
    if args.count is not None and (args.count < 1 or args.fault == "heal"):
        raise UsageError("--count N (N >= 1) goes with eio or a ring fault")
    fault = node_value(args.fault, args.count, args.seed)

    def make(args: argparse.Namespace) -> str:
        from ringfence.toolstack.control import call
        result = call(args.runtime_dir, "disk-fault", driver=args.domain, fault=fault)
        return (f"disks={result['disks']} count={args.count or ('all' if args.fault == 'eio' else 1)} "
                f"seed={args.seed}")
    return _reported(args, make)


def _xenstore_fault(args: argparse.Namespace) -> str:
    """xenstored fails a domain's next transaction commits, or loses its next watch events
    (XS_CONTROL inject, which Xen's xenstore-control can send too)."""
    count = 1 if args.count is None else args.count
    if count < 1:
        raise UsageError("--count must be >= 1")
    domid = _domid(args)

    async def send() -> None:
        from ringfence.xenbus.client import open_xenstore
        async with open_xenstore(os.path.join(args.runtime_dir, "xenstored.sock")) as xs:
            await xs.control("inject", args.fault, str(domid), str(count))
    trio.run(send)
    return f"domid={domid} count={count}"


def _domid(args: argparse.Namespace) -> int:
    from ringfence.toolstack.control import call
    rows = [row for row in call(args.runtime_dir, "list") if row["name"] == args.domain]
    if not rows or not rows[0].get("domid"):
        raise CommandError(f"no running domain named {args.domain!r} (see 'ringfence list')")
    return int(rows[0]["domid"])


def _revoke(args: argparse.Namespace) -> str:
    """The hypervisor ends, as the domain would, each of its grants another domain holds
    mapped: every one must be refused while the mapping lasts (XSA-396)."""
    domid = _domid(args)

    async def revoke() -> dict[str, int]:
        from ringfence.hypervisor.sim.client import open_dom0
        async with open_dom0(os.path.join(args.runtime_dir, "hv.sock")) as dom0:
            return await dom0.revoke_mapped(domid)
    result = trio.run(revoke)
    return f"domid={domid} tried={result['tried']} refused={result['refused']} ended={result['ended']}"


def _squeeze(args: argparse.Namespace) -> str:
    from ringfence.toolstack.control import call
    result = call(args.runtime_dir, "squeeze", driver=args.domain, limit=str(_size(args.bytes)))
    return f"limit={result['limit']} using={result['using']}"


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in "KMG" else (text, "")
    if not number.isdigit() or int(number) * units[unit] < 1 << 20:
        raise UsageError(f"--bytes {text}: a size of at least 1M (e.g. 8M, 1G)")
    return int(number) * units[unit]


def _reported(args: argparse.Namespace, make: Callable[[argparse.Namespace], str]) -> int:
    """Make a fault, print what was injected, then what moved over ``--observe`` seconds."""
    from ringfence.toolstack.control import call
    before = call(args.runtime_dir, "stats")
    made = make(args)
    print(f"injected={args.fault} domain={args.domain} {made} t={time.time():.3f}", flush=True)
    time.sleep(args.observe)
    after = call(args.runtime_dir, "stats")
    for key, old, new in moved(before, after, args.domain):
        print(f"moved={key} before={old} after={new}", flush=True)
    return 0


def moved(before: dict[str, Any], after: dict[str, Any], domain: str) -> list[tuple[str, Any, Any]]:
    """The statistics that changed between two ``stats`` snapshots, as (dotted key, before,
    after): ``domain``'s own, its service's, the devices of guests it serves, and the
    faults xenstored and the hypervisor counted."""
    def leaves(tree: Any, prefix: str) -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}.{key}").items()}
        return {prefix: tree} if isinstance(tree, (int, float, str)) and not isinstance(tree, bool) else {}

    def watched(stats: dict[str, Any]) -> dict[str, Any]:
        domains = stats.get("domains", {})
        mine = domains.get(domain, {})
        found = leaves(mine, domain)
        found.update(leaves(stats.get("xenstored", {}).get("server", {}).get("injected_faults", {}),
                            "xenstored.injected_faults"))
        found.update(leaves(stats.get("services", {}).get(domain, {}), f"services.{domain}"))
        hypervisor = stats.get("hypervisor", {}).get("hypervisor", {})
        found.update({f"hypervisor.{key}": hypervisor.get(key, 0)
                      for key in ("revokes_refused", "revoked_under_mapping")})
        for guest in stats.get("guests", {}):
            for name, device in domains.get(guest, {}).get("devices", {}).items():
                if device.get("backend_id") == mine.get("domid"):  # served by the driver
                    found.update(leaves(device, f"{guest}.{name}"))
        return found

    old, new = watched(before), watched(after)
    return [(key, old.get(key), value) for key, value in new.items() if old.get(key) != value]


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
