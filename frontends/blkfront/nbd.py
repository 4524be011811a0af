"""An NBD server (fixed newstyle) in front of a block device, so that qemu-img, nbdinfo,
nbdcopy and fio's nbd engine use a guest's disk unchanged.

Each connection negotiates options (EXPORT_NAME, GO, INFO, LIST, ABORT; others get
NBD_REP_ERR_UNSUP), then serves READ, WRITE (with FUA), FLUSH, TRIM, WRITE_ZEROES, CACHE and
DISC with simple replies. Requests are served concurrently (clients pipeline) up to a bound
per connection. A malformed client gets an error reply or a clean disconnect and a counter.
The device may pause (its backend restarting): requests then simply wait.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ringfence._rawsock import RawSocket
from ringfence._unixsock import listen_unix
from ringfence.frontends.blkfront.fastpath import NbdConnection, NbdRequest

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1, 2
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_CACHE = 32, 64, 1024
EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95
MAX_REQUEST = 32 << 20
MAX_OPTION = 64 << 10
MAX_IN_FLIGHT = 64
SEND_BUFFER = 4 << 20

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">II")  # then the request's 8-byte cookie
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")


class BlockDevice(Protocol):
    size: int
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...


class ProtocolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class NbdStatistics:
    connections: int
    connections_total: int
    requests: dict[str, int]
    bytes_read: int
    bytes_written: int
    errors: int
    protocol_violations: int


class _Reader:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream, self.buffer = stream, bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self.buffer)))
            if not chunk:
                raise EOFError
            self.buffer += chunk
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


class NbdServer:
    def __init__(self, device: BlockDevice, export_name: str = "", description: str = "") -> None:
        self.device = device
        self.export_name = export_name
        self.description = description
        self.counters: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # served by Python
        self.active = 0
        self._open: set[NbdConnection] = set()
        self._closed: Counter[str] = Counter()   # what closed connections' C paths served

    def statistics(self) -> NbdStatistics:
        c = self.counters + self._closed
        for conn in self._open:
            c.update(conn.counters())
        requests = self.requests + Counter({"read": c["read"], "write": c["write"]})
        return NbdStatistics(self.active, c["connections"], dict(requests), c["bytes_read"],
                             c["bytes_written"], c["errors"], c["protocol_violations"])

    def transmission_flags(self) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE
        if self.device.read_only:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return flags

    # ---- listeners -------------------------------------------------------------------
    async def serve_unix(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Clients may connect as soon as the socket appears.
        sock = await listen_unix(path, private=False)
        try:
            await trio.serve_listeners(self.serve_stream, [trio.SocketListener(sock)],
                                       task_status=task_status)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a detached disk leaves no socket behind

    async def serve_tcp(self, port: int, host: str = "127.0.0.1", *,
                        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_tcp(self.serve_stream, port, host=host, task_status=task_status)

    # ---- one client ------------------------------------------------------------------
    async def serve_stream(self, stream: Any) -> None:
        if isinstance(stream, trio.SocketStream):
            stream = RawSocket(stream.socket)  # a request is a few microseconds: no extra trips
        with contextlib.suppress(OSError):  # a 1 MiB read's reply in one write, if allowed
            stream.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.counters["connections"] += 1
        self.active += 1
        try:
            reader = _Reader(stream)
            if await self._negotiate(stream, reader):
                await self._transmission(stream, reader)
        except ProtocolError as exc:
            self.counters["protocol_violations"] += 1
            log.warning("nbd client dropped", extra={"kv": {"reason": str(exc)}})
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _negotiate(self, stream: trio.abc.Stream, reader: _Reader) -> bool:
        await stream.send_all(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                          FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", await reader.exactly(4))
        if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, option, length = OPTION.unpack(await reader.exactly(OPTION.size))
            if magic != IHAVEOPT:
                raise ProtocolError("bad option magic")
            if length > MAX_OPTION:
                raise ProtocolError(f"option of {length} bytes")
            data = await reader.exactly(length)
            if option == OPT_EXPORT_NAME:
                if data.decode(errors="replace") != self.export_name:
                    raise ProtocolError("unknown export")  # no way to reply an error here
                await stream.send_all(struct.pack(">QH", self.device.size, self.transmission_flags())
                                      + (b"" if no_zeroes else bytes(124)))
                return True
            if option == OPT_ABORT:
                await self._reply(stream, option, REP_ACK)
                return False
            if option == OPT_LIST:
                if data:
                    await self._reply(stream, option, REP_ERR_INVALID)
                    continue
                name = self.export_name.encode()
                await self._reply(stream, option, REP_SERVER, struct.pack(">I", len(name)) + name)
                await self._reply(stream, option, REP_ACK)
                continue
            if option in (OPT_INFO, OPT_GO):
                if len(data) < 6:
                    await self._reply(stream, option, REP_ERR_INVALID)
                    continue
                (name_len,) = struct.unpack_from(">I", data)
                if 4 + name_len + 2 > len(data):
                    await self._reply(stream, option, REP_ERR_INVALID)
                    continue
                name = data[4:4 + name_len].decode(errors="replace")
                (count,) = struct.unpack_from(">H", data, 4 + name_len)
                if len(data) != 4 + name_len + 2 + 2 * count:
                    await self._reply(stream, option, REP_ERR_INVALID)
                    continue
                if name != self.export_name:
                    await self._reply(stream, option, REP_ERR_UNKNOWN)
                    continue
                await self._reply(stream, option, REP_INFO, struct.pack(
                    ">HQH", INFO_EXPORT, self.device.size, self.transmission_flags()))
                await self._reply(stream, option, REP_INFO, struct.pack(
                    ">HIII", INFO_BLOCK_SIZE, 512, 4096, MAX_REQUEST))
                wanted = struct.unpack_from(f">{count}H", data, 4 + name_len + 2)
                if INFO_NAME in wanted:
                    await self._reply(stream, option, REP_INFO,
                                      struct.pack(">H", INFO_NAME) + self.export_name.encode())
                if INFO_DESCRIPTION in wanted and self.description:
                    await self._reply(stream, option, REP_INFO,
                                      struct.pack(">H", INFO_DESCRIPTION) + self.description.encode())
                await self._reply(stream, option, REP_ACK)
                if option == OPT_GO:
                    return True
                continue
            await self._reply(stream, option, REP_ERR_UNSUP)

    @staticmethod
    async def _reply(stream: trio.abc.Stream, option: int, kind: int, data: bytes = b"") -> None:
        await stream.send_all(OPTION_REPLY.pack(REPLY_MAGIC, option, kind, len(data)) + data)

    async def _transmission(self, stream: RawSocket, reader: _Reader) -> None:
        """Requests are read, parsed and, the common ones, started on the device in C (see
        fastpath.py); the rest run here as tasks, up to MAX_IN_FLIGHT at once. Every reply
        goes out through the C connection, so replies never interleave."""
        device = self.device
        fast = getattr(device, "fastpath", None)
        conn = NbdConnection(fast, stream.raw.fileno(), bytes(reader.buffer))
        reader.buffer.clear()
        writer = _Writer(conn, stream.raw)
        hooks = getattr(device, "after_responses", None)
        if hooks is not None:  # fast replies the socket did not take wait for the writer
            hooks.add(writer.poke)
        self._open.add(conn)
        slots = trio.Semaphore(MAX_IN_FLIGHT)
        violation = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                while not conn.broken:
                    result = conn.pump(64)
                    if fast is not None and fast.notify_mask:
                        device.kick(fast.notify_mask)
                    if result == NbdConnection.WAIT:
                        await trio.lowlevel.wait_readable(stream.raw)
                    elif result == NbdConnection.ROOM:
                        await device.wait_room()
                    elif result in (NbdConnection.FULL, NbdConnection.BUDGET):
                        await writer.until_drained() if result == NbdConnection.FULL \
                            else trio.lowlevel.checkpoint()
                    elif result == NbdConnection.HANDBACK:
                        request = conn.handed_back()
                        await slots.acquire()
                        nursery.start_soon(self._command, writer, slots, request)
                    else:
                        if result == NbdConnection.BAD_MAGIC:
                            violation = "bad request magic"
                        elif result == NbdConnection.TOO_BIG:
                            violation = "write too large"  # its data cannot be skipped
                        break  # EOF or DISC: what is in flight finishes first
                while not conn.broken and (slots.value < MAX_IN_FLIGHT or conn.outstanding
                                           or conn.queued_bytes):
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
        finally:
            if hooks is not None:
                hooks.discard(writer.poke)
            self._open.discard(conn)
            self._closed.update(conn.counters())
            conn.close()
        if violation:
            raise ProtocolError(violation)

    async def _command(self, writer: _Writer, slots: trio.Semaphore, request: NbdRequest) -> None:
        try:
            error, payload = await self._execute(request.kind, request.flags, request.offset,
                                                 request.length, request.data)
            if error:
                self.counters["errors"] += 1
            writer.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error) + request.cookie + payload)
        finally:
            slots.release()

    async def _execute(self, kind: int, flags: int, offset: int, length: int,
                       data: bytes) -> tuple[int, bytes]:
        names = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush", CMD_TRIM: "trim",
                 CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write_zeroes"}
        if kind not in names:
            self.requests["unknown"] += 1
            return EINVAL, b""
        self.requests[names[kind]] += 1
        device = self.device
        if kind == CMD_FLUSH:
            await device.flush()
            return 0, b""
        if length > MAX_REQUEST or offset + length > device.size:
            return EINVAL, b""
        if kind == CMD_CACHE:
            return 0, b""
        if offset % 512 or length % 512:
            return EINVAL, b""  # we advertise a 512-byte minimum block size
        try:
            if kind == CMD_READ:
                payload = await device.read(offset, length) if length else b""
                self.counters["bytes_read"] += length
                return 0, payload
            if device.read_only:
                return EPERM, b""
            if kind == CMD_WRITE:
                await device.write(offset, data)
                self.counters["bytes_written"] += length
            elif kind == CMD_TRIM:
                if length:
                    await device.discard(offset, length)
            elif kind == CMD_WRITE_ZEROES:
                if flags & CMD_FLAG_NO_HOLE or not length:
                    for start in range(offset, offset + length, 1 << 20):
                        await device.write(start, bytes(min(1 << 20, offset + length - start)))
                else:
                    await device.discard(offset, length)  # our discard reads back as zeroes
            if flags & CMD_FLAG_FUA:
                await device.flush()
            return 0, b""
        except OSError as exc:
            log.warning("nbd request failed", extra={"kv": {"kind": names[kind], "error": exc}})
            return EIO, b""


class _Writer:
    """Sends what the socket did not take at once, when it becomes writable."""

    def __init__(self, conn: NbdConnection, sock: Any) -> None:
        self.conn, self.sock = conn, sock
        self.wake = trio.Event()
        self.drained = trio.Event()

    def send(self, reply: bytes) -> None:
        if self.conn.queue_reply(reply):
            self.wake.set()

    def poke(self) -> None:
        if self.conn.queued_bytes:
            self.wake.set()

    async def until_drained(self) -> None:
        self.wake.set()
        await self.drained.wait()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            while (result := self.conn.flush()) == 1:
                await trio.lowlevel.wait_writable(self.sock)
            self.drained.set()
            self.drained = trio.Event()
            if result < 0:
                return  # the client went away; replies are dropped
