"""The README's main job: `ringfence demo` as a user runs it."""
from __future__ import annotations

import subprocess


def test_demo_carries_requests_between_two_domains():
    out = subprocess.run(["ringfence", "demo", "--requests", "20000"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "hypervisor up" in text and "mapped the ring and bound the channel" in text
    assert "done: 20000 requests answered" in text
    assert "ring (back)" in text and "overflows=0" in text
    assert "ring-front" in text and "ring-back" in text
    # part 2: the storage driver domain is killed under fio's verified writes
    assert text.count("storage driver domain relaunched and ready in") == 2
    assert "guest1: fio finished, verify passed" in text
    assert "guest2: fio finished, verify passed" in text
    assert "result: every guest verified its data" in text


def test_demo_rejects_bad_arguments():
    out = subprocess.run(["ringfence", "demo", "--requests", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "at least 1" in out.stderr
    out = subprocess.run(["ringfence", "demo", "--depth", "99"], capture_output=True, text=True)
    assert out.returncode == 2
