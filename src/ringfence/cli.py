"""The `ringfence` command line: one subcommand per module, in the style of xl.

Each subcommand lives next to the code it drives, in a module exposing
``register(subparsers)`` that adds its parser and sets ``func`` (a callable taking the
parsed namespace and returning an exit status). Modules are imported lazily so that
``ringfence --help`` stays fast and a broken optional part never hides the others.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import sys
from collections.abc import Sequence

from ringfence import __version__
from ringfence._log import configure_logging
from ringfence.errors import CommandError, UsageError
from ringfence.isolation.sandbox import drop_privileges_from_environment

# Modules that register subcommands, in the order --help lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "ringfence.hypervisor.daemon",
    "ringfence.xenbus.cli",
    "ringfence.backends.blkback.cli",
    "ringfence.frontends.blkfront.cli",
    "ringfence.backends.netback.cli",
    "ringfence.frontends.netfront.cli",
    "ringfence.isolation.cli",
    "ringfence.toolstack.up",
    "ringfence.toolstack.xl",
    "ringfence.toolstack.guest",
    "ringfence.toolstack.inject",
    "ringfence.toolstack.demo",
    "ringfence.bench.cli",
)


# The one module a command needs (a driver domain started for one command imports only
# its own: a relaunch after a crash waits on this). A test keeps it in step with the above.
COMMAND_HOMES: dict[str, str] = {
    "hypervisor": "ringfence.hypervisor.daemon",
    "xenstored": "ringfence.xenbus.cli",
    "blkback": "ringfence.backends.blkback.cli",
    "blkfront": "ringfence.frontends.blkfront.cli",
    "netback": "ringfence.backends.netback.cli",
    "netfront": "ringfence.frontends.netfront.cli",
    "supervise": "ringfence.isolation.cli",
    "up": "ringfence.toolstack.up",
    "guest": "ringfence.toolstack.guest",
    "inject": "ringfence.toolstack.inject",
    "demo": "ringfence.toolstack.demo",
    "bench": "ringfence.bench.cli",
}


def _command_in(argv: Sequence[str]) -> str | None:
    """The command word of an argument list (after the global options)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringfence",
        description="Restartable Xen-style driver domains: hypervisor, XenStore, "
        "split block and network drivers.",
        epilog="Run 'ringfence COMMAND --help' for the options and examples of a command.",
    )
    parser.add_argument("--version", action="version", version=f"ringfence {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the part is not written yet
                continue
            raise
        module.register(sub)
    return parser


# Parsers built ahead, by the modules they hold: see prepare_launcher.
_prepared: dict[tuple[str, ...], argparse.ArgumentParser] = {}


def prepare_launcher() -> None:
    """Build the parser of each command whose module is imported: a launcher calls this
    once it has imported what its domains run, before it forks them, so that a domain
    only parses its arguments (building a parser in a fresh fork costs about 1 ms of CPU
    and 100 pages copied, at every relaunch after a crash)."""
    for home in set(COMMAND_HOMES.values()) & set(sys.modules):
        parser = _prepared[(home,)] = build_parser((home,))
        # A parse compiles regular expressions (argparse's, for each command's arguments)
        # that re caches: parsed once here, a domain's parse finds them in that cache (half
        # its 1 ms of CPU). Whether the words make a whole command line does not matter.
        for command in [name for name, where in COMMAND_HOMES.items() if where == home]:
            with contextlib.suppress(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                parser.parse_known_args([command])


def main(argv: Sequence[str] | None = None) -> int:
    drop_privileges_from_environment()  # a sandboxed domain: no root past this point
    words = sys.argv[1:] if argv is None else argv
    home = COMMAND_HOMES.get(_command_in(words) or "")
    modules = (home,) if home else COMMAND_MODULES
    parser = _prepared.get(modules) or build_parser(modules)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"ringfence {args.command}: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"ringfence {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        logging.getLogger(__name__).debug("failure", exc_info=True)
        print(f"ringfence {args.command}: error: {exc}", file=sys.stderr)
        return 1
