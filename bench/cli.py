"""``ringfence bench NAME [--quick] [--json]``: run a benchmark against its peer.

Each benchmark is a module ``ringfence.bench.<NAME>`` with a function
``run(quick: bool, progress: Callable[[str], None]) -> list[Metric]`` that measures ours and
the peer in the same run. Progress goes to stderr; the metric lines (or one JSON object) go
to stdout so scripts can parse them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time

from ringfence.errors import UsageError

BENCHMARKS = {
    "ring": "shared ring between two domain processes vs C eventfd ping-pong and C ring",
    "xenstore": "our xenstored vs Debian's C xenstored",
    "blk": "blkfront/blkback NBD export vs qemu-nbd",
    "net": "netfront/netback vs veth, raw TAP writes and a C relay over the same TAPs",
    "recovery": "storage driver domain kill to first I/O (p50, p99) and a bystander's throughput",
}

EXAMPLES = """examples:
  ringfence bench ring --quick     # under a minute, rough numbers
  ringfence bench xenstore --json  # one JSON object on stdout
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "bench", help="run a benchmark against its peer and print ratios",
        description="Run a benchmark: ours and a peer in the same run, one "
        "'metric=… ours=… peer=… ratio=… goal=… met=yes|no' line per metric.\n\n"
        + "\n".join(f"  {name:9} {text}" for name, text in BENCHMARKS.items()),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME", help="one of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {args.name!r} (choose from {', '.join(BENCHMARKS)})")
    try:
        module = importlib.import_module(f"ringfence.bench.{args.name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"ringfence.bench.{args.name}":
            raise
        raise UsageError(f"benchmark {args.name!r} is not available yet") from None
    if not args.verbose:  # the progress lines are the live status; -v adds the parts' logs
        logging.getLogger().setLevel(logging.WARNING)
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {args.name}: {text}", file=sys.stderr,
              flush=True)

    metrics = module.run(quick=args.quick, progress=progress)
    if args.json:
        print(json.dumps({"benchmark": args.name, "quick": args.quick,
                          "metrics": [m.as_dict() for m in metrics]}))
    else:
        for metric in metrics:
            print(metric.line(), flush=True)
    return 0
