"""Adapter for the compiled C core: the one place that imports the cffi module."""
from __future__ import annotations

from typing import Any

from ringfence.hypervisor._ffi import ffi, lib

__all__ = ["c_counter", "ffi", "lib"]


def c_counter(struct: str, *fields: str, doc: str = "") -> Any:
    """A read-only ``int`` property: the sum of ``fields`` of the C struct at ``self.<struct>``
    (the C side counts; Python only reads)."""
    def read(self: Any) -> int:
        c = getattr(self, struct)
        return sum(int(getattr(c, name)) for name in fields)
    return property(read, doc=doc or None)
