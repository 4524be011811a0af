"""Sandboxes for domains: namespaces, a cgroup, rlimits, no_new_privs, only handed fds.

Every domain, driver or guest, is started with :func:`spawn_sandboxed`. Its process gets its
own pid, mount, net, ipc and uts namespaces (and a user namespace when not run as root), a
private /tmp and /dev/shm, a fresh /proc that shows only its own processes, a cgroup with
memory and pids limits, rlimits, ``no_new_privs``, and no fd but those passed explicitly.
As root it then drops to an unprivileged uid of its own (``RINGFENCE_SANDBOX_UID``), once
Python has loaded, so that it holds no capability and owns none of the pages of others.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ringfence.hypervisor._lib import ffi, lib
from ringfence.isolation.spawn import open_process_dying_with_us

log = logging.getLogger(__name__)

UID_ENV = "RINGFENCE_SANDBOX_UID"
CGROUP_ROOT = Path("/sys/fs/cgroup")
NAMESPACE_FLAGS = {"pid": lib.RF_SANDBOX_PID, "mount": lib.RF_SANDBOX_MOUNT,
                   "net": lib.RF_SANDBOX_NET, "ipc": lib.RF_SANDBOX_IPC,
                   "uts": lib.RF_SANDBOX_UTS}
ALL_NAMESPACES = frozenset(NAMESPACE_FLAGS)


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    name: str
    namespaces: frozenset[str] = ALL_NAMESPACES
    memory_max: int | None = 512 << 20
    pids_max: int | None = 256
    nofile: int = 4096
    core_dumps: bool = False
    uid: int | None = None  # as root: the unprivileged uid to drop to (None: 100000 + hash)
    rlimits: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    # The cgroup goes in ringfence/<group>/<name> (ringfence/<name> without a group): one
    # group per system, so that two systems on a host that both have a "stor" never share
    # (and kill) each other's.
    group: str = ""
    # Start at SCHED_IDLE (a warm spare: its start-up takes only CPU the running domains
    # leave). Set before the program runs, so that whoever raises it later (a takeover)
    # is never undone by it.
    start_idle: bool = False
    # Its nice value (rootless, no lower than its starter's). dom0's daemons run at
    # toolstack.system.CONTROL_PLANE_NICE.
    nice: int = 0


@dataclass(frozen=True, slots=True)
class SandboxStatistics:
    name: str
    pid: int
    alive: bool
    cgroup: str
    memory_bytes: int
    memory_max: int | None
    pids: int
    pids_max: int | None


@functools.cache  # asked at every sandbox's start; where we run does not change
def _own_cgroup(controller: str) -> str:
    """Our cgroup path in a v1 hierarchy (or v2 with controller '')."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(",") or (controller == "" and controllers == ""):
            return path.lstrip("/")
    return ""


