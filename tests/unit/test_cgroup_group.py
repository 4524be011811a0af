"""Each system's sandboxes get a cgroup group of their own (ringfence/<group>/<domain>): the
same for every start on one runtime directory, another for another directory."""
from __future__ import annotations

import os

from ringfence.toolstack.system import cgroup_group


def test_the_same_directory_gets_the_same_group_and_another_one_another(tmp_path):
    one, other = tmp_path / "run-a", tmp_path / "run-b"
    one.mkdir()
    other.mkdir()
    os.symlink(one, tmp_path / "alias")
    assert cgroup_group(str(one)) == cgroup_group(str(one) + "/") == cgroup_group(str(tmp_path / "alias"))
    assert cgroup_group(str(one)) != cgroup_group(str(other))
    assert cgroup_group(str(one)).startswith("run-a.")


def test_a_group_is_a_plain_name_whatever_the_directory(tmp_path):
    for name in ("cgroup.procs", "a b\nc", ".hidden", "x" * 300):
        group = cgroup_group(str(tmp_path / name))
        assert "/" not in group and "\n" not in group and " " not in group
        assert not group.startswith(("cgroup.", ".")) and len(group) <= 64 + 9
    assert cgroup_group("/") == f"root.{cgroup_group('/').split('.')[-1]}"
