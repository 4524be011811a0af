"""XenStore's wire protocol (Xen's io/xs_wire.h), sans-IO.

A message is a 16-byte header (type, req_id, tx_id, len; little-endian uint32) and up to
4096 bytes of payload. :class:`MessageReader` turns a byte stream into messages and refuses
oversized ones; :func:`encode` builds them.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048
RING_SIZE = 1024
# struct xenstore_domain_interface: req[1024] rsp[1024] req_cons req_prod rsp_cons rsp_prod
# server_features connection error
INTERFACE_SIZE = 2076
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 2048, 2052, 2056, 2060
SERVER_FEATURES, CONNECTION, ERROR = 2064, 2068, 2072
SERVER_FEATURE_RECONNECTION = 1
SERVER_FEATURE_ERROR = 2
CONNECTED, RECONNECT = 0, 1
ERROR_NONE, ERROR_COMM, ERROR_RINGIDX, ERROR_PROTO = 0, 1, 2, 3


class Op(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    # Added after 4.17's header (same numbers as later Xen releases); 4.17's tools reach
    # quotas through XS_CONTROL "quota", which is served too.
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26


# The error names of xs_wire.h's xsd_errors[], in order.
ERRORS = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
          "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")


class XenStoreError(Exception):
    """An error reply: ``name`` is one of ERRORS (e.g. "ENOENT")."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}{': ' + detail if detail else ''}")
        self.name = name


class ProtocolViolation(ValueError):
    """The peer broke the framing (oversized payload...): the connection must be dropped."""


class Message(NamedTuple):
    # A tuple: made for every request the daemon reads, so it must be cheap to build.
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def args(self) -> list[bytes]:
        """The NUL-separated arguments (a trailing NUL ends the last one)."""
        parts = self.payload.split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()
        return parts


def encode(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def join(*args: bytes | str) -> bytes:
    """Arguments each ending in NUL, as requests carry them."""
    return b"".join((a.encode() if isinstance(a, str) else a) + b"\0" for a in args)


def write_payload(path: str, value: bytes | str) -> bytes:
    """A WRITE's payload: the path, its NUL, then the value (NULs and all, no NUL after)."""
    return path.encode() + b"\0" + (value.encode() if isinstance(value, str) else value)


def strings(payload: bytes) -> list[str]:
    """The NUL-ended strings of a reply: a DIRECTORY's names, a GET_PERMS's entries."""
    return [part.decode(errors="replace") for part in payload.split(b"\0") if part]


def error_payload(name: str) -> bytes:
    return name.encode() + b"\0"


class MessageReader:
    """Incremental framing: feed bytes, take complete messages."""

    def __init__(self, max_payload: int = PAYLOAD_MAX) -> None:
        self._buffer = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> list[Message]:
        if not self._buffer:
            return self._whole(data)
        self._buffer += data
        out = []
        while len(self._buffer) >= HEADER.size:
            type_, req_id, tx_id, length = HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise ProtocolViolation(f"payload length {length} exceeds {self._max}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            out.append(Message(type_, req_id, tx_id, bytes(self._buffer[HEADER.size:end])))
            del self._buffer[:end]
        return out

    def _whole(self, data: bytes) -> list[Message]:
        """The common case, nothing left over from before: messages sliced from ``data``
        itself, only a partial one at its end kept."""
        if not isinstance(data, bytes):
            data = bytes(data)  # payloads are keys (watch tokens): immutable
        out = []
        offset, size, total = 0, HEADER.size, len(data)
        while total - offset >= size:
            type_, req_id, tx_id, length = HEADER.unpack_from(data, offset)
            if length > self._max:
                raise ProtocolViolation(f"payload length {length} exceeds {self._max}")
            end = offset + size + length
            if end > total:
                break
            out.append(Message(type_, req_id, tx_id, data[offset + size:end]))
            offset = end
        if offset < total:
            self._buffer += data[offset:]
        return out

    @property
    def pending(self) -> int:
        return len(self._buffer)
