"""The supervisor with real sandboxed processes: restart on crash with backoff, watchdog,
start limit, READY/STATUS, and only the service's own processes may notify."""
from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time

import pytest
import trio

from ringfence.isolation.sandbox import SandboxSpec
from ringfence.isolation.supervisor import Launch, RestartPolicy, Service, State, Supervisor

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes need root here")

SERVICE = textwrap.dedent("""
    from ringfence.isolation.sandbox import drop_privileges_from_environment as d; d()
    import sys, time
    from ringfence._sdnotify import Notifier
    mode = sys.argv[1]
    n = Notifier()
    if mode == "mute":  # never says it is ready
        time.sleep(60)
    n.notify(READY=1, STATUS=f"serving mode={mode}")
    start = time.monotonic()
    while True:
        if mode == "crash" and time.monotonic() - start > 0.2:
            sys.exit(3)
        if mode != "hang":
            n.notify(WATCHDOG=1)
        time.sleep(0.05)
""")


NOTIFY_DIR = f"/run/ringfence/test-notify-{os.getpid()}"  # /tmp is private in a sandbox


@pytest.fixture(autouse=True, scope="module")
def _remove_notify_dir():
    yield
    shutil.rmtree(NOTIFY_DIR, ignore_errors=True)  # 112 of them were left in /run


def service(name: str, mode: str, tmp_path, **policy) -> Service:
    torn_down = []

    async def prepare() -> Launch:
        async def teardown() -> None:
            torn_down.append(1)
        return Launch([sys.executable, "-c", SERVICE, mode], teardown=teardown)

    svc = Service(name, prepare, SandboxSpec(name), RestartPolicy(**policy),
                  runtime_dir=NOTIFY_DIR)
    svc.torn_down = torn_down  # type: ignore[attr-defined]
    return svc


async def test_crashing_service_restarts_then_hits_the_start_limit(tmp_path):
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor().run)
        svc = await sup.add(service("crasher", "crash", tmp_path, burst=3, interval=60,
                                    initial_delay=0.05))
        with trio.fail_after(30):
            while svc.state != State.FAILED:
                await trio.sleep(0.05)
        stats = svc.statistics()
        assert stats.starts == 3 and stats.crashes == 3 and stats.last_exit == 3
        assert len(svc.torn_down) == 3
        assert stats.status == "serving mode=crash"
        nursery.cancel_scope.cancel()


async def test_hung_service_is_killed_by_the_watchdog_and_restarted(tmp_path):
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor().run)
        svc = await sup.add(service("hanger", "hang", tmp_path, watchdog=0.5, burst=2))
        with trio.fail_after(30):
            while svc.state != State.FAILED:
                await trio.sleep(0.05)
        assert svc.watchdog_kills == 2 and svc.starts == 2, (svc.last_exit, svc.statistics())
        nursery.cancel_scope.cancel()


async def test_a_service_never_ready_is_killed_at_its_ready_timeout(tmp_path):
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor().run)
        svc = await sup.add(service("mute", "mute", tmp_path, ready_timeout=0.5, burst=2,
                                    watchdog=None))
        with trio.fail_after(30):
            while svc.state != State.FAILED:
                await trio.sleep(0.05)
        assert svc.watchdog_kills == 2 and svc.starts == 2, (svc.last_exit, svc.statistics())
        nursery.cancel_scope.cancel()


async def test_steady_service_is_ready_and_recovers_from_a_kill(tmp_path):
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor().run)
        svc = await sup.add(service("steady", "steady", tmp_path, watchdog=1.0))
        with trio.fail_after(20):
            await svc.wait_ready()
        first_pid = svc.process.pid
        before = time.monotonic()
        kill = svc.kill()
        # when the kill began and when SIGKILL had gone to the whole sandbox, in order
        assert kill is not None and before <= kill.started <= kill.signalled <= time.monotonic()
        with trio.fail_after(20):
            while not (svc.state == State.READY and svc.process.pid != first_pid):
                await trio.sleep(0.02)
        stats = svc.statistics()
        assert stats.restarts == 1 and stats.last_recovery_ms is not None
        assert stats.last_recovery_ms < 5000
        await svc.stop()
        with trio.fail_after(10):
            while svc.state != State.STOPPED:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


def test_supervise_command_restarts_then_gives_up(tmp_path):
    """`ringfence supervise`: a command that keeps dying is restarted, then given up."""
    import subprocess
    import time
    started = time.monotonic()
    result = subprocess.run(
        ["ringfence", "supervise", "--name", "flaky", "--no-sandbox", "--ready-on-start",
         "--burst", "3", "--interval", "30", "--runtime-dir", str(tmp_path), "--",
         "sh", "-c", f"echo x >> {tmp_path}/starts; exit 3"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert (tmp_path / "starts").read_text().count("x") == 3
    assert "start limit" in result.stderr and time.monotonic() - started < 30


def test_supervise_command_stops_cleanly_on_sigterm(tmp_path):
    import signal
    import subprocess
    import time
    process = subprocess.Popen(
        ["ringfence", "supervise", "--name", "sleeper", "--no-sandbox", "--ready-on-start",
         "--runtime-dir", str(tmp_path), "--", "sleep", "301.25"],  # a command line of its own
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert subprocess.run(["pgrep", "-f", "sleep 301.25"], capture_output=True).returncode == 1


async def test_a_notify_socket_replaces_one_left_behind(tmp_path):
    """A toolstack killed with its domains leaves their notify sockets (a spare's among
    them) in the runtime directory: the next one's bind must not fail on them."""
    import socket

    from ringfence.isolation.supervisor import close_notify_socket, notify_socket
    path = str(tmp_path / "stor.spare1.sock")
    left = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    left.bind(path)
    left.close()  # the file stays
    sock = notify_socket(path, SandboxSpec("stor.spare1"))
    try:
        assert os.path.exists(path)
    finally:
        close_notify_socket(sock, path)
    assert not os.path.exists(path)
