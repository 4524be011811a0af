"""The XenStore ring page as guests use it (``struct xenstore_domain_interface``, 2076 bytes):
a 1 KiB request ring, a 1 KiB response ring and the words of ``docs/misc/xenstore-ring.txt``
for reconnection (``connection``) and errors (``error``). Sans-IO: the byte copies and index
checks are the C core's (``hypervisor/csrc/xsring.c``); waiting and notifying are the
caller's.

    ring = XsRing(page, guest=True)
    sent, wake = ring.put(message)  # bytes that fitted; notify the other end if wake
    data, wake = ring.get()         # bytes that were waiting; notify the other end if wake

``wake`` is Linux's rule: a consumer is notified only if it had taken everything before, a
producer only if it had filled the ring (``xsring.c`` says why nothing is lost).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ringfence.hypervisor._lib import ffi, lib

RING_SIZE = 1024
INTERFACE_SIZE = 2076
GNTTAB_RESERVED_XENSTORE = 1  # the grant reference a guest's builder reserves for this page

FEATURE_RECONNECTION = 1
FEATURE_ERROR = 2
SERVER_FEATURES = FEATURE_RECONNECTION | FEATURE_ERROR


class Connection(enum.IntEnum):
    CONNECTED = 0
    RECONNECT = 1  # written by the guest: reset the connection


class RingError(enum.IntEnum):
    NONE = 0
    COMM = 1      # communication lost (our daemon restarted): the guest must reconnect
    RINGIDX = 2   # impossible indices
    PROTO = 3     # a message over the payload limit


class RingProtocolError(Exception):
    """The other end published indices no ring can hold."""


@dataclass(frozen=True, slots=True)
class XsRingStatistics:
    bytes_sent: int
    bytes_received: int
    error: int
    connection: int


def _word(name: str) -> property:
    return property(lambda self: int(getattr(self._intf, name)),
                    lambda self, value: setattr(self._intf, name, int(value)))


class XsRing:
    """One end of a XenStore ring page: the guest's (requests out, responses in) or the
    daemon's (the other way round)."""

    def __init__(self, buffer: Any, *, guest: bool) -> None:
        view = memoryview(buffer)
        if view.readonly or view.nbytes < INTERFACE_SIZE:
            raise ValueError(f"a XenStore ring needs {INTERFACE_SIZE} writable bytes")
        self._shared = ffi.from_buffer(view, require_writable=True)
        self._intf = ffi.cast("rf_xs_intf *", self._shared)
        self._out, self._in = (0, 1) if guest else (1, 0)
        self._scratch = ffi.new("uint8_t[]", RING_SIZE)
        self._wake = ffi.new("int *")
        self.bytes_sent = self.bytes_received = 0

    def put(self, data: bytes | bytearray | memoryview) -> tuple[int, bool]:
        """Append what fits of ``data``; returns how many bytes, and whether to notify."""
        n: int = lib.rf_xs_put(self._intf, self._out, ffi.from_buffer(data), len(data), self._wake)
        if n < 0:
            raise RingProtocolError("the other end's consumer index is out of range")
        self.bytes_sent += n
        return n, bool(self._wake[0])

    def get(self) -> tuple[bytes, bool]:
        """Take what is waiting (b"" if nothing), and whether to notify."""
        n: int = lib.rf_xs_get(self._intf, self._in, self._scratch, RING_SIZE, self._wake)
        if n < 0:
            raise RingProtocolError("the other end's producer index is out of range")
        self.bytes_received += n
        return ffi.buffer(self._scratch, n)[:], bool(self._wake[0])

    def readable(self) -> bool:
        return bool(lib.rf_xs_pending(self._intf, self._in))  # -EPROTO too: get() says so

    def writable(self) -> bool:
        return lib.rf_xs_pending(self._intf, self._out) != RING_SIZE

    def reset(self) -> None:
        """The daemon's side of a reconnection: empty both rings, clear the error."""
        i = self._intf
        i.req_cons = i.req_prod = i.rsp_cons = i.rsp_prod = 0
        i.error = RingError.NONE
        i.server_features = SERVER_FEATURES
        i.connection = Connection.CONNECTED

    # the shared words, each read (or written) once per use
    connection = _word("connection")
    error = _word("error")
    server_features = _word("server_features")

    def statistics(self) -> XsRingStatistics:
        return XsRingStatistics(self.bytes_sent, self.bytes_received, self.error, self.connection)

    def release(self) -> None:
        """Let go of the page (before it is unmapped); the ring is unusable afterwards."""
        self._intf = ffi.new("rf_xs_intf *")  # a harmless private dummy from now on
        ffi.release(self._shared)


__all__ = ["XsRing", "XsRingStatistics", "RingProtocolError", "Connection", "RingError",
           "RING_SIZE", "INTERFACE_SIZE", "GNTTAB_RESERVED_XENSTORE", "SERVER_FEATURES"]
