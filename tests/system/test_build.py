"""From the files git tracks, an sdist builds, and the wheel built from that sdist works."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None,
                    reason="needs the git checkout")
def test_sdist_builds_a_working_wheel(tmp_path: pathlib.Path) -> None:
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(tree)],
                   check=True, capture_output=True)
    (sdist,) = dist.glob("ringfence-*.tar.gz")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
                    str(sdist)], check=True, capture_output=True)
    (wheel,) = dist.glob("ringfence-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True, capture_output=True)
    check = ("import ringfence.hypervisor._lib as l, sys; "
             "assert l.__file__.startswith(sys.prefix), l.__file__; "
             "print(l.ffi.string(l.lib.rf_core_version()).decode())")
    out = subprocess.run([python, "-P", "-c", check], cwd=tmp_path, check=True,
                         capture_output=True, text=True)
    assert out.stdout.startswith("ringfence-core")
    if pathlib.Path("/usr/include/xengnttab.h").exists():  # the xen platform's bindings and stand-in
        check = ("import importlib.resources, ringfence.hypervisor._xenffi as x, sys; "
                 "assert x.__file__.startswith(sys.prefix), x.__file__; "
                 "assert (importlib.resources.files('ringfence.testing') / 'xen_standin.c').is_file()")
        subprocess.run([python, "-P", "-c", check], cwd=tmp_path, check=True, capture_output=True)
    version = subprocess.run([env_dir / "bin" / "ringfence", "--version"], check=True,
                             capture_output=True, text=True)
    assert version.stdout.startswith("ringfence ")