def _ringfence_dirs() -> dict[str, Path]:
    """Where our sandboxes' cgroups go, by controller: below ours, in the unified hierarchy
    (controller '') where there is one, else in v1's memory and pids hierarchies."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return {"": CGROUP_ROOT / _own_cgroup("") / "ringfence"}
    return {controller: CGROUP_ROOT / controller / _own_cgroup(controller) / "ringfence"
            for controller in ("memory", "pids") if (CGROUP_ROOT / controller).is_dir()}


class Cgroup:
    """A per-sandbox cgroup: v2 where the unified hierarchy has the controllers, else v1."""

    def __init__(self, name: str, group: str = "") -> None:
        self.name = name
        self.group = group
        self.dirs = {controller: base / group / name for controller, base in _ringfence_dirs().items()}
        self.v2 = "" in self.dirs

    def create(self, memory_max: int | None, pids_max: int | None) -> None:
        for controller, path in list(self.dirs.items()):
            try:
                path.mkdir(parents=True, exist_ok=True)
                if self.v2:
                    # v2 hands a controller down only where every parent below ours enables it.
                    for parent in reversed(path.parents[:2 if self.group else 1]):
                        with contextlib.suppress(OSError):
                            (parent / "cgroup.subtree_control").write_text("+memory +pids")
                    if memory_max is not None:
                        (path / "memory.max").write_text(str(memory_max))
                    if pids_max is not None:
                        (path / "pids.max").write_text(str(pids_max))
                elif controller == "memory" and memory_max is not None:
                    (path / "memory.limit_in_bytes").write_text(str(memory_max))
                elif controller == "pids" and pids_max is not None:
                    (path / "pids.max").write_text(str(pids_max))
            except OSError as exc:
                # Rootless, or a hierarchy we may not write: run without that limit.
                log.warning("cgroup unavailable", extra={"kv": {
                    "sandbox": self.name, "controller": controller or "v2", "error": exc.strerror}})
                self.dirs.pop(controller)

    def set_memory_max(self, limit: int) -> bool:
        """A new memory limit (the fault harness's squeeze: below what the sandbox uses, its
        kernel reclaims, then kills in it); False where there is no memory controller."""
        path = self.dirs.get("" if self.v2 else "memory")
        if path is None:
            return False
        (path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
        return True

    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.dirs.values()]

    def _read(self, controller: str, v1_name: str, v2_name: str) -> int:
        path = self.dirs.get("" if self.v2 else controller)
        if path is None:
            return 0
        with contextlib.suppress(OSError, ValueError):
            return int((path / (v2_name if self.v2 else v1_name)).read_text().split()[0])
        return 0

    def live_processes(self) -> int:
        """Processes still running in the cgroup (zombies awaiting a reaper are not)."""
        count = 0
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                count = max(count, len((path / "cgroup.procs").read_text().split()))
        return count

    def memory_bytes(self) -> int:
        return self._read("memory", "memory.usage_in_bytes", "memory.current")

    def pids(self) -> int:
        return self._read("pids", "pids.current", "pids.current")

    def kill_all(self, hasten: bool = True) -> None:
        """SIGKILL every process in the cgroup, and (``hasten``) let each one die at once
        (see :func:`hasten_exit`)."""
        with unpreempted():
            for path in self.dirs.values():
                with contextlib.suppress(OSError):
                    for pid in (path / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                            if hasten:
                                hasten_exit(int(pid))

    def remove(self) -> None:
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                path.rmdir()
                if self.group:  # the system's group goes with its last sandbox
                    path.parent.rmdir()


@dataclass(frozen=True)
class KillTimes:
    """When a kill began (its first SIGKILL) and when the signal had gone to every process
    of the sandbox (``time.monotonic()``). Both are read at the killer's real-time priority:
    back at its own, it may wait behind busy CPUs for milliseconds before it runs again."""
    started: float
    signalled: float


@contextlib.contextmanager
def unpreempted() -> Iterator[None]:
    """The calling thread at a real-time priority for the block (unless it is at one, or
    may not be): a process it kills there, woken to die, cannot take this CPU before the
    block has hastened its exit (:func:`hasten_exit`). A driver domain that last ran on
    the killer's CPU did, under load: it ran 3 ms of its exit at normal priority, then
    waited behind every other task for the rest, before the killer had boosted it."""
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        raised = policy not in (os.SCHED_FIFO, os.SCHED_RR)
        if raised:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:  # PermissionError without CAP_SYS_NICE: as it is
        raised = False
    try:
        yield
    finally:
        if raised:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, policy, param)


def hasten_exit(pid: int) -> None:
    """Run the threads of ``pid``, which has SIGKILL pending, at a real-time priority.

    A killed process is not gone until each of its threads has run its own exit in the
    kernel (its address space torn down: some 2 ms at a domain's size), and a driver
    domain's relaunch waits for exactly that (a spare's takeover does not, where the
    hypervisor hears of exits as they begin: then nothing hastens it). On a host whose
    CPUs are busy each thread first waits its turn: kill to death took 4-8 ms at the 90th
    percentile with three CPU hogs on two cores, against 3 ms at this priority. It cannot
    be abused: a thread with SIGKILL pending never runs its own code again (not even a
    fork completes), and it spends the CPU it takes now later anyway. Without
    CAP_SYS_NICE (rootless) it stays as it is."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setscheduler(int(tid), os.SCHED_FIFO, os.sched_param(1))
            except PermissionError:
                return
            except OSError:
                continue  # that thread is gone already


def group_cgroups(group: str) -> list[Path]:
    """The cgroup directories of a group that exist, in each hierarchy: what a system left."""
    return [base / group for base in _ringfence_dirs().values() if (base / group).exists()]


# Moving a process into a cgroup (a domain joining its own, at every start) takes the
# kernel's global cgroup_threadgroup_rwsem for writing. Unless a move happened in the last
# few milliseconds, that waits for an RCU grace period: 5-12 ms on these machines, a fifth
# of a cold recovery. ``favordynmods`` (Linux 6.0) keeps the lock ready for writers, at the
# price of a little more work in every fork and exit; one hierarchy with it is enough.
# Since Linux 6.18 it also moves cgroup.procs writes to a lock of each thread group, and
# that choice stays until the host reboots, whatever the mount option says later.
FAVORDYNMODS = "favordynmods"


