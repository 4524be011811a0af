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
import functools
import logging
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ringfence._rawsock import RawSocket
from ringfence._unixsock import listen_unix

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

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")


class BlockDevice(Protocol):
    size: int
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...


class StartingBlockDevice(BlockDevice, Protocol):
    """A device that can also start a small read or write without waiting (blkfront)."""

    def start(self, write: bool, offset: int, data_or_length: bytes | int,
              on_done: Callable[[int, bytes], None]) -> bool: ...


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
        self.requests: Counter[str] = Counter()
        self.active = 0

    def statistics(self) -> NbdStatistics:
        c = self.counters
        return NbdStatistics(self.active, c["connections"], dict(self.requests), c["bytes_read"],
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

    async def _transmission(self, stream: trio.abc.Stream, reader: _Reader) -> None:
        send_lock = _ReplyQueue(stream)
        slots = trio.Semaphore(MAX_IN_FLIGHT)
        violation = None
        start = getattr(self.device, "start", None)
        size = self.device.size
        started = 0
        hooks = getattr(self.device, "after_responses", None)
        if hooks is not None:  # replies of callback requests go out once a batch is done
            send_lock.deferred = True
            hooks.add(send_lock.flush_nowait)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_lock.run)
            # Errors end the loop, not the nursery, so that requests in flight finish and
            # nothing escapes as an exception group.
            while True:
                try:
                    magic, flags, kind, handle, offset, length = REQUEST.unpack(
                        await reader.exactly(REQUEST.size))
                    if magic != REQUEST_MAGIC:
                        violation = "bad request magic"
                        break
                    if kind == CMD_DISC:
                        break
                    data = b""
                    if kind == CMD_WRITE:
                        if length > MAX_REQUEST:
                            violation = f"write of {length} bytes"  # its data cannot be skipped
                            break
                        data = await reader.exactly(length)
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
                # The common request, started at once without a task of its own: a small
                # read or write, valid, and the device has room for it now.
                if (start is not None and kind <= CMD_WRITE and not flags & CMD_FLAG_FUA
                        and length and not (offset | length) % 512 and offset + length <= size
                        and (kind == CMD_READ or not self.device.read_only)
                        and start(kind == CMD_WRITE, offset, data or length,
                                  functools.partial(self._started_done, send_lock, kind, handle, length))):
                    self.requests["write" if kind else "read"] += 1
                    send_lock.outstanding += 1
                    started += 1
                    if started % 64 == 0:  # a client that never pauses leaves room to others
                        await trio.lowlevel.checkpoint()
                    continue
                await slots.acquire()
                nursery.start_soon(self._command, stream, send_lock, slots, kind, flags, handle,
                                   offset, length, data)
            await send_lock.drain(slots)
            nursery.cancel_scope.cancel()
        if hooks is not None:
            hooks.discard(send_lock.flush_nowait)
        if violation:
            raise ProtocolError(violation)

    async def _command(self, stream: trio.abc.Stream, replies: _ReplyQueue, slots: trio.Semaphore,
                       kind: int, flags: int, handle: int, offset: int, length: int, data: bytes) -> None:
        try:
            error, payload = await self._execute(kind, flags, offset, length, data)
            if error:
                self.counters["errors"] += 1
            replies.add(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + payload)
        finally:
            slots.release()

    def _started_done(self, replies: _ReplyQueue, kind: int, handle: int, length: int,
                      error: int, payload: bytes) -> None:
        replies.outstanding -= 1
        if error:
            self.counters["errors"] += 1
        else:
            self.counters["bytes_read" if kind == CMD_READ else "bytes_written"] += length
        replies.add(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + payload, replies.deferred)

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


class _ReplyQueue:
    """Replies of one connection, sent by one task in as few writes as possible."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.pending: list[bytes] = []
        self.ready = trio.Event()
        self.broken = False
        self.sending = False
        self.outstanding = 0  # requests started on the device, not answered yet
        self.send_nowait = getattr(stream, "send_nowait", None)
        self.deferred = False   # the device calls flush_nowait after each batch of completions
        self.held: list[bytes] = []

    def add(self, reply: bytes, deferred: bool = False) -> None:
        if deferred:
            self.held.append(reply)
            return
        self._send_or_queue(reply)

    def flush_nowait(self) -> None:
        """Send what a batch of completions replied, in one write if the socket takes it."""
        if self.held:
            held, self.held = self.held, []
            self._send_or_queue(held[0] if len(held) == 1 else b"".join(held))

    def _send_or_queue(self, reply: bytes) -> None:
        if not self.pending and not self.sending and self.send_nowait is not None and not self.broken:
            # Straight out if the socket takes it: no trip through the writer task.
            try:
                sent = self.send_nowait(reply)
            except OSError:
                self.broken = True
                return
            if sent == len(reply):
                return
            reply = reply[sent:]
        self.pending.append(reply)
        self.ready.set()

    async def run(self) -> None:
        try:
            while True:
                await self.ready.wait()
                self.ready = trio.Event()
                await trio.lowlevel.checkpoint()  # let replies completing together join
                batch, self.pending = self.pending, []
                if batch:
                    self.sending = True
                    await self.stream.send_all(b"".join(batch))
                    self.sending = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True  # the client went away; replies are dropped

    async def drain(self, slots: trio.Semaphore) -> None:
        """Wait until every request has completed and its reply has gone out."""
        while not self.broken and (slots.value < MAX_IN_FLIGHT or self.pending or self.outstanding
                                   or self.held):
            await trio.sleep(0.001)
