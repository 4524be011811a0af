"""The layout of DESIGN.md §1: every package folder is shipped, and the layering holds."""
from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import tomllib

import ringfence

REPO = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _source_packages() -> set[str]:
    """Every folder of the source tree holding an __init__.py, as its import name."""
    found = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    return found


def test_every_package_folder_is_listed() -> None:
    assert _source_packages() - set(SETUPTOOLS["packages"]) == set()


def test_tests_are_not_packages() -> None:
    assert not list((REPO / "tests").rglob("__init__.py"))


def test_version_entry_points() -> None:
    out = subprocess.run([sys.executable, "-m", "ringfence", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"ringfence {ringfence.__version__}"


def test_compiled_core_is_installed() -> None:
    from ringfence.hypervisor._lib import ffi, lib
    assert ffi.string(lib.rf_core_version()).startswith(b"ringfence-core")


# Layer rank of each part; a module may import parts of equal or lower rank only.
# backends and frontends share a rank but never import each other.
LAYERS = {
    "ringfence.hypervisor": 1,
    "ringfence.xenbus": 2,
    "ringfence.isolation": 3,
    "ringfence.backends": 4,
    "ringfence.frontends": 4,
    "ringfence.toolstack": 5,
    "ringfence.cli": 6,
    "ringfence.__main__": 6,
    "ringfence.bench": 6,
    "ringfence.testing": 6,
}
BASE = 0  # ringfence itself, ringfence._log, ringfence._sdnotify: usable from anywhere


def _layer(module: str) -> tuple[int, str]:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank, prefix
    return BASE, "ringfence"


def _installed_modules() -> dict[str, pathlib.Path]:
    root = pathlib.Path(ringfence.__file__).parent
    modules = {}
    for part in ["ringfence", *[p for p in SETUPTOOLS["packages"] if p.count(".") == 1]]:
        pkg_root = pathlib.Path(importlib.import_module(part).__file__).parent
        for path in pkg_root.rglob("*.py"):
            rel = path.relative_to(root.parent if part == "ringfence" else pkg_root)
            parts = list(rel.with_suffix("").parts)
            name = ".".join(parts) if part == "ringfence" else ".".join([part, *parts])
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: pathlib.Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("ringfence")}


def test_layering() -> None:
    modules = _installed_modules()
    assert "ringfence.hypervisor" in modules
    violations = []
    for module, path in modules.items():
        rank, part = _layer(module)
        for imported in _imports(path, module):
            irank, ipart = _layer(imported)
            if ipart == part:
                continue
            if irank > rank or {part, ipart} == {"ringfence.backends", "ringfence.frontends"}:
                violations.append(f"{module} imports {imported}")
    assert violations == []



def test_each_command_is_built_from_its_own_module_alone():
    """A command found in COMMAND_HOMES gets a parser from that one module (a relaunched
    driver domain imports nothing else): the table must say where each command lives."""
    import argparse
    import importlib

    from ringfence.cli import COMMAND_HOMES, COMMAND_MODULES, build_parser
    owners = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        owners.update({command: name for command in sub.choices})
    assert {c: owners[c] for c in COMMAND_HOMES} == COMMAND_HOMES
    for command, home in COMMAND_HOMES.items():
        (commands,) = [a for a in build_parser((home,))._actions
                       if isinstance(a, argparse._SubParsersAction)]
        assert command in commands.choices


def test_a_launcher_prepares_the_parsers_of_the_commands_it_forks(monkeypatch):
    """A launcher builds the parsers of its preloaded commands before it forks: main then
    parses with the prepared one (and builds any other as before)."""
    import argparse
    import importlib
    import sys

    from ringfence import cli
    importlib.import_module("ringfence.backends.blkback.cli")  # what a launcher has imported
    monkeypatch.setattr(cli, "_prepared", {})
    monkeypatch.delitem(sys.modules, "ringfence.bench.cli", raising=False)
    cli.prepare_launcher()
    assert ("ringfence.backends.blkback.cli",) in cli._prepared
    assert ("ringfence.bench.cli",) not in cli._prepared  # not imported: nothing built
    prepared = cli._prepared[("ringfence.backends.blkback.cli",)]
    seen = []
    monkeypatch.setattr(prepared, "parse_args", lambda argv: seen.append(argv) or argparse.Namespace())
    assert cli.main(["blkback", "--not-parsed"]) == 2  # no command function: usage
    assert seen == [["blkback", "--not-parsed"]]