def favordynmods_remount(mountinfo: str) -> tuple[str, str] | None:
    """From /proc/self/mountinfo's text: (mount point, superblock options) to remount a
    cgroup hierarchy with, a cgroup2 one first; None if one has it already. Raises
    OSError(ENOENT) if there is no cgroup hierarchy."""
    candidates = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 10:
            continue
        fstype, _, superopts = line.split(" - ", 1)[1].split()[:3]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = [o for o in superopts.split(",") if o not in ("rw", "ro")]
        if FAVORDYNMODS in options:
            return None
        mountpoint = fields[4].replace("\\040", " ")
        candidates.append((fstype != "cgroup2", mountpoint, ",".join([*options, FAVORDYNMODS])))
    if not candidates:
        raise OSError(errno.ENOENT, "no cgroup hierarchy mounted")
    _, mountpoint, options = min(candidates)
    return mountpoint, options


def favor_cgroup_moves() -> str:
    """Remount a cgroup hierarchy with ``favordynmods`` (see FAVORDYNMODS) unless one has it;
    returns the hierarchy's mount point, or "" if one had it already. Host-wide, and root's
    to do: ``ringfence up --favordynmods`` asks for it. Raises OSError where the kernel
    cannot (EINVAL before Linux 6.0)."""
    remount = favordynmods_remount(Path("/proc/self/mountinfo").read_text())
    if remount is None:
        return ""
    mountpoint, options = remount
    err = lib.rf_remount(mountpoint.encode(), options.encode())
    if err < 0:
        raise OSError(-err, f"remount {mountpoint} with {FAVORDYNMODS}: {os.strerror(-err)}")
    return mountpoint


class SandboxedProcess:
    def __init__(self, spec: SandboxSpec, process: Any, cgroup: Cgroup) -> None:
        # process: a trio.Process, or a launcher.ForkedProcess (same interface)
        self.spec = spec
        self.process = process
        self.pid = process.pid
        self.cgroup = cgroup
        self.cgroup_removed = False
        self._program_pidfd: int | None = None

    def watch_program(self) -> None:
        """Hold a pidfd on the program the sandbox runs, where it runs under a waiter (a
        pid namespace), so that :meth:`wait_gone` also waits for it: a waiter killed with
        -9 is gone a moment before its program, which its death kills. Call once the
        program runs (it is forked after the waiter starts)."""
        pid = innermost_pid(self.pid)
        if self._program_pidfd is None and pid != self.pid:
            with contextlib.suppress(OSError):
                self._program_pidfd = os.pidfd_open(pid)

    def kill(self, hasten: bool = True) -> KillTimes:
        """SIGKILL the sandbox's processes; ``hasten``: let them die at once, for whoever
        waits for that (see :func:`hasten_exit`)."""
        with unpreempted():
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            if not self.cgroup_removed:
                self.cgroup.kill_all(hasten)
            return KillTimes(started, time.monotonic())

    async def wait(self) -> int:
        status = await self.process.wait()
        return status

    async def wait_gone(self) -> None:
        """Return once the process has exited, maybe before its status is known (a forked
        one's comes from the launcher a moment later; :meth:`wait` has it)."""
        gone = getattr(self.process, "wait_gone", None)  # a trio.Process has no such wait
        await (gone() if gone is not None else self.process.wait())
        if self._program_pidfd is not None:  # and every process of its pid namespace
            if not self.cgroup_removed:
                self.cgroup.kill_all()  # the waiter's death kills it; a waiter that died alone too
            with trio.move_on_after(1) as slow:
                await trio.lowlevel.wait_readable(self._program_pidfd)
            if slow.cancelled_caught:  # in the kernel (a disk that does not answer): wait on
                log.warning("sandbox program still exiting", extra={"kv": {"sandbox": self.spec.name}})
                await trio.lowlevel.wait_readable(self._program_pidfd)
            self._close_program_pidfd()

    def _close_program_pidfd(self) -> None:
        fd, self._program_pidfd = self._program_pidfd, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def aclose(self) -> None:
        """Kill what is left and remove the cgroup."""
        self.kill()
        await self.process.wait()
        self._close_program_pidfd()
        await self._empty_cgroup()

    async def _empty_cgroup(self) -> None:
        """Kill what is left in the cgroup, then remove it, once: a sandbox started under
        the same name afterwards gets a cgroup at the same path, which must be left alone."""
        with trio.move_on_after(2):
            while not self.cgroup_removed and self.cgroup.live_processes():
                self.cgroup.kill_all()
                await trio.sleep(0.005)
        if not self.cgroup_removed:
            self.cgroup_removed = True
            self.cgroup.remove()

    def statistics(self) -> SandboxStatistics:
        return SandboxStatistics(self.spec.name, self.pid, self.process.poll() is None,
                                 ",".join(str(p) for p in self.cgroup.dirs.values()),
                                 self.cgroup.memory_bytes(), self.spec.memory_max,
                                 self.cgroup.pids(), self.spec.pids_max)


