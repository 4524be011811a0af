"""A loop of the C core (``rf_*_loop_run``, netloop.c) on a thread of its own.

The loop runs with the GIL released until it is stopped or needs Python, and returns why;
the caller does its part and runs it again. Cancelling :meth:`CLoop.run` stops the loop (a
flag, then its stop eventfd) and waits for the thread, so nothing the loop uses is freed
under it. Each loop has its own thread limit: a driver domain with many devices must not
wait for trio's shared pool.
"""
from __future__ import annotations

import os
from typing import Any

import trio

from ringfence.hypervisor._lib import c_counter, lib


class CLoop:
    STOPPED, HANDED_BACK, NEW_BUFFERS = lib.RF_NETLOOP_STOPPED, lib.RF_NETLOOP_HANDED_BACK, lib.RF_NETLOOP_NEW_BUFFERS
    OVERFLOW, TAP_ERROR = lib.RF_NETLOOP_OVERFLOW, lib.RF_NETLOOP_TAP_ERROR

    def __init__(self, run: Any, c_loop: Any, base: Any, port: Any, tx: Any, rx: Any) -> None:
        """``base``: the loop's rf_netloop; ``port``: a channel with eventfds (sim); ``tx``
        and ``rx``: its rings (kept here: C holds their addresses)."""
        self._run, self.c, self.base, self._rings = run, c_loop, base, (tx, rx)
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        base.wait_fd, base.notify_fd, base.stop_fd = port.wait_fd, port.notify_fd, self._stop_fd
        base.tx_ring, base.rx_ring = tx.c_ring, rx.c_ring
        self._limiter = trio.CapacityLimiter(1)

    @staticmethod
    def possible(port: Any) -> bool:
        """Whether this channel can be waited on and notified from C (eventfds)."""
        return getattr(port, "wait_fd", -1) >= 0 and getattr(port, "notify_fd", -1) >= 0

    async def run(self) -> int:
        self.base.stop = 0
        finished = False

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not finished:
                    self.base.stop = 1
                    os.eventfd_write(self._stop_fd, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_when_cancelled)
            try:
                return int(await trio.to_thread.run_sync(self._run, self.c, limiter=self._limiter))
            finally:
                finished = True
                nursery.cancel_scope.cancel()

    error = c_counter("base", "error", doc="errno of the last TAP error")
    spurious = c_counter("base", "spurious", doc="notifications that brought no work")

    def statistics(self) -> dict[str, int]:
        b = self.base
        return {"wakeups": int(b.wakeups), "spurious": int(b.spurious),
                "notifications": int(b.notifications), "backoffs": int(b.backoffs)}

    def close(self) -> None:
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
