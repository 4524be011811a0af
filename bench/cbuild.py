"""The benchmarks' C peers, built with gcc in the run that uses them."""
from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources


def build(source: str, workdir: str, *flags: str) -> str:
    """Compile ``bench/<source>`` into workdir; the binary's path."""
    if shutil.which("gcc") is None:
        raise RuntimeError(f"the benchmark builds {source} with gcc: install gcc")
    binary = os.path.join(workdir, source.removesuffix(".c"))
    with resources.as_file(resources.files("ringfence.bench").joinpath(source)) as path:
        subprocess.run(["gcc", "-O2", "-o", binary, str(path), *flags], check=True)
    return binary
