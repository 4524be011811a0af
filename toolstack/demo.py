"""``ringfence demo``: the sim hypervisor, two domains and a ring between them.

A front domain grants a ring page and an event channel to a back domain, which maps and
binds them; requests in the blkif geometry (112-byte requests, 16-byte responses, 32 slots)
flow through the ring; then the statistics of every part are printed. Each domain runs in
its own sandbox when run as root.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import trio

from ringfence.errors import CommandError
from ringfence.toolstack.ringpair import run_ring_pair

EXAMPLES = """examples:
  ringfence demo                      # 200000 requests, 32 in flight
  ringfence demo --requests 1000000 --depth 8
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo", help="show the hypervisor, two domains and a ring at work",
        description="Start a sim hypervisor and two sandboxed domains, share a ring between "
        "them through a grant and an event channel, carry requests over it, and print the "
        "statistics of the ring ends, grant tables, event channels and hypervisor.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000, metavar="N",
                        help="requests to send (default 200000)")
    parser.add_argument("--depth", type=int, default=32, choices=range(1, 33), metavar="1..32",
                        help="requests in flight (default 32)")
    parser.add_argument("--no-sandbox", action="store_true", help="run domains unsandboxed")
    parser.add_argument("--ring-only", action="store_true", help="only part 1 (the ring)")
    parser.add_argument("--kills", type=int, default=2, metavar="N",
                        help="times to kill the storage driver domain in part 2 (default 2)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.requests < 1:
        from ringfence.errors import UsageError
        raise UsageError("--requests must be at least 1")
    sandboxed = os.geteuid() == 0 and not args.no_sandbox
    started = time.monotonic()
    if not getattr(args, "verbose", 0):
        # The tour narrates what happens; the daemons' own logs are for -v.
        logging.getLogger("ringfence").setLevel(logging.ERROR)

    clear = "\r\033[K" if sys.stdout.isatty() else ""  # over the live status line

    def progress(text: str) -> None:
        print(f"{clear}  [{time.monotonic() - started:5.2f}s] {text}", flush=True)

    print("ringfence demo: sim hypervisor, two domains, one shared ring"
          + (" (each domain sandboxed)" if sandboxed else ""))
    mode = "qd1" if args.depth == 1 else "batched"
    result = trio.run(lambda: run_ring_pair(mode, (-1, -1), args.requests, args.depth,
                                            sandboxed=sandboxed, progress=progress))
    rate = 1 / result["seconds_per_request"]
    progress(f"done: {args.requests} requests answered, {rate:,.0f} requests/s, "
             f"{result['seconds_per_request'] * 1e6:.2f} us each")
    print()
    _print_statistics(result)
    if args.ring_only:
        return 0
    print()
    print("part 2: storage driver domain crashes under a verified write workload"
          + (" (sandboxed)" if sandboxed else ""))
    summary = trio.run(lambda: _storage_crash_demo(progress, sandboxed, args.kills, started))
    print()
    print(f"{'guest':<8} {'fio verify':<11} {'written':>10} {'io errors':>9}")
    for row in summary["guests"]:
        print(f"{row['guest']:<8} {row['verify']:<11} {row['written']:>10} {row['errors']:>9}")
    print()
    for i, ms in enumerate(summary["recoveries"], 1):
        print(f"kill {i}: storage driver domain relaunched and ready in {ms:.0f} ms")
    if summary.get("network"):
        net = summary["network"]
        print(f"network driver domain relaunched and ready in {net['recovery_ms']:.0f} ms; "
              f"ping across the kill: {net['ping']}")
        if "iperf3" in net:
            print(f"iperf3 guest1 -> guest2: {net['iperf3']}")
    ok = all(row["verify"] == "passed" for row in summary["guests"])
    print(f"result: {'every guest verified its data' if ok else 'VERIFY FAILED'}; "
          f"{len(summary['recoveries'])} recoveries, guests never saw an I/O error"
          if ok else "result: VERIFY FAILED")
    return 0 if ok else 1


async def _output(process: Any) -> bytes:
    data = b""
    while chunk := await process.stdout.receive_some(65536):
        data += chunk
    await process.wait()
    return data


async def _network_crash(system: Any, progress: Any) -> dict[str, Any]:
    """guest1 pings guest2 and sends it TCP (iperf3) through the network driver domain,
    which is killed in the middle."""
    import shutil
    import subprocess
    from ringfence.toolstack.system import guest_pid
    guests = [g for g in system.guests.values() if g.vifs]
    if "net" not in system.drivers or len(guests) < 2:
        return {}
    g1, g2 = guests[:2]
    target = g2.vifs[0].ip[0].split("/")[0]

    def inside(guest: Any, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(guest_pid(guest)), "-n", *argv]

    progress(f"{g1.name} pings {g2.name} ({target}) and runs iperf3 to it, through the network driver domain")
    ping = await trio.lowlevel.open_process(inside(g1, "ping", "-c", "50", "-i", "0.1", "-W", "2", target),
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    iperf = None
    if shutil.which("iperf3"):
        server = await trio.lowlevel.open_process(inside(g2, "iperf3", "-s", "-1"),
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await trio.sleep(0.5)
        iperf = await trio.lowlevel.open_process(
            inside(g1, "iperf3", "-c", target, "-t", "5", "-i", "1", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    await trio.sleep(1.5)
    before = len(system.recoveries)
    progress("kill -9 network driver domain")
    system.drivers["net"].kill()
    with trio.fail_after(30):
        while len(system.recoveries) == before:
            await trio.sleep(0.01)
    recovery_ms = system.recoveries[-1][1]
    progress(f"network driver domain relaunched, ready in {recovery_ms:.0f} ms; netfronts reconnect")
    summary = [line for line in (await _output(ping)).decode().splitlines() if "packets transmitted" in line]
    result = {"recovery_ms": recovery_ms, "ping": summary[0] if summary else "no summary"}
    progress(f"ping: {result['ping']}")
    if iperf is not None:
        try:
            report = json.loads(await _output(iperf))
            intervals = [i["sum"]["bits_per_second"] / 1e6 for i in report["intervals"]]
            mbps = report["end"]["sum_received"]["bits_per_second"] / 1e6
            result["iperf3"] = (f"{mbps:.0f} Mbit/s over the kill; per second: "
                                + " ".join(f"{m:.0f}" for m in intervals))
        except (ValueError, KeyError, TypeError):
            result["iperf3"] = "no report"
        with trio.move_on_after(5):
            await server.wait()
        progress(f"iperf3: {result['iperf3']}")
    return result


async def _live_view(system: Any, started: float) -> None:
    """A status line from the domains' own statistics: refreshed in place on a terminal,
    every two seconds otherwise."""
    tty = sys.stdout.isatty()
    while True:
        stats = (await system.statistics())["domains"]
        parts = []
        for name in system.guests:
            device = (stats.get(name, {}).get("devices") or {}).get("vbd/51712") or {}
            parts.append(f"{name}: {device.get('bytes_written', 0) >> 20} MiB written, "
                         f"{device.get('replayed', 0)} replayed")
        line = (f"  [{time.monotonic() - started:5.2f}s] live: " + "; ".join(parts)
                + f"; recoveries {len(system.recoveries)}")
        if tty:
            print("\r\033[K" + line, end="", flush=True)
            await trio.sleep(0.3)
        else:
            print(line, flush=True)
            await trio.sleep(2)


async def _kill_under_fio(system: Any, progress: Any, jobs: dict[str, Any], collect: Any,
                          outputs: dict[str, bytes], kills: int) -> None:
    async with trio.open_nursery() as nursery:
        for name, proc in jobs.items():
            nursery.start_soon(collect, name, proc)
        for i in range(kills):
            await trio.sleep(0.8)
            if len(outputs) == len(jobs):
                break
            service = system.drivers["stor"]
            progress(f"kill -9 storage driver domain (pid {service.process.pid if service.process else '?'})")
            service.kill()
            with trio.fail_after(30):
                while len(system.recoveries) <= i:
                    await trio.sleep(0.01)
            progress(f"storage driver domain relaunched, ready in {system.recoveries[i][1]:.0f} ms; "
                     "guests reconnect and replay")


async def _storage_crash_demo(progress: Any, sandboxed: bool, kills: int, started: float) -> dict[str, Any]:
    import shutil
    import subprocess
    from ringfence.isolation.spawn import open_process_dying_with_us
    from ringfence.toolstack.config import ensure_disk_images, load
    from ringfence.toolstack.system import open_system
    if not shutil.which("fio"):
        raise CommandError("part 2 needs fio (apt-get install fio); use --ring-only")
    runtime = f"/run/ringfence-demo-{os.getpid()}"
    config = load(None, os.path.join(runtime, "disks"))
    ensure_disk_images(config, 64 << 20)
    try:
        async with open_system(config, runtime, sandboxed=sandboxed) as system:
            progress(f"up: {', '.join(system.drivers)} (driver) + {', '.join(system.guests)} (guests)")
            jobs = {}
            for name, guest in system.guests.items():
                uri = f"nbd+unix:///?socket={guest.nbd_sockets['xvda']}"
                # Dying with us, its job a thread of its own process (--thread): a fio left
                # behind when its guest's NBD server goes spins at a whole CPU for good (two
                # were found 30 minutes after a demo's kill).
                jobs[name] = await open_process_dying_with_us(
                    ["fio", "--thread", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                     "--bs=4k", "--size=24M", "--iodepth=16", "--rate=6m", "--verify=crc32c",
                     "--do_verify=1", "--verify_fatal=1", "--output-format=json"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                progress(f"{name}: fio randwrite 24 MiB at 6 MB/s with crc32c verify on its disk (NBD)")
            outputs: dict[str, bytes] = {}

            async def collect(name: str, proc: Any) -> None:
                outputs[name] = await _output(proc)

            async with trio.open_nursery() as viewer:
                viewer.start_soon(_live_view, system, started)
                await _kill_under_fio(system, progress, jobs, collect, outputs, kills)
                viewer.cancel_scope.cancel()
            guests = []
            for name, raw in outputs.items():
                try:
                    job = json.loads(raw[raw.index(b"{"):])["jobs"][0]
                    errors = job["error"]
                    written = job["write"]["io_bytes"]
                except (ValueError, KeyError, IndexError):
                    errors, written = -1, 0
                guests.append({"guest": name, "verify": "passed" if errors == 0 else "FAILED",
                               "written": f"{written >> 20} MiB", "errors": errors})
                progress(f"{name}: fio finished, verify {'passed' if errors == 0 else 'FAILED'}")
            network = await _network_crash(system, progress)
            return {"guests": guests, "recoveries": [ms for n, ms in system.recoveries if n == "stor"],
                    "network": network}
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _print_statistics(result: dict[str, Any]) -> None:
    front, back = result["front"], result["back"]
    rows = [("ring (front)", front["ring"]), ("ring (back)", back["ring"]),
            ("grant table (front)", front["grants"]), ("grant table (back)", back["grants"]),
            ("event channel (front)", front["port"]), ("event channel (back)", back["port"]),
            ("hypervisor", result["hypervisor"])]
    width = max(len(name) for name, _ in rows)
    for name, stats in rows:
        fields = " ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, dict) or v)
        print(f"{name:<{width}}  {fields}")
    print()
    print(f"{'domid':>5}  {'name':<12} {'state':<8} {'pid':>7}  maps-held  pins  ports")
    for dom in result["domains"]:
        print(f"{dom['domid']:>5}  {dom['name']:<12} {dom['state']:<8} {dom['pid']:>7}  "
              f"{dom['mappings_held']:>9}  {dom['pins_granted']:>4}  {dom['ports']:>5}")
    sys.stdout.flush()