def _hidden_interpreter_paths() -> dict[str, list[str]]:
    """Paths Python needs that sit below a directory others may not enter, by that directory.

    A domain drops to an unprivileged uid after exec; if the interpreter lives in, say,
    /root/.pyenv, it must still be able to import from there.
    """
    return {cover: list(paths) for cover, paths in _covers(
        (sys.base_prefix, sys.prefix, sys.exec_prefix, *sys.path)).items()}


@functools.lru_cache(maxsize=4)  # asked at every sandbox's start (a stat of each ancestor)
def _covers(interpreter_paths: tuple[str, ...]) -> dict[str, list[str]]:
    needed = {os.path.realpath(p) for p in interpreter_paths if p and os.path.isdir(p)}
    covers: dict[str, list[str]] = {}
    for path in sorted(needed):
        parts = Path(path).parts
        for depth in range(2, len(parts)):
            ancestor = str(Path(*parts[:depth]))
            if not os.stat(ancestor).st_mode & 0o001:
                covers.setdefault(ancestor, [])
                # keep only the outermost paths under each cover
                if not any(path.startswith(k + "/") for k in covers[ancestor]):
                    covers[ancestor].append(path)
                break
    return covers


def sandbox_uid(name: str) -> int:
    """A stable unprivileged uid per sandbox name, away from real users."""
    import zlib
    return 200000 + zlib.crc32(name.encode()) % 100000


@dataclass(frozen=True, slots=True)
class SandboxEntry:
    """What a new process does to enter its sandbox, as plain data: run between fork and
    exec (or, from the launcher, between fork and the program) by :meth:`enter`."""
    what: int
    hostname: bytes
    outer_uid: int
    outer_gid: int
    procs_files: tuple[str, ...]
    limits: tuple[tuple[int, int, int], ...]
    expose: tuple[tuple[str, tuple[str, ...]], ...]
    idle: bool = False
    nice: int = 0

    def enter(self) -> None:
        if self.idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        with contextlib.suppress(PermissionError):  # rootless: no lower than its starter's
            os.setpriority(os.PRIO_PROCESS, 0, self.nice)
        for path in self.procs_files:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        for which, soft, hard in self.limits:
            resource.setrlimit(which, (soft, hard))
        status = lib.rf_sandbox_enter(self.what, self.hostname, self.outer_uid, self.outer_gid)
        if status < 0:
            raise OSError(-status, f"entering sandbox: {os.strerror(-status)}")
        for cover, paths in self.expose:
            names = [ffi.new("char[]", p.encode()) for p in paths]
            status = lib.rf_sandbox_expose(cover.encode(), ffi.new("char *[]", names), len(names))
            if status < 0:
                raise OSError(-status, f"exposing the interpreter: {os.strerror(-status)}")

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "hostname": self.hostname.decode(), "outer_uid": self.outer_uid,
                "outer_gid": self.outer_gid, "procs_files": list(self.procs_files),
                "limits": [list(limit) for limit in self.limits],
                "expose": [[cover, list(paths)] for cover, paths in self.expose], "idle": self.idle,
                "nice": self.nice}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxEntry:
        return cls(int(data["what"]), str(data["hostname"]).encode(), int(data["outer_uid"]),
                   int(data["outer_gid"]), tuple(map(str, data["procs_files"])),
                   tuple((int(w), int(s), int(h)) for w, s, h in data["limits"]),
                   tuple((str(c), tuple(map(str, p))) for c, p in data["expose"]), bool(data["idle"]),
                   int(data["nice"]))


