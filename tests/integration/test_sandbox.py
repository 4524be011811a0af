"""Sandboxes with real namespaces and cgroups: a driver domain cannot see a guest's
processes, files or memory, nor signal it (issue 7, item 1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import trio

from ringfence.isolation.launcher import open_launcher
from ringfence.isolation.sandbox import SandboxSpec, group_cgroups, innermost_pid, spawn_sandboxed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these checks run as root")

PRELUDE = "from ringfence.isolation.sandbox import drop_privileges_from_environment as d; d()\n"

GUEST = PRELUDE + textwrap.dedent("""
    import os, sys, time
    open("/tmp/guest-secret", "w").write("secret")
    print(os.getpid(), flush=True)
    time.sleep(60)
""")

PROBE = PRELUDE + textwrap.dedent("""
    import json, os, signal, sys, socket
    guest = int(sys.argv[1])
    result = {"pid": os.getpid(), "uid": os.getuid(), "hostname": socket.gethostname()}
    result["procs"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    try:
        os.kill(guest, 0); result["signal"] = "delivered"
    except OSError as e:
        result["signal"] = e.errno
    result["secret"] = os.path.exists("/tmp/guest-secret")
    try:
        open(f"/proc/{guest}/mem", "rb"); result["mem"] = "opened"
    except OSError as e:
        result["mem"] = e.errno
    result["netdevs"] = sorted(os.listdir("/sys/class/net"))
    result["fds"] = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    result["nnp"] = [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1]
    result["caps"] = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
    import resource
    result["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    print(json.dumps(result), flush=True)
""")


@pytest.fixture(params=["exec", "launcher"])
async def launcher(request):
    """Both ways a domain starts: exec'd, or forked from the launcher."""
    if request.param == "exec":
        yield None
        return
    async with open_launcher(["ringfence.isolation.sandbox"]) as forker:
        yield forker


async def _line(stream) -> bytes:
    """What a program printed up to its first newline (or all it wrote, if it ended first):
    one line may come in more than one read."""
    out = b""
    while b"\n" not in out:
        chunk = await stream.receive_some(100)
        if not chunk:
            break
        out += chunk
    return out


async def test_driver_domain_cannot_reach_a_guest(tmp_path, launcher):
    leak_r, leak_w = os.pipe()  # an fd that must not be inherited
    guest = await spawn_sandboxed(SandboxSpec("guest1"), [sys.executable, "-c", GUEST],
                                  stdout=subprocess.PIPE, launcher=launcher)
    try:
        with trio.fail_after(20):
            guest_inner_pid = int(await _line(guest.process.stdout))
        assert guest_inner_pid == 1  # pid 1 of its own namespace
        guest_pid = innermost_pid(guest.pid)  # its global pid
        driver = await spawn_sandboxed(SandboxSpec("driver1", nofile=512),
                                       [sys.executable, "-c", PROBE, str(guest_pid)],
                                       stdout=subprocess.PIPE, launcher=launcher)
        out = b""
        with trio.fail_after(20):
            async for chunk in driver.process.stdout:
                out += chunk
        await driver.aclose()
        probe = json.loads(out)
        if launcher is not None:
            assert launcher.statistics().forked == 2
        assert probe["pid"] == 1 and probe["procs"] == [1]
        assert probe["signal"] == 3  # ESRCH: the guest does not exist from here
        assert probe["secret"] is False
        assert probe["mem"] == 2  # ENOENT
        assert probe["netdevs"] == ["lo"]
        assert probe["fds"] == [0, 1, 2, 3] or probe["fds"] == [0, 1, 2]  # 3: listdir's own fd
        assert probe["nnp"] == "1"
        assert probe["caps"] == "0000000000000000" and probe["uid"] >= 200000
        assert probe["hostname"] == "driver1"
        assert probe["nofile"] == 512
        # and the host never saw the guest's file either
        assert not os.path.exists("/tmp/guest-secret")
    finally:
        os.close(leak_r)
        os.close(leak_w)
        await guest.aclose()
    assert not guest.cgroup.dirs or not any(p.exists() for p in guest.cgroup.dirs.values())


async def test_pids_limit_holds(launcher):
    bomb = PRELUDE + textwrap.dedent("""
        import os, time
        made = 0
        try:
            for _ in range(100):
                if os.fork() == 0:
                    time.sleep(30); os._exit(0)
                made += 1
        except OSError as e:
            print("limited", made, flush=True)
        else:
            print("unlimited", made, flush=True)
    """)
    box = await spawn_sandboxed(SandboxSpec("bomb1", pids_max=20), [sys.executable, "-c", bomb],
                                stdout=subprocess.PIPE, launcher=launcher)
    with trio.fail_after(30):
        out = await _line(box.process.stdout)
    stats = box.statistics()
    await box.aclose()
    if not box.cgroup.dirs.get("pids") and not box.cgroup.v2:
        pytest.skip("no writable pids cgroup here")
    assert out.startswith(b"limited"), out
    assert stats.pids_max == 20


async def test_wait_gone_waits_for_the_program_under_the_waiter():
    """An exec'd sandbox with a pid namespace runs its program under a waiter; once the
    program is watched, wait_gone returns only when it is gone too (the supervisor's word
    that a dead driver domain touches nothing more), however the waiter died."""
    import signal
    program = PRELUDE + "import time\nprint('up', flush=True)\ntime.sleep(60)\n"
    box = await spawn_sandboxed(SandboxSpec("gone1"), [sys.executable, "-c", program],
                                stdout=subprocess.PIPE)
    try:
        with trio.fail_after(30):
            assert await _line(box.process.stdout) == b"up\n"
        inner = innermost_pid(box.pid)
        assert inner != box.pid
        box.watch_program()
        pidfd = os.pidfd_open(inner)
        os.kill(box.pid, signal.SIGKILL)  # the waiter alone
        with trio.fail_after(30):
            await box.wait_gone()
        assert _readable(pidfd)  # the program has exited
        os.close(pidfd)
    finally:
        await box.aclose()


async def test_a_forked_domain_is_pid_1_of_its_namespace_with_no_waiter():
    """The launcher forks a domain straight into a pid namespace of its own: its program is
    the launcher's child and pid 1 there, with no waiter between (one process fewer per
    start). It is seen, signalled and waited for as a waiter would be: SIGTERM ends it
    (the namespace's init gets only the signals it handles, so it handles this one)."""
    import signal
    program = PRELUDE + "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    async with open_launcher(["ringfence.isolation.sandbox"]) as launcher:
        box = await spawn_sandboxed(SandboxSpec("born1"), [sys.executable, "-c", program],
                                    stdout=subprocess.PIPE, launcher=launcher)
        try:
            with trio.fail_after(30):
                assert await _line(box.process.stdout) == b"1\n"
            status = dict(line.split(":", 1) for line in open(f"/proc/{box.pid}/status"))
            assert status["NSpid"].split() == [str(box.pid), "1"]
            assert int(status["PPid"]) == launcher.process.pid
            assert innermost_pid(box.pid) == box.pid
            box.watch_program()
            os.kill(box.pid, signal.SIGTERM)
            with trio.fail_after(30):
                await box.wait_gone()
                assert await box.wait() == 128 + signal.SIGTERM
        finally:
            await box.aclose()


def _readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0)[0])


