"""A launcher: domains forked from a Python that has already started, instead of exec'd.

A domain exec'd from scratch spends some 300 ms of CPU before it does anything: the
interpreter starts, then imports trio, cffi's module and its driver. For a driver domain
relaunched after a crash that is most of the time a guest waits, and on a small host it is
CPU taken from every other domain. The launcher is a process that imports the domain
programs once and then forks one child per domain (as Chrome's and Android's zygotes do).
A child enters its sandbox as an exec'd domain does (:class:`~ringfence.isolation.
sandbox.SandboxEntry`: cgroup, rlimits, namespaces, no_new_privs, only its own fds, its
own uid), but born pid 1 of its pid namespace, without the waiter an exec'd domain runs
under (:func:`_spawn`), and then runs its ``-m MODULE`` or ``-c CODE`` command line in
place of exec.

The trade-off, as for every zygote: forked domains share the launcher's address-space
layout and string-hash seed, so one domain that learns its own layout learns the others'.
ASLR is defence in depth here (a domain reaches another only through grants the hypervisor
checks); ``RINGFENCE_LAUNCHER=exec`` turns the launcher off.

The launcher's side runs without trio, in one thread (``python -m ringfence.isolation.
launcher MODULE...``); the toolstack's side is :func:`open_launcher`. They speak JSON over
a SEQPACKET socket pair; a domain's fds travel with SCM_RIGHTS, and so does the pidfd the
launcher opens for each child, which the toolstack signals it through. The launcher reaps
its children and reports each one's exit status.
"""
from __future__ import annotations

import array
import atexit
import contextlib
import fcntl
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ringfence.hypervisor._lib import lib
from ringfence.isolation.sandbox import SandboxEntry
from ringfence.isolation.spawn import open_process_dying_with_us, pipe_to_child

log = logging.getLogger(__name__)

DISABLE_ENV = "RINGFENCE_LAUNCHER"  # "exec": every domain exec'd, none forked
MAX_MESSAGE = 1 << 20
MAX_FDS = 64
# The launcher's last argument: blank room its children write their own command lines
# over, where the kernel does not let them point it elsewhere (rf_set_cmdline).
CMDLINE_ROOM = " " * 2048


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([json.dumps(message).encode()], ancillary)


def _fds_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


# ---------------------------------------------------------------- the launcher's side

def _arrange_fds(received: Sequence[int], targets: Sequence[int], keep: int) -> int:
    """In a new child: ``received[i]`` becomes fd ``targets[i]``, every other fd but
    ``keep`` is closed. Returns ``keep``'s new number."""
    base = max([*targets, *received, keep, 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in received]
    keep = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, base)
    for fd, target in zip(moved, targets):
        os.dup2(fd, target)  # inheritable, as pass_fds makes them
    low = 0
    for fd in sorted({*targets, keep}):
        if low < fd:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 30)
    return keep


def _run_python(args: list[str]) -> None:
    """Run ``-m MODULE ARGS`` or ``-c CODE ARGS`` as the interpreter would, then exit."""
    import runpy
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    os._exit(128 + signum)


def _child(request: dict[str, Any], entry: SandboxEntry, fds: list[int], status_fd: int,
           parent: int, parent_pidfd: int | None) -> None:
    """In the fork: enter the sandbox, report success or why not, run the program.
    ``parent_pidfd``: the launcher's, for a child born in a pid namespace of its own."""
    try:
        if lib.rf_die_with_parent(parent) < 0 or (
                parent_pidfd is not None and select.select([parent_pidfd], [], [], 0)[0]):
            raise OSError("the launcher exited while this child was starting")
        status_fd = _arrange_fds(fds, request["fds"], status_fd)
        # ps and pgrep show the domain's own command line, not the launcher's.
        args = b"".join(os.fsencode(arg) + b"\0" for arg in request["argv"])
        lib.rf_set_cmdline(args, len(args))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if os.getpid() == 1:
            # The namespace's init gets only the signals it handles, and there is no waiter
            # to die of a SIGTERM for it: ``kill PID`` ends the domain as it would a waiter.
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        entry.enter()
        os.environ.clear()
        os.environ.update(request["env"])
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(status_fd, (str(exc) or type(exc).__name__).encode()[:4000])
        os._exit(127)
    os.close(status_fd)
    _run_python(request["argv"][1:])


