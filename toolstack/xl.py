"""xl-style subcommands for a running host (``ringfence up``): list, create, destroy, exec,
block-/network- attach, detach and list, stats, and xenstore-read/-write/-ls/-watch.

They talk to the host's control socket (``RUNTIME_DIR/control.sock``); the xenstore-*
commands talk to its xenstored directly, as Xen's xenstore-utils would.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from typing import Any

from ringfence.errors import CommandError, UsageError
from ringfence.toolstack.control import call
from ringfence.toolstack.up import DEFAULT_RUNTIME

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (help, examples)
    "list": ("list the domains of the running host", "ringfence list\n  ringfence list --json"),
    "create": ("create and start a guest from a TOML file with one [[domain]]",
               "ringfence create examples/guest3.toml"),
    "destroy": ("kill a guest, close its devices, forget its XenStore tree", "ringfence destroy guest3"),
    "exec": ("run a command inside a guest's namespaces (network, hostname, IPC, mounts)",
             "ringfence exec guest1 -- ping -c 3 10.0.0.2\n  ringfence exec guest1 -- ip addr"),
    "block-attach": ("attach a disk to a running guest (xl disk spec)",
                     "ringfence block-attach guest1 target=/var/lib/ringfence/data.img,vdev=xvdb,backend=stor"),
    "block-detach": ("detach a guest's disk (by vdev or devid)", "ringfence block-detach guest1 xvdb"),
    "block-list": ("list a guest's disks and their NBD exports", "ringfence block-list guest1"),
    "network-attach": ("attach a NIC to a running guest (xl vif spec)",
                       "ringfence network-attach guest1 mac=02:00:00:00:01:01,backend=net,ip=10.1.0.1/24"),
    "network-detach": ("detach a guest's NIC (by devid or mac)", "ringfence network-detach guest1 1"),
    "network-list": ("list a guest's NICs", "ringfence network-list guest1"),
    "stats": ("statistics of the hypervisor, xenstored, driver domains and guests, as JSON",
              "ringfence stats | python3 -m json.tool"),
    "xenstore-read": ("read XenStore nodes", "ringfence xenstore-read /local/domain/1/name"),
    "xenstore-write": ("write XenStore nodes (PATH VALUE pairs)",
                       "ringfence xenstore-write /local/domain/0/test hello"),
    "xenstore-ls": ("list a XenStore subtree with values", "ringfence xenstore-ls /local/domain/1/device"),
    "xenstore-watch": ("print the paths of a watch as they fire (until interrupted)",
                       "ringfence xenstore-watch /local/domain/1/device -n 5"),
}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name, (summary, examples) in COMMANDS.items():
        parser = subparsers.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                       epilog="examples:\n  " + examples,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--runtime-dir", default=DEFAULT_RUNTIME, metavar="DIR",
                            help=f"the host's runtime directory (default {DEFAULT_RUNTIME})")
        _ARGUMENTS.get(name, lambda p: None)(parser)
        parser.set_defaults(func=_forwarder(name) if name in FORWARDED else
                            globals()["_cmd_" + name.replace("-", "_")])


def _guest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("guest", help="the guest's name")


def _guest_and(what: str, help_text: str) -> Any:
    def add(parser: argparse.ArgumentParser) -> None:
        _guest(parser)
        parser.add_argument(what, help=help_text)
    return add


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _list_args(parser: argparse.ArgumentParser) -> None:
    _guest(parser)
    _json_flag(parser)


_ARGUMENTS: dict[str, Any] = {
    "list": _json_flag,
    "create": lambda p: p.add_argument("config", help="TOML file with one [[domain]] of kind guest"),
    "destroy": _guest,
    "exec": lambda p: (_guest(p), p.add_argument("argv", nargs=argparse.REMAINDER,
                                                   help="-- COMMAND [ARGS...]")),
    "block-attach": _guest_and("spec", "target=PATH,vdev=xvdb,access=rw,backend=DRIVER"),
    "block-detach": _guest_and("device", "vdev (xvdb) or devid (51728)"),
    "block-list": _list_args,
    "network-attach": _guest_and("spec", "mac=02:..,backend=DRIVER[,bridge=xenbr0][,ip=CIDR CIDR]"),
    "network-detach": _guest_and("device", "devid (ethN's N) or mac"),
    "network-list": _list_args,
    "xenstore-read": lambda p: p.add_argument("path", nargs="+"),
    "xenstore-write": lambda p: p.add_argument("pairs", nargs="+", metavar="PATH VALUE"),
    "xenstore-ls": lambda p: p.add_argument("path", nargs="?", default="/"),
    "xenstore-watch": lambda p: (p.add_argument("path"),
                                 p.add_argument("-n", type=int, default=0, metavar="COUNT",
                                                help="stop after COUNT events (default: never)")),
}


def _table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(none)")
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.upper().ljust(w) for k, w in zip(keys, widths)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "-"
    return str(value)


def _show(args: argparse.Namespace, result: Any) -> int:
    if getattr(args, "json", False) or not isinstance(result, list):
        print(json.dumps(result, indent=None if isinstance(result, list) else 2))
    else:
        _table(result)
    return 0


def _kv(result: dict[str, Any]) -> int:
    print(" ".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"
                   for k, v in result.items()))
    return 0


# Commands that are one control request: its arguments, and how the answer is shown.
FORWARDED: dict[str, tuple[tuple[str, ...], Any]] = {
    "list": ((), lambda args, result: _show(args, result)),
    "destroy": (("guest",), lambda args, result: _kv(result)),
    "block-attach": (("guest", "spec"), lambda args, result: _kv(result)),
    "block-detach": (("guest", "device"), lambda args, result: _kv(result)),
    "block-list": (("guest",), lambda args, result: _show(args, result)),
    "network-attach": (("guest", "spec"), lambda args, result: _kv(result)),
    "network-detach": (("guest", "device"), lambda args, result: _kv(result)),
    "network-list": (("guest",), lambda args, result: _show(args, result)),
}


def _forwarder(name: str) -> Any:
    keys, show = FORWARDED[name]

    def forward(args: argparse.Namespace) -> int:
        return int(show(args, call(args.runtime_dir, name, **{k: getattr(args, k) for k in keys})))
    return forward


def _cmd_create(args: argparse.Namespace) -> int:
    try:
        with open(args.config, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CommandError(f"{args.config}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CommandError(f"{args.config}: {exc}") from None
    domains = data.get("domain", [])
    if not isinstance(domains, list) or len(domains) != 1:
        raise CommandError(f"{args.config}: needs exactly one [[domain]] table")
    return _kv(call(args.runtime_dir, "create", domain=domains[0], source=args.config))


def _cmd_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("a command to run is needed: ringfence exec GUEST -- COMMAND [ARGS...]")
    pid = call(args.runtime_dir, "guest-pid", guest=args.guest)["pid"]
    from ringfence.isolation.sandbox import enter_namespaces
    enter_namespaces(pid, ("net", "uts", "ipc", "mnt"))
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise CommandError(f"{argv[0]}: {exc.strerror}") from None
    return 127  # not reached


def _cmd_stats(args: argparse.Namespace) -> int:
    print(json.dumps(call(args.runtime_dir, "stats"), indent=2, sort_keys=True))
    return 0


# ---- xenstore-* -----------------------------------------------------------------------
def _xenstore(args: argparse.Namespace, work: Any) -> int:
    import trio

    from ringfence.hypervisor.io.xs_wire import XenStoreError
    from ringfence.xenbus.client import open_xenstore
    path = os.path.join(args.runtime_dir, "xenstored.sock")
    if not os.path.exists(path):
        raise CommandError(f"no xenstored at {path} (start a host with 'ringfence up')")

    async def main() -> int:
        async with open_xenstore(path) as xs:
            return int(await work(xs) or 0)
    try:
        return trio.run(main)
    except XenStoreError as exc:
        raise CommandError(str(exc)) from None


def _cmd_xenstore_read(args: argparse.Namespace) -> int:
    async def work(xs: Any) -> None:
        for p in args.path:
            sys.stdout.write((await xs.read(p)).decode(errors="replace") + "\n")
    return _xenstore(args, work)


def _cmd_xenstore_write(args: argparse.Namespace) -> int:
    if len(args.pairs) % 2:
        raise UsageError("xenstore-write takes PATH VALUE pairs")

    async def work(xs: Any) -> None:
        for p, v in zip(args.pairs[::2], args.pairs[1::2]):
            await xs.write(p, v)
    return _xenstore(args, work)


def _cmd_xenstore_ls(args: argparse.Namespace) -> int:
    async def walk(xs: Any, path: str, depth: int) -> None:
        for child in await xs.directory(path):
            full = f"{path.rstrip('/')}/{child}"
            value = (await xs.read(full)).decode(errors="replace")
            print(f"{' ' * depth}{child} = \"{value}\"")
            await walk(xs, full, depth + 1)

    async def work(xs: Any) -> None:
        await walk(xs, args.path, 0)
    return _xenstore(args, work)


def _cmd_xenstore_watch(args: argparse.Namespace) -> int:
    async def work(xs: Any) -> None:
        seen = 0
        async with xs.watch(args.path) as events:
            async for path in events:
                print(path[0] if isinstance(path, tuple) else path, flush=True)
                seen += 1
                if args.n and seen >= args.n:
                    return
    return _xenstore(args, work)
