"""Adapter for the compiled C core: the one place that imports the cffi module."""
from __future__ import annotations

from ringfence.hypervisor._ffi import ffi, lib

__all__ = ["ffi", "lib"]