def _validate(request: Any, fds: list[int]) -> tuple[dict[str, Any], SandboxEntry]:
    """The request, and its sandbox read once, here: the fork decides by it too (_spawn)."""
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    argv, targets, env = request.get("argv"), request.get("fds"), request.get("env")
    if not (isinstance(argv, list) and len(argv) >= 3 and all(isinstance(a, str) for a in argv)
            and argv[1] in ("-m", "-c")):
        raise ValueError("argv must be [python, -m|-c, ...]")
    if not (isinstance(targets, list) and len(targets) == len(fds)
            and all(isinstance(t, int) and 0 <= t < 1 << 20 for t in targets)
            and len(set(targets)) == len(targets) and {0, 1, 2} <= set(targets)):
        raise ValueError("fds must name a distinct target for every fd sent, stdio included")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) and "=" not in k
                                          for k, v in env.items())):
        raise ValueError("env must map names to strings")
    if not isinstance(request.get("sandbox"), dict):
        raise ValueError("sandbox missing")
    try:
        entry = SandboxEntry.from_json(request["sandbox"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"sandbox malformed: {exc!r}") from None
    return request, entry


@dataclass(frozen=True, slots=True)
class _Births:
    """What the launcher needs to fork children into pid namespaces of their own."""
    own_pid_namespace: int  # an fd of the launcher's, to come back to after each such fork
    launcher: int           # a pidfd of the launcher, which such a child cannot see otherwise

    @classmethod
    def open(cls) -> _Births | None:
        if os.geteuid() != 0:  # rf_pid_namespace_for_children needs CAP_SYS_ADMIN
            return None
        try:
            return cls(os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC), os.pidfd_open(os.getpid()))
        except OSError:
            return None


def _spawn(request: dict[str, Any], entry: SandboxEntry, fds: list[int],
           births: _Births | None) -> tuple[int, int]:
    """Fork a child for ``request``; returns its pid and a pidfd, once it has entered its
    sandbox (raises with the child's reason when it could not).

    A child whose sandbox has a pid namespace is born pid 1 of a new one, the launcher's
    own child: no waiter between them, as an exec'd domain has (one fork and one process
    fewer per domain start, some 3 ms of CPU on these machines, which a relaunch after a
    crash takes from every other domain). Not with a user namespace, which must come first,
    nor without ``births``, nor where the kernel refuses: the child's sandbox entry then
    makes its waiter."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    born_init = (births is not None and entry.what & lib.RF_SANDBOX_PID
                 and not entry.what & lib.RF_SANDBOX_USER and lib.rf_pid_namespace_for_children() == 0)
    try:
        pid = os.fork()
        if pid == 0:
            os.close(status_r)
            _child(request, entry, fds, status_w, parent, births.launcher if born_init else None)  # no return
    finally:
        os.close(status_w)
        if born_init and lib.rf_setns(births.own_pid_namespace, 0) < 0:
            # Every later child would be born into that namespace: no launcher is better.
            print("launcher: cannot return to its own pid namespace", file=sys.stderr)
            os._exit(70)
    with os.fdopen(status_r, "rb") as status:
        failure = status.read()
    if failure:
        os.waitpid(pid, 0)
        raise OSError(f"entering the sandbox: {failure.decode(errors='replace')}")
    return pid, os.pidfd_open(pid)


def serve(sock: socket.socket, preload: Sequence[str]) -> None:
    """The launcher's loop: import ``preload``, then fork a child per request and report
    each child's exit, until the toolstack closes its end."""
    import importlib
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the toolstack to handle
    imported = []
    for name in preload:
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as exc:  # a missing optional part: its domains start slower
            print(f"launcher: cannot preload {name}: {exc}", file=sys.stderr)
    for name in imported:
        # What every child would otherwise do for itself, done once (ringfence.cli builds
        # its command-line parsers).
        prepare = getattr(sys.modules[name], "prepare_launcher", None)
        if prepare is not None:
            prepare()
    # What the imports made is never garbage: the children's collections need not walk it
    # (shorter pauses), and leaving it untouched keeps its pages shared with the launcher.
    gc.freeze()
    births = _Births.open()
    _send(sock, {"ready": imported})
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    children: dict[int, int] = {}  # pidfd -> pid
    while True:
        for fd, _ in poller.poll():
            if fd != sock.fileno():
                pid = children.pop(fd)
                poller.unregister(fd)
                _, status = os.waitpid(pid, 0)
                os.close(fd)
                _send(sock, {"exited": pid, "status": os.waitstatus_to_exitcode(status)})
                continue
            data, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
            fds = _fds_in(ancillary)
            if not data:
                return
            try:
                pid, pidfd = _spawn(*_validate(json.loads(data), fds), fds, births)
            except (ValueError, OSError) as exc:
                _send(sock, {"error": str(exc)})
            else:
                children[pidfd] = pid
                poller.register(pidfd, select.POLLIN)
                _send(sock, {"pid": pid}, [pidfd])
            finally:
                for received in fds:
                    os.close(received)


