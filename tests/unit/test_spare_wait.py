"""System.wait_spare_ready: woken when a spare comes to stand by, not by polling."""
from __future__ import annotations

import trio
import trio.testing

from ringfence.toolstack.system import Spare, System


async def test_waiting_for_a_spare_ends_when_it_stands_by(tmp_path):
    system = System(config=None, runtime_dir=str(tmp_path), dom0=None, xenstore_path="", supervisor=None)
    stats = tmp_path / "spare1.sock"
    stats.touch()  # the spare is up
    spare = system.spares["stor"] = Spare(domid=5, name="stor.spare1", process=None, stats=str(stats))
    spare.staging_done = True
    done = trio.Event()

    async def waiter() -> None:
        await system.wait_spare_ready("stor")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        system._spare_stands_by()  # news of another spare: this one is not standing by yet
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        spare.standing_by = True
        system._spare_stands_by()
        with trio.fail_after(1):
            await done.wait()
    await system.wait_spare_ready("stor")  # ready already: returns at once
