"""The launcher (isolation/launcher.py): domains forked from a started Python, with real
processes. The sandbox itself is checked both ways in test_sandbox.py."""
from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from ringfence.isolation.launcher import open_launcher
from ringfence.isolation.sandbox import Cgroup, SandboxSpec, innermost_pid, spawn_sandboxed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes are made as root here")

PY = sys.executable


async def _output(box) -> bytes:
    out = b""
    with trio.fail_after(20):
        async for chunk in box.process.stdout:
            out += chunk
    return out


async def test_exit_status_argv_environment_and_pipes():
    async with open_launcher(["json"]) as launcher:
        code = "import os, sys; print(sys.argv[1:], os.environ['ANSWER'], input()); sys.exit(3)"
        box = await spawn_sandboxed(SandboxSpec("lnch-a"), [PY, "-c", code, "x", "y"],
                                    env={"ANSWER": "42"}, launcher=launcher,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert type(box.process).__name__ == "ForkedProcess"
        await box.process.stdin.send_all(b"hello\n")
        assert await _output(box) == b"['x', 'y'] 42 hello\n"
        assert await box.wait() == 3
        # -m runs a module as __main__, as the interpreter does
        box = await spawn_sandboxed(SandboxSpec("lnch-b"), [PY, "-m", "json.tool"],
                                    launcher=launcher, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        await box.process.stdin.send_all(b'{"a": 1}')
        await box.process.stdin.aclose()
        assert json.loads(await _output(box)) == {"a": 1}
        assert await box.wait() == 0
        # an uncaught exception: its traceback on stderr, status 1
        box = await spawn_sandboxed(SandboxSpec("lnch-c"), [PY, "-c", "1/0"], launcher=launcher,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert await box.wait() == 1
        # killed through its pidfd
        box = await spawn_sandboxed(SandboxSpec("lnch-d"), [PY, "-c", "import time; time.sleep(60)"],
                                    launcher=launcher)
        box.kill()
        with trio.fail_after(10):
            assert await box.wait() == -signal.SIGKILL
        stats = launcher.statistics()
        assert stats.ready and stats.forked == 4 and stats.running == 0 and stats.failed == 0


async def test_other_programs_are_execd():
    async with open_launcher() as launcher:
        box = await spawn_sandboxed(SandboxSpec("lnch-e"), ["/bin/echo", "hi"], launcher=launcher,
                                    stdout=subprocess.PIPE)
        assert await _output(box) == b"hi\n"
        assert type(box.process) is trio.Process and launcher.statistics().forked == 0
        await box.aclose()


async def test_bad_requests_get_an_error_and_the_launcher_goes_on():
    async with open_launcher() as launcher:
        with trio.fail_after(30):
            await launcher._ready.wait()
        null = os.open(os.devnull, os.O_RDWR)
        good = {"argv": [PY, "-c", "pass"], "env": {}, "fds": [0, 1, 2], "sandbox": {}}
        bad = [b"not json", b"[]", json.dumps({**good, "argv": ["/bin/sh", "-c", "id"]}).encode(),
               json.dumps({**good, "fds": [0, 1]}).encode(),            # fewer targets than fds
               json.dumps({**good, "fds": [0, 0, 2]}).encode(),         # the same target twice
               json.dumps({**good, "env": {"A=B": "c"}}).encode(),
               json.dumps(good).encode(),                               # no sandbox to enter
               json.dumps({**good, "sandbox": {                         # a malformed one
                   "what": 1, "hostname": "h", "outer_uid": 0, "outer_gid": 0, "procs_files": [],
                   "limits": [[7]], "expose": [], "idle": False}}).encode()]
        try:
            for message in bad:
                async with launcher._lock:
                    await launcher._sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                              array.array("i", [null] * 3).tobytes())])
                    with trio.fail_after(10):
                        reply = await launcher._replies.receive()
                assert "error" in reply and "child" not in reply, (message, reply)
        finally:
            os.close(null)
        box = await spawn_sandboxed(SandboxSpec("lnch-f"), [PY, "-c", "print('still here')"],
                                    launcher=launcher, stdout=subprocess.PIPE)
        assert await _output(box) == b"still here\n"
        assert launcher.statistics().forked == 1


async def test_a_child_that_cannot_enter_its_sandbox_is_an_error():
    async with open_launcher() as launcher:
        spec = SandboxSpec("lnch-g", rlimits={9999: (1, 1)})  # no such rlimit
        with pytest.raises(OSError, match="entering the sandbox"):
            await spawn_sandboxed(spec, [PY, "-c", "pass"], launcher=launcher)
        assert launcher.statistics().failed == 1


async def test_children_die_with_the_launcher():
    async with open_launcher() as launcher:
        box = await spawn_sandboxed(SandboxSpec("lnch-h"), [PY, "-c", "import time; time.sleep(60)"],
                                    launcher=launcher)
        inner = innermost_pid(box.pid)
        # ps and pgrep see the domain's command line, not the launcher's
        cmdline = open(f"/proc/{inner}/cmdline", "rb").read()
        assert cmdline.rstrip(b"\0").split(b"\0") == [PY.encode(), b"-c", b"import time; time.sleep(60)"]
        launcher.process.kill()
        with trio.fail_after(10):
            assert await box.wait() == -signal.SIGKILL
            while os.path.exists(f"/proc/{inner}"):
                await trio.sleep(0.01)
        # and what comes next is exec'd
        assert launcher.broken
        box = await spawn_sandboxed(SandboxSpec("lnch-i"), [PY, "-c", "pass"], launcher=launcher)
        assert type(box.process) is trio.Process
        assert await box.wait() == 0


async def test_exec_only_when_asked(monkeypatch):
    monkeypatch.setenv("RINGFENCE_LAUNCHER", "exec")
    async with open_launcher(["json"]) as launcher:
        assert launcher is None


async def test_a_start_cancelled_while_waiting_for_its_reply_leaves_none_behind():
    """A start cancelled between its request and the launcher's reply (a spare whose start
    a takeover ends) must not leave the reply to the next start, which would get the
    other's child as its own; the child started for no one is killed."""
    marker = "import sys; print(sys.argv[1], flush=True)"
    async with open_launcher(["ringfence.isolation.sandbox"]) as launcher:
        cancelled = 0
        for attempt in range(40):
            spec = SandboxSpec(f"lnch-race{attempt}", namespaces=frozenset())
            with trio.move_on_after(0.0005 * (1 + attempt % 8)) as scope:
                box = await spawn_sandboxed(spec, [PY, "-c", marker, f"cancelled{attempt}"],
                                            launcher=launcher, stdout=subprocess.PIPE)
            if not scope.cancelled_caught:
                await box.aclose()
                continue
            cancelled += 1
            box = await spawn_sandboxed(SandboxSpec(f"lnch-next{attempt}", namespaces=frozenset()),
                                        [PY, "-c", marker, f"next{attempt}"],
                                        launcher=launcher, stdout=subprocess.PIPE)
            assert await _output(box) == f"next{attempt}\n".encode()
            await box.aclose()
        assert cancelled, "no start was cancelled while it waited"
        with trio.fail_after(10):
            while launcher.statistics().running:  # the children started for no one are gone
                await trio.sleep(0.01)
        # and so are their cgroups: gone before the cancelled start removed them
        assert not any(Cgroup(f"lnch-race{attempt}").live_processes() or any(
            path.exists() for path in Cgroup(f"lnch-race{attempt}").dirs.values()) for attempt in range(40))