# ---------------------------------------------------------------- the toolstack's side

@dataclass(frozen=True, slots=True)
class LauncherStatistics:
    ready: bool
    preloaded: int
    forked: int
    failed: int
    running: int


class ForkedProcess:
    """A domain forked by the launcher: what the toolstack uses of a ``trio.Process``."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin: Any = None
        self.stdout: Any = None
        self.stderr: Any = None
        self._pidfd = pidfd
        self._exited = trio.Event()
        self._gone = trio.Event()  # the process has exited; its status may not be known yet
        self._watched = False
        fields = _stat_fields(pid)
        self._started = fields[19] if fields else None

    def poll(self) -> int | None:
        return self.returncode

    async def wait(self) -> int:
        await self.wait_gone()
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def wait_gone(self) -> None:
        """Return the moment the process has exited, woken by the kernel: a supervisor's
        recovery starts here. Its status comes with the zombie while the launcher has not
        reaped it, else with the launcher's report a moment later (:meth:`wait`)."""
        if not self._watched and not self._gone.is_set():
            self._watched = True  # one task waits on the pidfd, the others on the event
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
                fields = _stat_fields(self.pid)
                if fields and fields[0] == "Z" and fields[19] == self._started:
                    self._exit(os.waitstatus_to_exitcode(int(fields[49])))
                self._gone.set()
            except trio.ClosedResourceError:
                pass  # the report came first (_exit sets _gone)
            finally:
                self._watched = False  # a cancelled watcher hands the pidfd on
        await self._gone.wait()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            # Through the pidfd: never a process that reused the pid.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _exit(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._gone.set()
            self._exited.set()


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from its third field on (state; starttime at [19], exit_code at
    [49]), or [] if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


