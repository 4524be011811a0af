"""pytest plugin (entry point ``ringfence``): fixtures and markers for other projects."""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ringfence_fault(kind, **params): inject a fault")
