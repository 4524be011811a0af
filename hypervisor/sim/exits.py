"""The kernel's word that a process has begun to exit, before it is gone.

A killed process is not gone (its pidfd readable) until it has torn down its address space,
some milliseconds for a domain's. The kernel's task statistics (the TASKSTATS generic
netlink family) send each exiting task's record to registered listeners before that
teardown, and flag the record of a process's last thread (``AGROUP``). From then on no
thread of that process runs another instruction of its own: it issues no more system calls
(a write to its disk included), and its pages change only by the kernel's own exit work.

The record only wakes the hypervisor; :func:`sole_process_exiting` then checks the process
itself, so that a late record (of an earlier process that had the same pid) or a process
that still has others beside it in its sandbox counts for nothing. Listening takes
CAP_NET_ADMIN in the host's user and pid namespaces (checked by hearing a child's exit):
elsewhere :meth:`ExitListener.open` returns None and a death is seen through the pidfd
alone.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
TASKSTATS_CMD_GET = 1
TASKSTATS_CMD_ATTR_REGISTER_CPUMASK = 3
TASKSTATS_TYPE_STATS = 3
TASKSTATS_TYPE_AGGR_PID = 4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port
GENLMSGHDR = struct.Struct("=BBH")  # command, version, reserved
NLATTR = struct.Struct("=HH")       # length, type
# struct taskstats (linux/taskstats.h): the offsets of the fields read have not moved since
# its first version.
AC_FLAG = 8
AC_PID = 128  # the thread group's id, in the initial pid namespace
AGROUP = 0x20  # the record of a process's last thread
PF_EXITING = 0x4  # task->flags, the ninth field of /proc/PID/stat


@dataclass(frozen=True, slots=True)
class ExitListenerStatistics:
    records: int         # task records received
    groups: int          # of them, a process's last thread's
    overruns: int        # times the socket's buffer overflowed (records lost: pidfds tell)


def _attributes(data: bytes, offset: int, end: int) -> list[tuple[int, int, int]]:
    """(type, payload start, payload end) of each netlink attribute in data[offset:end]."""
    found = []
    while offset + NLATTR.size <= end:
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > end:
            break
        found.append((kind & NLA_TYPE_MASK, offset + NLATTR.size, offset + length))
        offset += (length + 3) & ~3
    return found


def parse_records(data: bytes) -> tuple[int, list[int]]:
    """The task records in one datagram from the TASKSTATS family: how many there are, and
    the pids of the processes whose last thread each was (``AGROUP``). What does not parse
    is passed over."""
    records, pids = 0, []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length = NLMSGHDR.unpack_from(data, offset)[0]
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        start = offset + NLMSGHDR.size + GENLMSGHDR.size
        for kind, begin, end in _attributes(data, start, offset + length):
            if kind != TASKSTATS_TYPE_AGGR_PID:
                continue
            for inner, stats, stats_end in _attributes(data, begin, end):
                if inner == TASKSTATS_TYPE_STATS and stats_end - stats >= AC_PID + 4:
                    records += 1
                    if data[stats + AC_FLAG] & AGROUP:
                        pids.append(struct.unpack_from("=I", data, stats + AC_PID)[0])
        offset += (length + 3) & ~3
    return records, pids


def _attribute(kind: int, payload: bytes) -> bytes:
    return NLATTR.pack(NLATTR.size + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


class ExitListener:
    """Receives the task records of every exit on the host, and says which processes'
    last threads have begun to exit."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._records = self._groups = self._overruns = 0

    @classmethod
    def open(cls) -> ExitListener | None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        try:
            sock.bind((0, 0))
            sock.settimeout(2.0)
            family = cls._family(sock, b"TASKSTATS\0")
            with open("/sys/devices/system/cpu/possible") as f:
                cpus = f.read().strip().encode() + b"\0"
            cls._request(sock, family, TASKSTATS_CMD_GET,
                         _attribute(TASKSTATS_CMD_ATTR_REGISTER_CPUMASK, cpus))
            cls._hear_a_child_exit(sock)
            sock.setblocking(False)
        except (OSError, ValueError) as exc:
            sock.close()
            log.info("no exit records: deaths seen through pidfds only", extra={"kv": {"error": str(exc)}})
            return None
        return cls(sock)

    @staticmethod
    def _request(sock: socket.socket, kind: int, command: int, attributes: bytes) -> bytes:
        """Send one request with an acknowledgement asked for; returns its reply (the
        acknowledgement itself when it has none). Raises OSError with the kernel's error."""
        body = GENLMSGHDR.pack(command, 1, 0) + attributes
        sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body)
        reply = sock.recv(65536)
        length, kind, _, _, _ = NLMSGHDR.unpack_from(reply)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, NLMSGHDR.size)
            if error:
                raise OSError(-error, os.strerror(-error))
        return reply[:length]

    @staticmethod
    def _hear_a_child_exit(sock: socket.socket) -> None:
        """Raises ValueError unless the exit of a child is heard, under its own pid. Outside
        the host's user namespace the kernel takes the registration and sends nothing;
        outside its pid namespace the records' pids are not the ones we know. A record is
        sent before its process becomes a zombie, so it is there once waitpid returns."""
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                raise ValueError("the kernel's exit records do not reach this namespace") from None
            if pid in parse_records(data)[1]:
                return

    @classmethod
    def _family(cls, sock: socket.socket, name: bytes) -> int:
        reply = cls._request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, _attribute(CTRL_ATTR_FAMILY_NAME, name))
        start = NLMSGHDR.size + GENLMSGHDR.size
        for kind, begin, end in _attributes(reply, start, len(reply)):
            if kind == CTRL_ATTR_FAMILY_ID and end - begin >= 2:
                return struct.unpack_from("=H", reply, begin)[0]
        raise ValueError("the kernel has no TASKSTATS family")

    async def groups_exiting(self) -> list[int]:
        """Waits for records; returns the pids (thread group ids) of the processes whose
        last thread has begun to exit among those received."""
        await trio.lowlevel.wait_readable(self.sock)
        pids = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return pids
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._overruns += 1
                continue
            records, last = parse_records(data)
            self._records += records
            self._groups += len(last)
            pids += last

    def statistics(self) -> ExitListenerStatistics:
        return ExitListenerStatistics(self._records, self._groups, self._overruns)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # outside trio: nobody waits on it
            trio.lowlevel.notify_closing(self.sock)  # a task in groups_exiting: ClosedResourceError
        self.sock.close()


def sandbox_init(pid: int) -> bool:
    """Whether ``pid`` is the first process of a pid namespace of its own (the process whose
    exit ends every other one in it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) >= 2 and ids[-1] == "1"
    except OSError:
        pass
    return False


def sole_process_exiting(pid: int) -> bool:
    """Whether ``pid`` has a single thread, that thread has begun to exit, and it has no
    children (not even zombies): for the first process of a pid namespace
    (:func:`sandbox_init`), that no process of the namespace will run its own code again.
    (The pid may be another's by now only if that process has died since: then it holds
    all the more.)"""
    try:
        if os.listdir(f"/proc/{pid}/task") != [str(pid)]:
            return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command may hold spaces and parentheses: the fields follow its last ')'.
        flags = int(stat[stat.rindex(b")") + 2:].split()[6])
        if not flags & PF_EXITING:
            return False
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return not f.read().strip()
    except (OSError, ValueError, IndexError):
        return False