class Launcher:
    """The toolstack's end of a launcher process (use :func:`open_launcher`)."""

    def __init__(self, sock: trio.socket.SocketType, process: trio.Process) -> None:
        self._sock = sock
        self.process = process
        self._lock = trio.Lock()
        self._replies_in, self._replies = trio.open_memory_channel[dict[str, Any]](1)
        self._children: dict[int, ForkedProcess] = {}
        self._ready = trio.Event()
        self.preloaded: list[str] = []
        self.broken = False
        self.forked = self.failed = 0

    def statistics(self) -> LauncherStatistics:
        return LauncherStatistics(self._ready.is_set() and not self.broken, len(self.preloaded),
                                  self.forked, self.failed,
                                  sum(child.returncode is None for child in self._children.values()))

    def can_start(self, argv: Sequence[str], kwargs: dict[str, Any]) -> bool:
        """Whether ``argv`` is a Python command line the launcher runs (``python -m`` or
        ``-c``, this interpreter, no other process option)."""
        return (not self.broken and len(argv) >= 3 and argv[0] == sys.executable
                and argv[1] in ("-m", "-c") and set(kwargs) <= {"stdin", "stdout", "stderr"})

    async def start(self, argv: Sequence[str], entry: Any, *, pass_fds: Sequence[int] = (),
                    env: dict[str, str], stdin: Any = None, stdout: Any = None,
                    stderr: Any = None) -> ForkedProcess | None:
        """Fork a child that enters ``entry`` (a SandboxEntry) and runs ``argv``; None if
        the launcher has exited (the caller execs instead)."""
        with trio.fail_after(60):
            await self._ready.wait()
        if self.broken:
            return None
        streams: dict[str, Any] = {}
        opened: list[int] = []
        fds: list[int] = []
        try:
            for index, (name, how) in enumerate((("stdin", stdin), ("stdout", stdout), ("stderr", stderr))):
                if how is None:
                    fds.append(index)
                elif how == subprocess.DEVNULL:
                    opened.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
                    fds.append(opened[-1])
                elif how == subprocess.PIPE:
                    streams[name], theirs = pipe_to_child(name)
                    opened.append(theirs)
                    fds.append(theirs)
                else:
                    fds.append(how if isinstance(how, int) else how.fileno())
            request = {"argv": list(argv), "env": dict(env), "fds": [0, 1, 2, *pass_fds],
                       "sandbox": entry.to_json()}
            async with self._lock:
                if self.broken:
                    return None
                try:
                    await self._sock.sendmsg([json.dumps(request).encode()],
                                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [*fds, *pass_fds]).tobytes())])
                except OSError:  # gone: _read sees it too
                    self.broken = True
                    reply = {}
                else:
                    # The launcher answers every request (or exits, and _lost answers): a
                    # reply this caller left behind, cancelled, would be the next caller's.
                    with trio.CancelScope(shield=True):
                        reply = await self._replies.receive()
                    try:
                        await trio.lowlevel.checkpoint_if_cancelled()
                    except BaseException:
                        if reply.get("child") is not None:
                            # Started for no one: it goes, before the caller removes its
                            # cgroup (which the kernel refuses while a process is in it).
                            reply["child"].kill()
                            with trio.CancelScope(shield=True), trio.move_on_after(5):
                                await reply["child"].wait_gone()
                        raise
        except BaseException:
            for stream in streams.values():
                await trio.aclose_forcefully(stream)
            raise
        finally:
            for fd in opened:
                os.close(fd)
        child = reply.get("child")
        if child is None:
            for stream in streams.values():
                await trio.aclose_forcefully(stream)
            if self.broken:
                return None
            self.failed += 1
            raise OSError(reply.get("error", "the launcher could not start the domain"))
        self.forked += 1
        child.stdin, child.stdout, child.stderr = (streams.get("stdin"), streams.get("stdout"),
                                                   streams.get("stderr"))
        return child

    async def _read(self) -> None:
        """Replies to this side's requests, and children's exits, as they come."""
        try:
            while True:
                data, ancillary, _, _ = await self._sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
                fds = _fds_in(ancillary)
                if not data:
                    break
                message = json.loads(data)
                if "ready" in message:
                    self.preloaded = list(message["ready"])
                    self._ready.set()
                elif "exited" in message:
                    child = self._children.pop(int(message["exited"]), None)
                    if child is not None:
                        child._exit(int(message["status"]))
                else:
                    if "pid" in message and fds:
                        child = ForkedProcess(int(message["pid"]), fds.pop(0))
                        self._children[child.pid] = child
                        message["child"] = child
                    await self._replies_in.send(message)
                for fd in fds:
                    os.close(fd)
        finally:
            await self._lost()

    async def _lost(self) -> None:
        """The launcher is gone: its children die with it (their parent-death signal); each
        one's wait ends once its process has."""
        self.broken = True
        self._ready.set()
        # For a request waiting on its reply; with none waiting, the next finds it broken.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            self._replies_in.send_nowait({"error": "the launcher exited"})
        for child in list(self._children.values()):
            # Polled, not waited on through trio: the child's own wait() may be waiting on
            # the same pidfd.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                while child.returncode is None and not select.select([child._pidfd], [], [], 0)[0]:
                    await trio.sleep(0.005)
            child._exit(-signal.SIGKILL)  # no report will say how it ended: as killed
        self._children.clear()


@contextlib.asynccontextmanager
async def open_launcher(preload: Sequence[str] = ()) -> AsyncIterator[Launcher | None]:
    """A launcher that has imported ``preload``, for as long as the block runs (yields None
    when ``RINGFENCE_LAUNCHER=exec``). It starts in the background: the first fork waits
    for its imports. Leaving the block kills it and every child it forked."""
    if os.environ.get(DISABLE_ENV) == "exec":
        yield None
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        process = await open_process_dying_with_us(
            [sys.executable, "-m", "ringfence.isolation.launcher", str(theirs.fileno()), *preload,
             CMDLINE_ROOM],
            pass_fds=(theirs.fileno(),))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    launcher = Launcher(trio.socket.from_stdlib_socket(ours), process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(launcher._read)
            try:
                yield launcher
            finally:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        launcher._sock.close()


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[0]))
    try:
        serve(sock, [name for name in argv[1:] if name.strip()])
    except (BrokenPipeError, ConnectionResetError):
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
