"""cffi build script for the C core (API mode, out of line).

Each C module in csrc/ is a pair NAME.c/NAME.h plus NAME.cdef, the declarations cffi
exposes to Python (plain C, no preprocessor). Adding a module means adding the three
files: this script picks them up, so parallel work never edits a shared list.
"""
from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE / "csrc"

ffibuilder = FFI()
modules = sorted(p.stem for p in CSRC.glob("*.cdef"))
for name in modules:
    ffibuilder.cdef((CSRC / f"{name}.cdef").read_text())

ffibuilder.set_source(
    "ringfence.hypervisor._ffi",
    "\n".join(f'#include "{name}.h"' for name in modules),
    sources=[str((CSRC / f"{name}.c").relative_to(HERE.parent)) for name in modules
             if (CSRC / f"{name}.c").exists()],
    include_dirs=[str(CSRC.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
