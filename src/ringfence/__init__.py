"""ringfence: Xen-style driver domains and split device drivers."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
