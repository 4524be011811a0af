"""The backing store of a virtual block device: a raw file or a block device.

I/O is done in batches: the datapath hands a whole ring's worth of requests to
:meth:`Vbd.submit`, which runs them in one worker-thread hop (vectored ``preadv``/``pwritev``
straight into the granted pages), so the event loop never blocks on a disk and pays one
thread switch per batch, not per request.
"""
from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ringfence.hypervisor._lib import lib

SECTOR = 512
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B


class IoKind(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3


@dataclass(slots=True)
class IoRequest:
    """One validated operation; ``buffers`` are the granted pages' slices, in order."""
    kind: IoKind
    offset: int = 0
    length: int = 0
    buffers: Sequence[memoryview] = ()
    fua: bool = False
    error: int = 0  # filled in: 0 or an errno


@dataclass(frozen=True, slots=True)
class VbdStatistics:
    path: str
    size_bytes: int
    read_only: bool
    reads: int
    writes: int
    flushes: int
    discards: int
    bytes_read: int
    bytes_written: int
    io_errors: int
    batches: int


RAW_PREFIXES = ("raw:", "aio:", "file:", "phy:")  # what xl/libxl put before a raw target


def backing_path(params: str) -> str:
    """The file or device a backend's ``params`` names: ours write the path, libxl writes
    ``FORMAT:PATH`` for qdisk-style disks. Only raw images are served."""
    for prefix in RAW_PREFIXES:
        if params.startswith(prefix):
            return params[len(prefix):]
    head, sep, _ = params.partition(":")
    if sep and not head.startswith("/") and head.isalnum():
        raise OSError(errno.EOPNOTSUPP, f"disk format {head!r} is not served (raw images only)")
    return params


class Vbd:
    def __init__(self, path: str, *, read_only: bool = False, inline_limit: int = 256 << 10) -> None:
        self.path = path
        self.read_only = read_only
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if self.is_block_device:
                self.size = _ioctl_u64(self.fd, BLKGETSIZE64)
                self.sector_size = _ioctl_u32(self.fd, BLKSSZGET)
                self.physical_sector_size = _ioctl_u32(self.fd, BLKPBSZGET)
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self.sector_size = SECTOR
                self.physical_sector_size = max(SECTOR, st.st_blksize or SECTOR)
            else:
                raise OSError(errno.EINVAL, f"{path}: not a file or block device")
        except BaseException:
            os.close(self.fd)
            raise
        self.sectors = self.size // SECTOR
        self.discard_supported = not read_only
        self.inline_limit = inline_limit
        self._counts = {k: 0 for k in ("reads", "writes", "flushes", "discards", "bytes_read",
                                       "bytes_written", "io_errors", "batches")}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def submit(self, requests: Sequence[IoRequest]) -> None:
        """Run a batch; each request's ``error`` says how it went.

        A block device, or a large batch, goes to a worker thread so the event loop never
        waits on a disk. A small batch on a regular file runs inline: it is served from the
        page cache in microseconds, less than the thread hand-off itself costs.
        """
        if not requests:
            return
        if self.inline_limit and not self.is_block_device and all(
                r.kind in (IoKind.READ, IoKind.WRITE) for r in requests) and sum(
                r.length for r in requests) <= self.inline_limit:
            self.run_batch(requests)
            await trio.lowlevel.checkpoint()
            return
        await trio.to_thread.run_sync(self.run_batch, requests)

    def run_batch(self, requests: Sequence[IoRequest]) -> None:
        self._counts["batches"] += 1
        for request in requests:
            try:
                self._run(request)
            except OSError as exc:
                request.error = exc.errno or errno.EIO
                self._counts["io_errors"] += 1

    def _run(self, request: IoRequest) -> None:
        kind = request.kind
        if kind in (IoKind.WRITE, IoKind.DISCARD) and self.read_only:
            raise OSError(errno.EROFS, "read-only")
        if kind == IoKind.READ:
            done = os.preadv(self.fd, request.buffers, request.offset)
            if done < request.length:
                # past the end of a file that shrank under us: the rest reads as zeroes
                _zero_tail(request.buffers, done)
            self._counts["reads"] += 1
            self._counts["bytes_read"] += request.length
        elif kind == IoKind.WRITE:
            written = 0
            buffers = list(request.buffers)
            while buffers:
                n = os.pwritev(self.fd, buffers, request.offset + written)
                written += n
                buffers = _advance(buffers, n)
            if request.fua:
                os.fdatasync(self.fd)
            self._counts["writes"] += 1
            self._counts["bytes_written"] += written
        elif kind == IoKind.FLUSH:
            os.fdatasync(self.fd)
            self._counts["flushes"] += 1
        elif kind == IoKind.DISCARD:
            self._discard(request.offset, request.length)
            self._counts["discards"] += 1

    def _discard(self, offset: int, length: int) -> None:
        if self.is_block_device:
            BLKDISCARD = 0x1277
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            return
        # Punch a hole: the range reads back as zeroes and stops using space.
        status = lib.rf_punch_hole(self.fd, offset, length)
        if status < 0:
            raise OSError(-status, os.strerror(-status))

    def statistics(self) -> VbdStatistics:
        c = self._counts
        return VbdStatistics(self.path, self.size, self.read_only, c["reads"], c["writes"],
                             c["flushes"], c["discards"], c["bytes_read"], c["bytes_written"],
                             c["io_errors"], c["batches"])


def _ioctl_u64(fd: int, request: int) -> int:
    return int(struct.unpack("Q", fcntl.ioctl(fd, request, b"\0" * 8))[0])


def _ioctl_u32(fd: int, request: int) -> int:
    return int(struct.unpack("I", fcntl.ioctl(fd, request, b"\0" * 4))[0])


def _advance(buffers: list[memoryview], n: int) -> list[memoryview]:
    while buffers and n >= len(buffers[0]):
        n -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and n:
        buffers[0] = buffers[0][n:]
    return buffers


def _zero_tail(buffers: Sequence[memoryview], done: int) -> None:
    for buf in buffers:
        if done >= len(buf):
            done -= len(buf)
            continue
        buf[done:] = bytes(len(buf) - done)
        done = 0
