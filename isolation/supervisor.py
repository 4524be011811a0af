"""The supervisor: keep driver domains running (DESIGN.md §6).

Each supervised service is a sandboxed process that reports through its own sd_notify
socket (``READY=1``, ``WATCHDOG=1``, ``STATUS=``). When the process exits or misses its
watchdog, the supervisor kills what is left of it, runs the service's teardown (the toolstack
destroys the domain there, so the hypervisor revokes its mappings and channels) and starts it
again after an exponential backoff that resets once a run has been stable. More than
``burst`` starts within ``interval`` seconds marks the service failed, as systemd's
``StartLimitBurst``/``StartLimitIntervalSec`` do. The supervisor knows services only by
their argv and callbacks, never by import.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ringfence._unixsock import bound_unix
from ringfence.isolation.sandbox import (KillTimes, SandboxedProcess, SandboxSpec, sandbox_uid,
                                         spawn_sandboxed)

log = logging.getLogger(__name__)

CREDS = struct.Struct("<iII")


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial_delay: float = 0.05
    max_delay: float = 5.0
    factor: float = 2.0
    stable_after: float = 10.0   # a run this long resets the backoff
    burst: int = 10              # at most this many starts ...
    interval: float = 60.0       # ... within this many seconds
    watchdog: float | None = None  # seconds between WATCHDOG=1 the service must keep
    ready_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Launch:
    """What one start of a service runs; ``teardown`` runs after that run is over (before
    the next start's ``prepare``, or beside it for a service that ``overlaps_teardown``)."""
    argv: Sequence[str]
    pass_fds: Sequence[int] = ()
    env: dict[str, str] | None = None
    teardown: Callable[[], Awaitable[None]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # A process already running that this start takes over instead of spawning one (a warm
    # spare): it counts as ready at once, having started long before.
    adopt: Any = None
    # For programs that do not speak sd_notify: running counts as ready.
    ready_on_start: bool = False
    # A launcher (isolation.launcher) to fork the process from instead of exec'ing it.
    launcher: Any = None


@dataclass(frozen=True, slots=True)
class ServiceStatistics:
    name: str
    state: str
    pid: int
    starts: int
    restarts: int
    crashes: int
    watchdog_kills: int
    status: str
    last_exit: int | None
    last_recovery_ms: float | None


class Service:
    def __init__(self, name: str, prepare: Callable[[], Awaitable[Launch]],
                 sandbox: SandboxSpec | None = None, policy: RestartPolicy | None = None,
                 runtime_dir: str = "/run/ringfence/notify") -> None:
        self.name = name
        self.prepare = prepare
        self.sandbox = sandbox or SandboxSpec(name)
        self.policy = policy or RestartPolicy()
        self.runtime_dir = runtime_dir
        self.state = State.STOPPED
        self.process: SandboxedProcess | None = None
        self.status = ""
        self.starts = self.crashes = self.watchdog_kills = 0
        self.last_exit: int | None = None
        self.last_recovery_ms: float | None = None
        self._start_times: deque[float] = deque()
        self._changed = trio.Event()
        self._last_ping = 0.0
        self._stop = False
        self._crashed_at: float | None = None
        self._leftover: SandboxedProcess | None = None
        self._nursery: trio.Nursery | None = None
        self.on_state: Callable[[Service], None] | None = None
        # A prepare that may start on the next run while the last one's teardown is under
        # way (it calls wait_torn_down() before anything that needs it over).
        self.overlaps_teardown = False
        # Whether the next run waits for a killed run's death (to start, or to take over):
        # if so, a kill hastens the death (isolation.sandbox.hasten_exit); if not, the dying
        # domain's exit takes no CPU from those who take over at a higher priority.
        self.death_awaited: Callable[[], bool] = lambda: True
        self._torn_down = trio.Event()
        self._torn_down.set()

    def statistics(self) -> ServiceStatistics:
        return ServiceStatistics(self.name, self.state.value,
                                 self.process.pid if self.process else 0, self.starts,
                                 max(self.starts - 1, 0), self.crashes, self.watchdog_kills,
                                 self.status, self.last_exit, self.last_recovery_ms)

    def _set_state(self, state: State) -> None:
        self.state = state
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        log.info("service state", extra={"kv": {"service": self.name, "state": state.value}})
        if self.on_state is not None:
            self.on_state(self)

    async def wait_ready(self) -> None:
        while self.state != State.READY:
            if self.state == State.FAILED:
                raise RuntimeError(f"service {self.name} failed")
            await self._changed.wait()

    async def wait_for(self, condition: Callable[[Service], bool]) -> None:
        """Return once ``condition(self)`` holds, checked at each change of state."""
        while not condition(self):
            await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start, watch and restart until stopped or failed."""
        os.makedirs(self.runtime_dir, mode=0o755, exist_ok=True)
        # The first restart after a stable run is immediate (a crash should cost a guest no
        # more than the relaunch itself); a crash loop backs off from initial_delay on.
        delay = 0.0
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._restart_loop(delay)
            finally:
                await self._clear(self._take_leftover())

    async def _restart_loop(self, delay: float) -> None:
        while not self._stop:
            now = time.monotonic()
            while self._start_times and now - self._start_times[0] > self.policy.interval:
                self._start_times.popleft()
            if len(self._start_times) >= self.policy.burst:
                await self.wait_torn_down()
                self._set_state(State.FAILED)
                log.error("service failed: start limit hit", extra={"kv": {
                    "service": self.name, "starts": len(self._start_times),
                    "interval": self.policy.interval}})
                return
            self._start_times.append(now)
            started = time.monotonic()
            await self._run_once()
            if self._stop:
                break
            if time.monotonic() - started >= self.policy.stable_after:
                delay = 0.0
            self._set_state(State.BACKOFF)
            if delay:
                await self._clear(self._take_leftover())
                await trio.sleep(delay)
            delay = min(max(delay * self.policy.factor, self.policy.initial_delay), self.policy.max_delay)
        await self.wait_torn_down()
        self._set_state(State.STOPPED)

    def _take_leftover(self) -> SandboxedProcess | None:
        leftover, self._leftover = self._leftover, None
        return leftover

    @staticmethod
    async def _clear(leftover: SandboxedProcess | None) -> None:
        """The processes and cgroup of a run that ended (its process is dead, others in its
        cgroup may take a few milliseconds more)."""
        if leftover is not None:
            with trio.CancelScope(shield=True):
                await leftover.aclose()

    async def wait_torn_down(self) -> None:
        """Return once the last run is over: its teardown done, its exit status known."""
        await self._torn_down.wait()

    async def _after_run(self, process: SandboxedProcess,
                         teardown: Callable[[], Awaitable[None]] | None, done: trio.Event) -> None:
        """A run's end beside the next one's start: the teardown, then the exit status
        (known by now, or a moment later: a forked process's comes from its launcher)."""
        try:
            with trio.CancelScope(shield=True):
                if teardown is not None:
                    await teardown()
                self.last_exit = await process.wait()
            if not self._stop:
                log.warning("service exited", extra={"kv": {"service": self.name, "status": self.last_exit}})
        finally:
            done.set()

    async def _run_once(self) -> None:
        if not self.overlaps_teardown:
            await self.wait_torn_down()
        try:
            launch = await self.prepare()
        finally:
            await self.wait_torn_down()  # whatever prepare did beside it, it is over now
        leftover = self._take_leftover()
        if launch.adopt is not None and self._nursery is not None:
            # A spare in its own cgroup takes over: the dead run is cleared meanwhile.
            self._nursery.start_soon(self._clear, leftover)
        else:
            # A new process joins the same cgroup: the old one's must be empty first.
            await self._clear(leftover)
        path = os.path.join(self.runtime_dir, f"{self.name}.sock")
        notify: trio.socket.SocketType | None = None
        started: SandboxedProcess | None = None
        try:
            notify = notify_socket(path, self.sandbox)
            env = dict(launch.env if launch.env is not None else os.environ)
            env["NOTIFY_SOCKET"] = path
            if self.policy.watchdog:
                env["WATCHDOG_USEC"] = str(int(self.policy.watchdog * 1e6))
            self._set_state(State.STARTING)
            if launch.adopt is not None:
                self.process = launch.adopt
            else:
                self.process = await spawn_sandboxed(self.sandbox, launch.argv,
                                                     pass_fds=launch.pass_fds, env=env,
                                                     launcher=launch.launcher, **launch.kwargs)
            started = self.process
            self.starts += 1
            self._last_ping = time.monotonic()
            if launch.adopt is not None or launch.ready_on_start:
                self._became_ready()
            # The notifications and the watchdog are left to end beside the recovery: from
            # the moment the process is gone, each step of it is on a guest's time.
            monitor = trio.CancelScope()
            assert self._nursery is not None
            self._nursery.start_soon(self._monitor, notify, monitor)
            try:
                await self.process.wait_gone()
            finally:
                monitor.cancel()
            if not self._stop:
                self.crashes += 1
                self._crashed_at = time.monotonic()
        finally:
            close_notify_socket(notify, path)
            if started is not None:
                started.kill()
                # Cleared before the next start, or beside it when a spare takes over.
                self._leftover = started
                self._torn_down = trio.Event()
                assert self._nursery is not None
                self._nursery.start_soon(self._after_run, started, launch.teardown, self._torn_down)
            elif launch.teardown is not None:  # nothing ran: only the teardown
                with trio.CancelScope(shield=True):
                    await launch.teardown()

    async def _monitor(self, notify: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        with scope:  # cancelled before the socket closes
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_notifications, notify)
                nursery.start_soon(self._watchdog)

    async def _read_notifications(self, sock: trio.socket.SocketType) -> None:
        while True:
            assert self.process is not None
            for key, value in await receive_notification(sock, self.process.pid):
                if key == "READY" and value == "1":
                    self._became_ready()
                elif key == "WATCHDOG" and value == "1":
                    self._last_ping = time.monotonic()
                elif key == "STATUS":
                    self.status = value

    def _became_ready(self) -> None:
        if self.process is not None:
            self.process.watch_program()  # its death is the service's (wait_gone)
        if self._crashed_at is not None:
            self.last_recovery_ms = (time.monotonic() - self._crashed_at) * 1000
            self._crashed_at = None
        self._set_state(State.READY)

    async def _watchdog(self) -> None:
        """Kill a run that is not ready within ready_timeout or, with a watchdog interval,
        that goes that long without WATCHDOG=1. Asleep until the next deadline: a toolstack
        that polled each service four times a second woke for nothing on busy cores."""
        assert self.process is not None
        with trio.move_on_after(self.policy.ready_timeout):
            await self.wait_for(lambda s: s.state != State.STARTING)
        if self.state == State.STARTING:
            self._watchdog_kill("not ready in time")
            return
        interval = self.policy.watchdog
        if not interval:
            return  # the notifications are still read (_monitor)
        while True:
            late = time.monotonic() - self._last_ping - interval
            if self.state == State.READY and late > 0:
                self._watchdog_kill("missed watchdog")
                return
            await trio.sleep(-late if late < 0 else interval)

    def _watchdog_kill(self, reason: str) -> None:
        assert self.process is not None
        self.watchdog_kills += 1
        log.warning("killing service", extra={"kv": {"service": self.name, "reason": reason}})
        self.process.kill(hasten=self.death_awaited())

    async def stop(self) -> None:
        self._stop = True
        if self.process is not None:
            self.process.kill()

    def kill(self) -> KillTimes | None:
        """Kill the current run (fault injection): the service restarts as after a crash.
        Returns when the kill began and when SIGKILL had gone to all of its processes, None
        if it was not running."""
        if self.process is not None:
            return self.process.kill(hasten=self.death_awaited())
        return None


def notify_socket(path: str, sandbox: SandboxSpec) -> trio.socket.SocketType:
    """A socket at ``path`` for sd_notify messages (NOTIFY_SOCKET) from ``sandbox``'s
    processes, with their credentials attached (receive_notification). Whatever was at
    ``path`` goes: one left by a toolstack that was killed would make the bind fail."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = bound_unix(path, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if os.geteuid() == 0:
            os.chown(path, sandbox.uid if sandbox.uid is not None else sandbox_uid(sandbox.name), -1)
    except BaseException:
        sock.close()
        raise
    return sock


def close_notify_socket(sock: trio.socket.SocketType | None, path: str) -> None:
    """:func:`notify_socket`'s socket (None: never made) and its path go."""
    if sock is not None:
        sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def receive_notification(sock: trio.socket.SocketType, pid: int) -> list[tuple[str, str]]:
    """The next sd_notify message (KEY=value lines) sent by process ``pid`` or one of its
    descendants: only a service's own processes may speak for it."""
    while True:
        data, ancdata, _, _ = await sock.recvmsg(4096, socket.CMSG_SPACE(CREDS.size))
        sender = next((CREDS.unpack_from(cdata)[0] for level, kind, cdata in ancdata
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
        if sender is not None and sender in _descendants(pid):
            return [(key, value) for key, _, value in
                    (line.partition("=") for line in data.decode(errors="replace").splitlines())]


def _descendants(pid: int) -> set[int]:
    found = {pid}
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{current}/task/{current}/children") as f:
                for child in f.read().split():
                    found.add(int(child))
                    frontier.append(int(child))
    return found


class Supervisor:
    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    async def add(self, service: Service) -> Service:
        assert self._nursery is not None, "supervisor not running"
        self.services[service.name] = service
        await self._nursery.start(service.run)
        return service

    async def stop_all(self) -> None:
        for service in self.services.values():
            await service.stop()

    def statistics(self) -> list[ServiceStatistics]:
        return [s.statistics() for s in self.services.values()]
