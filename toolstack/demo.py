"""``ringfence demo``: the sim hypervisor, two domains and a ring between them.

A front domain grants a ring page and an event channel to a back domain, which maps and
binds them; requests in the blkif geometry (112-byte requests, 16-byte responses, 32 slots)
flow through the ring; then the statistics of every part are printed. Each domain runs in
its own sandbox when run as root.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import trio

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
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.requests < 1:
        from ringfence.errors import UsageError
        raise UsageError("--requests must be at least 1")
    sandboxed = os.geteuid() == 0 and not args.no_sandbox
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"  [{time.monotonic() - started:5.2f}s] {text}", flush=True)

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
    return 0


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
