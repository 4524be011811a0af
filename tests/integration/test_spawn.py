"""Children that must die with their parent outlive the trio worker thread that would
have forked them (PR_SET_PDEATHSIG follows the forking *thread*), and do die with it."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import trio

from ringfence.testing.streams import LineReader

PARENT = textwrap.dedent("""
    import subprocess, trio
    from ringfence.isolation.spawn import open_process_dying_with_us

    async def main():
        await trio.to_thread.run_sync(lambda: None)  # a worker thread exists, then idles
        child = await open_process_dying_with_us(["sleep", "299"], stdout=subprocess.PIPE)
        print(child.pid, flush=True)
        await trio.sleep(11.5)  # trio retires idle worker threads after 10 s
        print("alive" if child.poll() is None else "dead", flush=True)
        await trio.sleep(300)

    trio.run(main)
""")


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_a_child_outlives_idle_worker_threads_and_dies_with_its_parent():
    parent = await trio.lowlevel.open_process([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    try:
        lines = LineReader(parent.stdout)
        with trio.fail_after(30):
            child = int(await lines.next())
            assert await lines.next() == "alive"
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
        with trio.fail_after(5):
            while _exists(child):
                await trio.sleep(0.05)
    finally:
        parent.kill()
    assert not _exists(child)