async def spawn_sandboxed(spec: SandboxSpec, argv: Sequence[str], *,
                          pass_fds: Sequence[int] = (), env: Mapping[str, str] | None = None,
                          launcher: Any = None, **kwargs: Any) -> SandboxedProcess:
    """Start ``argv`` in a new sandbox. With a ``launcher`` (:class:`~ringfence.isolation.
    launcher.Launcher`) a Python program is forked from it instead of exec'd: the same
    sandbox, without the interpreter's start-up."""
    rootless = os.geteuid() != 0
    what = 0
    for ns in spec.namespaces:
        what |= NAMESPACE_FLAGS[ns]
    if rootless:
        what |= lib.RF_SANDBOX_USER
    cgroup = Cgroup(spec.name, spec.group)
    cgroup.create(spec.memory_max, spec.pids_max)
    limits = {resource.RLIMIT_NOFILE: (spec.nofile, spec.nofile),
              resource.RLIMIT_CORE: (0, 0) if not spec.core_dumps else (-1, -1),
              **spec.rlimits}
    environment = dict(env if env is not None else os.environ)
    covers: dict[str, list[str]] = {}
    if not rootless:
        environment[UID_ENV] = str(spec.uid if spec.uid is not None else sandbox_uid(spec.name))
        if "mount" in spec.namespaces:
            covers = _hidden_interpreter_paths()
    entry = SandboxEntry(what, spec.name.encode()[:63], os.getuid(), os.getgid(),
                         tuple(cgroup.procs_files()),
                         tuple((which, soft, hard) for which, (soft, hard) in limits.items()),
                         tuple((cover, tuple(paths)) for cover, paths in covers.items()), spec.start_idle,
                         spec.nice)
    try:
        process = None
        if launcher is not None and launcher.can_start(argv, kwargs):
            # None when the launcher has gone meanwhile: then exec'd like any other.
            process = await launcher.start(argv, entry, pass_fds=tuple(pass_fds),
                                           env=environment, **kwargs)
        if process is None:
            process = await open_process_dying_with_us(
                list(argv), pass_fds=tuple(pass_fds), close_fds=True, env=environment,
                preexec_fn=entry.enter, **kwargs)
    except BaseException:
        cgroup.remove()
        raise
    log.info("sandbox started", extra={"kv": {"sandbox": spec.name, "pid": process.pid,
                                              "rootless": rootless,
                                              "forked": not isinstance(process, trio.Process)}})
    boxed = SandboxedProcess(spec, process, cgroup)
    # Whoever started it, the cgroup goes when the sandbox's process does.
    trio.lowlevel.spawn_system_task(_reap, boxed)
    return boxed


async def _reap(boxed: SandboxedProcess) -> None:
    try:
        await boxed.process.wait()
    finally:
        with trio.CancelScope(shield=True):
            await boxed._empty_cgroup()


def innermost_pid(pid: int) -> int:
    """The program a sandbox runs: with a pid namespace, an exec'd one runs under a waiter
    (``pid``), as that waiter's only child; one the launcher forked is ``pid`` itself, pid 1
    of its own namespace (which its own children share)."""
    try:
        if os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino:
            return pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
        return int(children[0]) if children else pid
    except OSError:
        return pid


def drop_privileges_from_environment() -> None:
    """Called first thing by a domain's entry point: become the sandbox's own uid.

    Done after exec, not before, because the interpreter may live where only root can
    read. Dropping every uid from 0 clears all capabilities.
    """
    value = os.environ.pop(UID_ENV, None)
    if value is None:
        return
    uid = int(value)
    parent = os.getppid()
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.geteuid() != uid:
        raise OSError(errno.EPERM, "could not drop privileges")
    # Changing credentials cleared the parent-death signal: set it again.
    if lib.rf_die_with_parent(parent) < 0:
        raise OSError(errno.ESRCH, "the sandbox's parent exited while it was starting")


_CLONE_FLAGS = {"net": 0x40000000, "uts": 0x04000000, "ipc": 0x08000000, "mnt": 0x00020000}


def enter_namespaces(pid: int, names: Sequence[str]) -> None:
    """Join the namespaces of process ``pid`` (``ringfence exec``). The caller must be
    single-threaded (the kernel refuses a mount namespace otherwise) and about to exec."""
    fds = []
    try:
        # All opened first: once in the guest's mount namespace, its /proc is what we see.
        for name in names:
            target = os.stat(f"/proc/{pid}/ns/{name}")
            if target.st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
                fds.append((name, os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)))
        for name, fd in fds:
            status = lib.rf_setns(fd, _CLONE_FLAGS[name])
            if status < 0:
                raise OSError(-status, f"entering the {name} namespace of {pid}: {os.strerror(-status)}")
    finally:
        for _, fd in fds:
            os.close(fd)
