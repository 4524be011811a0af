"""Backing off from a peer that notifies without giving work (ATTACKS A13: XSA-332 for
backends facing frontends, XSA-391 for frontends facing rogue backends)."""
from __future__ import annotations

import trio


class NotificationStorm:
    """Backs off from a peer that notifies without giving work (as Linux's late EOI):
    after ``run`` wakeups in a row that brought nothing, each further one waits a delay that
    doubles up to ``max_delay``; the first wakeup with work ends the back-off. A peer notifying
    in a loop then costs us almost no CPU, and only itself latency.

    Work taken between two wakeups counts for the next one (``note_work``): a notification
    for requests that a busy loop already took is late, not spurious (as Linux's lateeoi
    counts an event spurious only if no work was found since the previous one)."""

    def __init__(self, run: int = 8, first_delay: float = 0.0005, max_delay: float = 0.05) -> None:
        self.run, self.first_delay, self.max_delay = run, first_delay, max_delay
        self.spurious = 0   # wakeups that brought no work, in total
        self._in_a_row = 0
        self._worked = False

    def note_work(self) -> None:
        self._worked = True

    async def woken(self, had_work: bool) -> None:
        if had_work or self._worked:
            self._in_a_row = 0
            self._worked = False
            return
        self.spurious += 1
        self._in_a_row += 1
        if self._in_a_row > self.run:
            excess = min(self._in_a_row - self.run - 1, 16)
            await trio.sleep(min(self.first_delay * 2 ** excess, self.max_delay))
