"""XenStore client over trio: pipelined requests, transactions with retry, watches.

Works against our daemon and Xen's own (C or OCaml xenstored), on a Unix socket (dom0) or on
any stream (a sim domain's connection from the hypervisor).

    async with open_xenstore("/run/xenstored/socket") as xs:
        await xs.write("/vm/name", b"demo")
        async with xs.watch("/vm") as events:
            async for path, token in events: ...
        async for tx in xs.transaction():      # retried on EAGAIN
            async with tx:
                value = await tx.read("/vm/name")
"""
from __future__ import annotations

import contextlib
import itertools
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ringfence._rawsock import RawSocket
from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.xs_wire import Op, XenStoreError

MAX_RETRIES = 100
# After a conflict, a transaction waits a random while that doubles with each try (capped),
# so that contending clients spread out instead of colliding again in lockstep.
RETRY_PAUSE_FIRST = 0.0002
RETRY_PAUSE_MAX = 0.02


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    requests: int
    errors: int
    in_flight: int
    watch_events: int
    transaction_retries: int


class XenStore:
    """A connection to xenstored. With ``reconnect`` (a callable returning a fresh stream)
    it survives a daemon restart: it reconnects, registers its watches again (each fires
    once, as on registration) and resends the requests that had no reply; requests inside a
    transaction then get EAGAIN and ``transaction()`` retries."""

    def __init__(self, stream: trio.abc.Stream,
                 reconnect: Callable[[], Awaitable[trio.abc.Stream]] | None = None) -> None:
        self._stream = _direct(stream)
        self._reconnect = reconnect
        self._sent: dict[int, bytes] = {}
        self._watch_paths: dict[bytes, str] = {}
        self.reconnects = 0
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[_Replies, int]] = {}  # req_id -> (its batch, index)
        self._watches: dict[bytes, trio.MemorySendChannel[tuple[str, bytes]]] = {}
        self._skip_initial: set[bytes] = set()  # tokens whose initial event is not delivered (watch_and)
        self._relevant: dict[bytes, Callable[[str], bool]] = {}  # tokens whose events are sifted here
        self._tokens = itertools.count(1)
        self._closed = False
        self._outbox: list[bytes] = []
        self._flushing = False
        self.requests = self.errors = self.watch_events = self.retries = 0

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._read_until_closed()
                if self._reconnect is None or not await self._redial():
                    break
        finally:
            self._closed = True
            for replies, _ in list(self._pending.values()):
                replies.lose()
            for channel in self._watches.values():
                channel.close()

    async def _redial(self) -> bool:
        """The daemon went away: connect again, re-register watches, resend what is unanswered."""
        assert self._reconnect is not None
        delay = 0.01
        stream = None
        with trio.move_on_after(120):
            while stream is None:
                try:
                    stream = await self._reconnect()
                except OSError:
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        if stream is None:
            return False
        await trio.aclose_forcefully(self._stream)
        self._stream = _direct(stream)
        self.reconnects += 1
        blob = b"".join(W.encode(Op.WATCH, 0xFFFFFFFF, 0, W.join(path, token))
                        for token, path in self._watch_paths.items())
        blob += b"".join(self._sent[rid] for rid in sorted(self._sent))
        try:
            async with self._send_lock:
                await self._stream.send_all(blob)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # gone again: the next read notices
        return True

    async def _read_until_closed(self) -> None:
        reader = W.MessageReader()
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    return
                for msg in reader.feed(data):
                    if msg.type == Op.WATCH_EVENT:
                        args = msg.args()
                        if len(args) >= 2:
                            channel = self._watches.get(args[1])
                            if args[1] in self._skip_initial:
                                self._skip_initial.discard(args[1])
                            elif channel is not None:
                                self.watch_events += 1
                                path = args[0].decode()
                                relevant = self._relevant.get(args[1])
                                if relevant is None or relevant(path):
                                    with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                                        channel.send_nowait((path, args[1]))
                        continue
                    entry = self._pending.pop(msg.req_id, None)
                    self._sent.pop(msg.req_id, None)
                    if entry is not None:
                        entry[0].deliver(entry[1], msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, W.ProtocolViolation):
            return

    async def _flush(self) -> None:
        """Send the outbox: requests made by other tasks in the same scheduling round go in
        the same write (one syscall and one daemon wake-up for a pipelined batch)."""
        self._flushing = True
        try:
            with trio.CancelScope(shield=True):  # others' requests ride on this write
                await trio.lowlevel.checkpoint()
                while self._outbox:
                    blob = b"".join(self._outbox)
                    self._outbox.clear()
                    async with self._send_lock:
                        await self._stream.send_all(blob)
        finally:
            self._flushing = False

    async def _exchange(self, requests: list[tuple[int, bytes, int]]) -> list[W.Message]:
        """Send requests together (one write) and wait for all their replies. Many batches
        may be in flight at once (replies are matched by req_id); a batch costs one wake-up
        of its task, whatever its size."""
        if self._closed:
            raise XenStoreError("EIO", "connection closed")
        replies = _Replies(len(requests))
        ids = []
        for index, (op, payload, tx_id) in enumerate(requests):
            req_id = next(self._ids) & 0xFFFFFFFF
            data = W.encode(op, req_id, tx_id, payload)
            self._pending[req_id] = (replies, index)
            self._sent[req_id] = data
            self._outbox.append(data)
            ids.append(req_id)
        self.requests += len(requests)
        try:
            if not self._flushing:
                try:
                    await self._flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    if self._reconnect is None:
                        raise XenStoreError("EIO", "connection closed") from None
                    # resent after the reconnection
            await replies.wait()
        finally:
            for req_id in ids:  # answered, or abandoned (cancelled): never resent
                self._pending.pop(req_id, None)
                self._sent.pop(req_id, None)
        if replies.lost:
            raise XenStoreError("EIO", "connection closed")
        return replies.messages

    async def _post(self, op: int, payload: bytes) -> None:
        """Send a request whose reply nobody waits for (the reader drops it)."""
        if self._closed:
            return
        self._outbox.append(W.encode(op, next(self._ids) & 0xFFFFFFFF, 0, payload))
        self.requests += 1
        if not self._flushing:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._flush()

    def _payload(self, reply: W.Message) -> bytes:
        if reply.type == Op.ERROR:
            self.errors += 1
            raise XenStoreError(reply.payload.rstrip(b"\0").decode() or "EINVAL")
        return reply.payload

    async def request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """One request; many may be in flight at once (replies are matched by req_id)."""
        (reply,) = await self._exchange([(op, payload, tx_id)])
        return self._payload(reply)

    async def pipeline(self, requests: list[tuple[int, bytes, int]]) -> list[bytes | XenStoreError]:
        """Several requests ``(op, payload, tx_id)`` in one write, one round trip: each
        reply's payload, or its error (returned, not raised)."""
        if not requests:
            return []  # nothing to wait for
        results: list[bytes | XenStoreError] = []
        for reply in await self._exchange(requests):
            try:
                results.append(self._payload(reply))
            except XenStoreError as exc:
                results.append(exc)
        return results

    async def _pipeline_all(self, requests: list[tuple[int, bytes, int]]) -> list[bytes]:
        """:meth:`pipeline`, raising the first error."""
        results = await self.pipeline(requests)
        for result in results:
            if isinstance(result, XenStoreError):
                raise result
        return results  # type: ignore[return-value]

    # ---- operations ------------------------------------------------------------------
    async def read(self, path: str, tx_id: int = 0) -> bytes:
        return await self.request(Op.READ, W.join(path), tx_id)

    async def read_many(self, paths: list[str], tx_id: int = 0) -> list[bytes | None]:
        """Several reads in one round trip; None where a node is missing."""
        return present(await self.pipeline([(Op.READ, W.join(path), tx_id) for path in paths]))

    async def write_many(self, items: list[tuple[str, bytes | str]], tx_id: int = 0) -> None:
        """Several writes in one round trip."""
        await self._pipeline_all([(Op.WRITE, W.write_payload(path, value), tx_id)
                                  for path, value in items])

    async def set_perms_many(self, items: list[tuple[str, list[str]]], tx_id: int = 0) -> None:
        """Several permission changes in one round trip."""
        await self._pipeline_all([(Op.SET_PERMS, W.join(path, *perms), tx_id) for path, perms in items])

    async def directory_many(self, paths: list[str], tx_id: int = 0) -> list[list[str]]:
        """Several listings in one round trip."""
        return [W.strings(payload) for payload in
                await self._pipeline_all([(Op.DIRECTORY, W.join(path), tx_id) for path in paths])]

    async def write(self, path: str, value: bytes | str, tx_id: int = 0) -> None:
        await self.request(Op.WRITE, W.write_payload(path, value), tx_id)

    async def mkdir(self, path: str, tx_id: int = 0) -> None:
        await self.request(Op.MKDIR, W.join(path), tx_id)

    async def rm(self, path: str, tx_id: int = 0) -> None:
        await self.request(Op.RM, W.join(path), tx_id)

    async def directory(self, path: str, tx_id: int = 0) -> list[str]:
        return W.strings(await self.request(Op.DIRECTORY, W.join(path), tx_id))

    async def get_perms(self, path: str, tx_id: int = 0) -> list[str]:
        return W.strings(await self.request(Op.GET_PERMS, W.join(path), tx_id))

    async def set_perms(self, path: str, perms: list[str], tx_id: int = 0) -> None:
        await self.request(Op.SET_PERMS, W.join(path, *perms), tx_id)

    async def exists(self, path: str, tx_id: int = 0) -> bool:
        try:
            await self.read(path, tx_id)
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return False
            raise
        return True

    async def get_domain_path(self, domid: int) -> str:
        return (await self.request(Op.GET_DOMAIN_PATH, W.join(str(domid)))).rstrip(b"\0").decode()

    async def introduce(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        await self.request(Op.INTRODUCE, W.join(str(domid), str(mfn), str(port)))

    async def release(self, domid: int) -> None:
        await self.request(Op.RELEASE, W.join(str(domid)))

    async def control(self, *args: str) -> bytes:
        """XS_CONTROL (as ``xenstore-control``): dom0 only."""
        return await self.request(Op.CONTROL, W.join(*args))

    # ---- transactions ----------------------------------------------------------------
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Yield transactions until one commits: ``async for tx in xs.transaction():
        async with tx: ...``. A conflict (EAGAIN) starts the next attempt, after a random
        pause of up to 0.2 ms that doubles with each conflict (up to 20 ms)."""
        for attempt in range(MAX_RETRIES):
            if attempt:
                pause = min(RETRY_PAUSE_MAX, RETRY_PAUSE_FIRST * 2 ** (attempt - 1))
                await trio.sleep(random.uniform(0, pause))
            tx_id = int((await self.request(Op.TRANSACTION_START, b"\0")).rstrip(b"\0"))
            tx = Transaction(self, tx_id)
            yield tx
            if tx.committed:
                return
            if not tx.conflicted:
                return  # aborted by the body: no retry
            self.retries += 1
        raise XenStoreError("EAGAIN", f"no commit after {MAX_RETRIES} attempts")

    # ---- watches ---------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def watch(self, path: str, token: str | None = None, *,
                    relevant: Callable[[str], bool] | None = None) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[str, bytes]]]:
        """Watch ``path`` and its children; yields (path, token) events, starting with the
        initial one every watch gets. With ``relevant``, only the events at paths it accepts
        (the initial one must be): a watch of a whole subtree, most of whose events are
        its own domain's writes below what it looks for, costs no task switch for those."""
        async with self._watching(path, token, [], relevant) as (events, _):
            yield events

    @contextlib.asynccontextmanager
    async def watch_and(self, path: str, requests: list[tuple[int, bytes, int]], token: str | None = None, *,
                        relevant: Callable[[str], bool] | None = None
                        ) -> AsyncIterator[tuple[trio.MemoryReceiveChannel[tuple[str, bytes]], list[bytes | XenStoreError]]]:
        """:meth:`watch`, with ``requests`` (as for :meth:`pipeline`) in the same write right
        after the registration; yields the events and those requests' results. The daemon
        handles them after the registration, so they are as new as the initial event, which
        is therefore not delivered: a watcher that reads what it watches reads it once, in
        the registration's round trip. ``relevant``: as for :meth:`watch`."""
        async with self._watching(path, token, requests, relevant) as watching:
            yield watching

    @contextlib.asynccontextmanager
    async def _watching(self, path: str, token: str | None, requests: list[tuple[int, bytes, int]],
                        relevant: Callable[[str], bool] | None = None
                        ) -> AsyncIterator[tuple[trio.MemoryReceiveChannel[tuple[str, bytes]], list[bytes | XenStoreError]]]:
        raw_token = (token or f"rf-{next(self._tokens)}").encode()
        send, receive = trio.open_memory_channel[tuple[str, bytes]](4096)
        self._watches[raw_token] = send
        if relevant is not None:
            self._relevant[raw_token] = relevant
        if requests:
            self._skip_initial.add(raw_token)
        try:
            registered, *results = await self.pipeline([(Op.WATCH, W.join(path, raw_token), 0), *requests])
            if isinstance(registered, XenStoreError):
                raise registered
            self._watch_paths[raw_token] = path
            yield receive, results
        finally:
            self._watches.pop(raw_token, None)
            self._watch_paths.pop(raw_token, None)
            self._relevant.pop(raw_token, None)
            self._skip_initial.discard(raw_token)
            with trio.CancelScope(shield=True):
                # Not waited for: its events are dropped from now on, and whoever leaves a
                # watch to go on (a frontend reconnecting) should not wait a round trip.
                await self._post(Op.UNWATCH, W.join(path, raw_token))

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(self.requests, self.errors, len(self._pending),
                                self.watch_events, self.retries)


class Transaction:
    """Reads and writes inside one XenStore transaction; commits when the block ends."""

    def __init__(self, xs: XenStore, tx_id: int) -> None:
        self.xs, self.id = xs, tx_id
        self.committed = self.conflicted = False

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> bool:
        commit = exc_type is None
        try:
            await self.xs.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", self.id)
        except XenStoreError as error:
            if error.name == "EAGAIN" and commit:
                self.conflicted = True
                return False
            if commit:
                raise
        self.committed = commit
        return False

    async def read(self, path: str) -> bytes:
        return await self.xs.read(path, self.id)

    async def write(self, path: str, value: bytes | str) -> None:
        await self.xs.write(path, value, self.id)

    async def read_many(self, paths: list[str]) -> list[bytes | None]:
        return await self.xs.read_many(paths, self.id)

    async def write_many(self, items: list[tuple[str, bytes | str]]) -> None:
        await self.xs.write_many(items, self.id)

    async def set_perms_many(self, items: list[tuple[str, list[str]]]) -> None:
        await self.xs.set_perms_many(items, self.id)

    async def directory_many(self, paths: list[str]) -> list[list[str]]:
        return await self.xs.directory_many(paths, self.id)

    async def mkdir(self, path: str) -> None:
        await self.xs.mkdir(path, self.id)

    async def rm(self, path: str) -> None:
        await self.xs.rm(path, self.id)

    async def directory(self, path: str) -> list[str]:
        return await self.xs.directory(path, self.id)

    async def exists(self, path: str) -> bool:
        return await self.xs.exists(path, self.id)


def _direct(stream: Any) -> Any:
    """A socket stream driven directly (the system call first, the scheduler only when it
    would block): most of a small request's cost otherwise."""
    return RawSocket(stream.socket) if isinstance(stream, trio.SocketStream) else stream


def present(results: list[bytes | XenStoreError]) -> list[bytes | None]:
    """:meth:`XenStore.pipeline`'s results with a missing node (ENOENT) as None; any other
    error is raised."""
    for result in results:
        if isinstance(result, XenStoreError) and result.name != "ENOENT":
            raise result
    return [None if isinstance(result, XenStoreError) else result for result in results]


class _Replies:
    """The replies to one batch of requests, and the task waiting for them."""
    __slots__ = ("messages", "remaining", "task", "lost")

    def __init__(self, count: int) -> None:
        self.messages: list[Any] = [None] * count
        self.remaining = count
        self.task: Any = None
        self.lost = False

    def deliver(self, index: int, message: W.Message) -> None:
        self.messages[index] = message
        self.remaining -= 1
        if not self.remaining:
            self._wake()

    def lose(self) -> None:
        """The connection is gone for good."""
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if not self.remaining or self.lost:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


async def gather(calls: list[Any]) -> list[Any]:
    """Await coroutines concurrently (their requests pipelined); results in order. The
    first failure is raised as itself, not wrapped in an exception group."""
    results: list[Any] = [None] * len(calls)
    errors: list[Exception] = []

    async def run(i: int, call: Any) -> None:
        try:
            results[i] = await call
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(run, i, call)
    if errors:
        raise errors[0]
    return results


@contextlib.asynccontextmanager
async def open_xenstore_stream(stream: trio.abc.Stream,
                               reconnect: Callable[[], Awaitable[trio.abc.Stream]] | None = None) -> AsyncIterator[XenStore]:
    xs = XenStore(stream, reconnect)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(xs._run)
            try:
                yield xs
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # Shielded: a Cancelled from closing inside a cancelled scope would replace the
        # exception the caller's block raised, and the cancelled scope would swallow both.
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(xs._stream)  # a redialled stream replaced ours


async def dial_unix(path: str) -> trio.SocketStream:
    """A stream to a daemon's Unix socket (xenstored, ours or Xen's)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError:
        sock.close()
        raise
    return trio.SocketStream(sock)


@contextlib.asynccontextmanager
async def open_xenstore(path: str, *, reconnect: bool = False) -> AsyncIterator[XenStore]:
    """Connect to a xenstored Unix socket (ours or Xen's); with ``reconnect`` the connection
    survives a daemon restart (see :class:`XenStore`)."""
    stream = await dial_unix(path)
    async with open_xenstore_stream(stream, (lambda: dial_unix(path)) if reconnect else None) as xs:
        yield xs
