"""Public test helpers: fakes for unit tests and check_* conformance helpers."""
from __future__ import annotations