async def test_two_systems_with_a_domain_of_the_same_name_keep_their_own_cgroups():
    """Two systems on one host both have a "stor": each system's cgroups are its own, so that
    killing (or tearing down) one system's never touches the other's."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    first = await spawn_sandboxed(SandboxSpec("stor", group="first.1"), sleeper)
    second = await spawn_sandboxed(SandboxSpec("stor", group="second.2"), sleeper)
    try:
        if not first.cgroup.dirs:
            pytest.skip("no writable cgroup here")
        assert first.cgroup.dirs != second.cgroup.dirs
        first.kill()
        with trio.fail_after(10):
            await first.wait()
        await trio.sleep(0.1)
        assert second.process.poll() is None and second.cgroup.live_processes() >= 1
        await first.aclose()
        assert group_cgroups("first.1") == []  # the group went with its last sandbox
        assert group_cgroups("second.2") != []
    finally:
        await first.aclose()
        await second.aclose()
    assert group_cgroups("second.2") == []


def test_a_killed_process_runs_its_exit_at_a_real_time_priority():
    """hasten_exit gives each thread of a process real-time priority, so that a killed
    domain's exit does not queue behind the host's other work; without CAP_SYS_NICE it
    changes nothing and raises nothing."""
    import signal
    from ringfence.isolation.sandbox import hasten_exit
    threads = ("import threading, time\n"
               "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
               "print('up', flush=True)\ntime.sleep(60)\n")
    program = subprocess.Popen([sys.executable, "-c", threads], stdout=subprocess.PIPE)
    try:
        assert program.stdout.readline() == b"up\n"
        os.kill(program.pid, signal.SIGSTOP)  # as dying: it runs none of its own code
        tids = [int(t) for t in os.listdir(f"/proc/{program.pid}/task")]
        assert len(tids) == 2
        unprivileged = os.fork()
        if unprivileged == 0:  # pragma: no cover (the child)
            code = 1  # whatever goes wrong here must not go on as a second pytest
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                hasten_exit(program.pid)  # refused: EPERM, not raised
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(unprivileged, 0)[1] == 0
        assert [os.sched_getscheduler(t) for t in tids] == [os.SCHED_OTHER] * 2
        hasten_exit(program.pid)
        assert [os.sched_getscheduler(t) for t in tids] == [os.SCHED_FIFO] * 2
        hasten_exit(0x3FFFFFFF)  # no such process: nothing to do
    finally:
        program.kill()
        program.wait(timeout=30)


def test_a_killer_is_not_preempted_by_what_it_kills():
    """unpreempted runs its block at a real-time priority (so that a domain woken by its
    SIGKILL cannot take the killer's CPU before hasten_exit has boosted it), and then puts
    the thread back as it was, its nice value too; a block inside one changes nothing, and
    without CAP_SYS_NICE nothing changes and nothing is raised."""
    from ringfence.isolation.sandbox import unpreempted
    child = os.fork()
    if child == 0:  # pragma: no cover (the child: its own scheduling, tried out)
        code = 1
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, 0, 5)
            with unpreempted():
                assert os.sched_getscheduler(0) == os.SCHED_FIFO
                with unpreempted():
                    assert os.sched_getscheduler(0) == os.SCHED_FIFO
                assert os.sched_getscheduler(0) == os.SCHED_FIFO
            assert os.sched_getscheduler(0) == os.SCHED_BATCH
            assert os.getpriority(os.PRIO_PROCESS, 0) == 5
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            with unpreempted():
                assert os.sched_getscheduler(0) == os.SCHED_BATCH
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(child, 0)[1] == 0


def _join_time(cgroup) -> float:
    """Seconds a new process takes to move itself into ``cgroup``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        import time
        began = time.perf_counter()
        for procs in cgroup.procs_files():
            with open(procs, "w") as f:
                f.write("0")
        os.write(w, repr(time.perf_counter() - began).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as result:
        took = float(result.read())
    os.waitpid(pid, 0)
    return took


@pytest.mark.skipif(os.environ.get("RINGFENCE_TEST_HOST_TUNING") != "1",
                    reason="switches the host's cgroup locking for good (until reboot, on "
                    "Linux 6.18+): set RINGFENCE_TEST_HOST_TUNING=1 (.ci/run does)")
def test_favordynmods_lets_a_domain_join_its_cgroup_at_once(tmp_path):
    """``ringfence supervise --favordynmods`` (and ``up``'s): a hierarchy remounted with it
    (its mount flags and options kept), and a new process joins a new cgroup without
    waiting for an RCU grace period (5-12 ms without, here). The mount option is taken
    off again afterwards; since Linux 6.18 the kernel keeps the faster locking it chose
    (a per-threadgroup lock for cgroup.procs writes) until the host reboots."""
    import time
    from pathlib import Path

    from ringfence.hypervisor._lib import lib
    from ringfence.isolation.sandbox import Cgroup, favor_cgroup_moves, favordynmods_remount
    before = Path("/proc/self/mountinfo").read_text()
    plan = favordynmods_remount(before)
    if plan is None:
        pytest.skip("the host has favordynmods already")
    mountpoint, _ = plan
    line = next(line for line in before.splitlines() if line.split()[4] == mountpoint)
    original = ",".join(o for o in line.split(" - ")[1].split()[2].split(",") if o not in ("rw", "ro"))
    supervise = subprocess.run(
        ["ringfence", "supervise", "--favordynmods", "--name", "favordynmods", "--no-sandbox",
         "--ready-on-start", "--burst", "1", "--runtime-dir", str(tmp_path), "--", "true"],
        capture_output=True, text=True, timeout=60)
    if "cgroup moves not favoured" in supervise.stderr:
        pytest.skip(f"this kernel cannot: {supervise.stderr}")
    assert f"remounted={mountpoint} " in supervise.stderr, supervise.stderr
    cgroups = [Cgroup(f"join{i}", group=f"favordynmods.{os.getpid()}") for i in range(3)]
    try:
        after = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                     if line.split()[4] == mountpoint)
        assert after.split()[5] == line.split()[5]  # nosuid, nodev, noexec... as they were
        assert "favordynmods" in after.split(" - ")[1].split()[2].split(",")
        assert favor_cgroup_moves() == ""  # once is enough
        took = []
        for cgroup in cgroups:
            cgroup.create(64 << 20, 16)
            if not cgroup.dirs:
                pytest.skip("no writable cgroup here")
            took.append(_join_time(cgroup))
            time.sleep(0.1)  # past any grace period a move before began
        assert min(took) < 0.002, took
    finally:
        for cgroup in cgroups:
            cgroup.remove()
        assert lib.rf_remount(mountpoint.encode(), original.encode()) == 0
    restored = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if line.split()[4] == mountpoint)
    assert restored == line


