"""Parsing the kernel's exit records (hypervisor/sim/exits.py): a process's last thread is
told from the others, records are found however datagrams pack them, and nothing that
comes in raises."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from ringfence.hypervisor.sim import exits
from ringfence.hypervisor.sim.exits import AC_FLAG, AC_PID, AGROUP, ExitListener, parse_records

STATS_SIZE = 416  # struct taskstats, version 13
FAMILY = 0x1C


def attribute(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def record(tid: int, tgid: int, *, last: bool, stats_size: int = STATS_SIZE) -> bytes:
    """One datagram as taskstats_exit sends it: the task's own record, and the process's
    total after it when the last thread of a multithreaded process exits."""
    stats = bytearray(stats_size)
    if stats_size >= AC_PID + 4:
        stats[AC_FLAG] = 0x10 | (AGROUP if last else 0)  # AXSIG: killed by a signal
        struct.pack_into("=I", stats, AC_PID, tgid)
    aggr_pid = attribute(exits.TASKSTATS_TYPE_AGGR_PID | 0x8000, attribute(1, struct.pack("=I", tid))
                         + attribute(exits.TASKSTATS_TYPE_STATS, bytes(stats)))
    body = struct.pack("=BBH", 2, 1, 0) + aggr_pid  # TASKSTATS_CMD_NEW
    if last and tid != tgid:
        body += attribute(5 | 0x8000, attribute(2, struct.pack("=I", tgid))
                          + attribute(exits.TASKSTATS_TYPE_STATS, bytes(stats_size)))
    return struct.pack("=IHHII", 16 + len(body), FAMILY, 0, 0, 0) + body


def test_only_a_process_s_last_thread_names_it():
    assert parse_records(record(100, 100, last=True)) == (1, [100])
    assert parse_records(record(101, 100, last=False)) == (1, [])
    # the last thread of a multithreaded process: its own record names the process
    assert parse_records(record(102, 100, last=True)) == (1, [100])


def test_records_packed_in_one_datagram_are_each_read():
    data = record(7, 7, last=True) + record(8, 5, last=False) + record(9, 9, last=True)
    assert parse_records(data) == (3, [7, 9])


def test_short_or_cut_records_are_passed_over():
    assert parse_records(record(100, 100, last=True, stats_size=AC_PID)) == (0, [])
    whole = record(100, 100, last=True)
    assert parse_records(whole[:-8]) == (0, [])  # the datagram says more than it has
    assert parse_records(b"") == (0, [])


@given(st.binary(max_size=600))
def test_garbage_never_raises(data):
    records, pids = parse_records(data)
    assert records >= len(pids)


@given(st.lists(st.tuples(st.integers(1, 2**22), st.booleans()), max_size=8), st.binary(max_size=40))
def test_whatever_follows_good_records_they_are_read(processes, tail):
    data = b"".join(record(pid, pid, last=last) for pid, last in processes)
    records, pids = parse_records(data + tail)
    assert records >= len(processes)
    assert pids[:sum(last for _, last in processes)] == [pid for pid, last in processes if last]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_listener_only_where_the_records_name_our_processes():
    """As root in the host's namespaces the hypervisor hears exits; in a user namespace the
    kernel takes the registration and sends nothing, in a pid namespace the records' pids
    are not ours: there it does without (deaths through pidfds only)."""
    listener = ExitListener.open()
    assert listener is not None
    listener.close()
    probe = "from ringfence.hypervisor.sim.exits import ExitListener; print(ExitListener.open())"
    for namespace in (["--user", "--map-root-user"], ["--pid", "--fork"]):
        shown = subprocess.run(["unshare", *namespace, sys.executable, "-c", probe],
                               capture_output=True, text=True, timeout=60)
        assert shown.stdout.strip() == "None", (namespace, shown.stderr)
