"""Which cgroup hierarchy ``ringfence up --favordynmods`` remounts, and with what options,
from /proc/self/mountinfo (the remount itself: tests/integration/test_sandbox.py)."""
from __future__ import annotations

import errno

import pytest

from ringfence.isolation.sandbox import favordynmods_remount

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = ("29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
           "rw,nsdelegate,memory_recursiveprot\n")


def test_a_cgroup2_hierarchy_goes_first_with_its_own_options_kept():
    assert favordynmods_remount(HYBRID) == ("/sys/fs/cgroup/unified", "favordynmods")
    assert favordynmods_remount(UNIFIED) == (
        "/sys/fs/cgroup", "nsdelegate,memory_recursiveprot,favordynmods")


def test_v1_only_keeps_the_controller_of_the_hierarchy_it_remounts():
    v1 = "\n".join(line for line in HYBRID.splitlines() if "cgroup2" not in line)
    assert favordynmods_remount(v1) == ("/sys/fs/cgroup/cpu", "cpu,favordynmods")


def test_nothing_to_do_when_a_hierarchy_has_it_and_an_error_when_there_is_none():
    assert favordynmods_remount(HYBRID.replace("rw,pids", "rw,pids,favordynmods")) is None
    with pytest.raises(OSError) as none:
        favordynmods_remount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert none.value.errno == errno.ENOENT


def test_an_escaped_mount_point():
    line = "41 31 0:38 / /srv/my\\040cgroups rw,relatime - cgroup2 cgroup2 rw\n"
    assert favordynmods_remount(line) == ("/srv/my cgroups", "favordynmods")