ROOTLESS_PROGRAM = """
guest=$1
echo uid=$(id -u)
echo pid=$$
echo processes=$(ls /proc | grep -c '^[0-9]')
echo nics=$(ls /sys/class/net | tr '\\n' ' ')
echo nnp=$(grep NoNewPrivs /proc/self/status | tr -d '\\t ' | cut -d: -f2)
echo fds=$(ls /proc/self/fd | tr '\\n' ' ')
kill -0 $guest 2>/dev/null && echo signal=yes || echo signal=no
"""


def test_a_rootless_sandbox_is_a_user_namespace_with_every_other_wall():
    """Rootless (no root anywhere, as an unprivileged user starts it), a sandbox is a user
    namespace with the rest inside it: uid 0 there, pid 1 of its own pid namespace with no
    other process in sight, only a loopback NIC, no_new_privs, only its standard fds, and
    no way to signal a process outside (a guest's). Only the cgroup is missing (an
    unprivileged user may not make one), as the sandbox says in its log."""
    guest = subprocess.Popen(["sleep", "60"])
    read, write = os.pipe()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover (the child)
            code = 1  # whatever goes wrong here must not go on as a second pytest
            try:
                os.close(read)
                import ctypes
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, which setuid cleared

                async def run() -> bytes:
                    spec = SandboxSpec("rootless-test", namespaces=frozenset({"pid", "mount", "net", "ipc", "uts"}))
                    boxed = await spawn_sandboxed(spec, ["/bin/sh", "-c", ROOTLESS_PROGRAM, "sh", str(guest.pid)],
                                                  stdout=subprocess.PIPE)
                    out = b""
                    while chunk := await boxed.process.stdout.receive_some(4096):
                        out += chunk
                    await boxed.process.wait()
                    return out
                os.write(write, trio.run(run))
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as reader:
            report = dict(line.split("=", 1) for line in reader.read().decode().splitlines())
        assert os.waitpid(child, 0)[1] == 0
    finally:
        guest.kill()
        guest.wait()
    assert report["uid"] == "0" and report["pid"] == "1" and report["nnp"] == "1"
    assert int(report["processes"]) <= 5  # the shell and its pipeline (the host has hundreds)
    assert report["nics"].split() == ["lo"] and report["signal"] == "no"
    assert set(report["fds"].split()) <= {"0", "1", "2", "3"}  # 3: ls's own listing
