"""Fixtures shared by the system tests."""
from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def runtime(request):
    """A runtime directory under /run for the test (as a host's; /tmp is private in a
    sandbox), removed afterwards."""
    path = f"/run/ringfence-{request.node.name.removeprefix('test_')[:20]}-{os.getpid()}"
    yield path
    shutil.rmtree(path, ignore_errors=True)
