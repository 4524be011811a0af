"""A scriptable sim domain: a real domain process that a test drives line by line.

``python -m ringfence.testing.domain_agent`` (started with $RINGFENCE_DOMAIN_FD) reads one
JSON command per line on stdin and answers one JSON object per line on stdout. Tests use it
to play well-behaved and hostile domains against the real hypervisor: every grant, map and
copy goes through the same client code drivers use, and ``raw`` sends arbitrary bytes on the
control socket.
"""
from __future__ import annotations

import binascii
import errno
import json
import mmap
import os
import signal
import sys
from typing import Any

import trio

from ringfence.hypervisor.platform import GrantCopy
from ringfence.isolation.sandbox import drop_privileges_from_environment
from ringfence.hypervisor.sim import protocol as P
from ringfence.hypervisor.sim.client import (GrantError, HypervisorError, SimDomain, SimPageRange,
                                             SimMappedPages, SimPort, open_domain)


class Agent:
    def __init__(self, domain: SimDomain) -> None:
        self.domain = domain
        self.ranges: dict[int, SimPageRange] = {}
        self.maps: dict[int, SimMappedPages] = {}
        self.ports: dict[int, SimPort] = {}
        self.next_id = 1
        self.held = b""

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    async def run(self, command: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, "do_" + command.pop("cmd"))
        try:
            return {"ok": True, **(await handler(**command))}
        except GrantError as exc:
            return {"ok": False, "gntst": exc.status, "error": str(exc)}
        except (HypervisorError, OSError) as exc:
            return {"ok": False, "errno": exc.errno, "error": str(exc)}
        except (TypeError, ValueError, KeyError) as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    async def do_info(self) -> dict[str, Any]:
        return {"domid": self.domain.domid, "pid": os.getpid()}

    async def do_alloc(self, count: int) -> dict[str, Any]:
        pages = await self.domain.memory.alloc_pages(count)
        rid = self._id()
        self.ranges[rid] = pages
        return {"range": rid, "frames": list(pages.frames)}

    async def do_free(self, range: int) -> dict[str, Any]:
        await self.domain.memory.free_pages(self.ranges.pop(range))
        return {}

    async def do_grant(self, to: int, frame: int, readonly: bool = False) -> dict[str, Any]:
        return {"gref": self.domain.grant_table.grant_access(to, frame, readonly)}

    async def do_end(self, gref: int) -> dict[str, Any]:
        return {"ended": self.domain.grant_table.end_access(gref)}

    def _area(self, range: int | None, map: int | None) -> memoryview:
        if range is not None:
            return self.ranges[range].buffer
        if map is not None:
            return self.maps[map].buffer
        raise ValueError("need range or map")

    async def do_write(self, data: str, offset: int = 0, range: int | None = None,
                       map: int | None = None, ram: int | None = None) -> dict[str, Any]:
        raw = binascii.unhexlify(data)
        area = self.domain.memory.ram_page(ram) if ram is not None else self._area(range, map)
        area[offset:offset + len(raw)] = raw
        return {}

    async def do_read(self, length: int, offset: int = 0, range: int | None = None,
                      map: int | None = None, ram: int | None = None) -> dict[str, Any]:
        area = self.domain.memory.ram_page(ram) if ram is not None else self._area(range, map)
        return {"data": bytes(area[offset:offset + length]).hex()}

    async def do_map(self, domid: int, grefs: list[int], readonly: bool = False) -> dict[str, Any]:
        pages = await self.domain.grant_table.map(domid, grefs, readonly)
        mid = self._id()
        self.maps[mid] = pages
        return {"map": mid}

    async def do_unmap(self, map: int) -> dict[str, Any]:
        await self.domain.grant_table.unmap(self.maps.pop(map))
        return {}

    async def do_unmap_handles(self, map: int, repeat: int = 1) -> dict[str, Any]:
        """Ask the hypervisor to unmap a map's handles (each ``repeat`` times in one call)
        while this process keeps the pages mapped: a buggy or hostile domain's unmap."""
        handles = [h for h in self.maps[map].handles for _ in range(repeat)]
        _, body, _ = await self.domain.connection.call(
            P.Op.GNT_UNMAP, P.pack_items(P.COUNT, [(h,) for h in handles]))
        (count,) = P.COUNT.unpack_from(body)
        return {"statuses": [P.STATUS.unpack_from(body, 4 + i * P.STATUS.size)[0] for i in range(count)]}

    async def do_map_raw(self, domid: int, gref: int, readonly: bool) -> dict[str, Any]:
        """Map through the wire protocol and try to turn the fd into a writable mapping."""
        conn = self.domain.connection
        status, body, fds = await conn.call(
            P.Op.GNT_MAP, P.pack_items(P.MAP_ITEM, [(domid, int(readonly), gref)]))
        result: dict[str, Any] = {"fds": len(fds)}
        (count,) = P.COUNT.unpack_from(body)
        result["status"], result["handle"] = P.MAP_RESULT.unpack_from(body, 4)
        for fd in fds:
            try:
                area = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                area.close()
                result["writable_mmap"] = True
            except OSError:
                result["writable_mmap"] = False
            try:
                os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
                result["reopen_rw"] = True
            except OSError:
                result["reopen_rw"] = False
            os.close(fd)
        return result

    async def do_copy(self, segments: list[dict[str, Any]]) -> dict[str, Any]:
        buffers = []
        copies = []
        for seg in segments:
            local = bytearray(binascii.unhexlify(seg["data"])) if "data" in seg else bytearray(seg["length"])
            buffers.append(local)
            src = tuple(seg["source"]) if seg.get("source") else None
            dst = tuple(seg["dest"]) if seg.get("dest") else None
            copies.append(GrantCopy(length=seg["length"], source_gref=src, dest_gref=dst,
                                    source_local=None if src else local,
                                    dest_local=None if dst else local))
        statuses = await self.domain.grant_table.copy(copies)
        return {"statuses": statuses, "data": [bytes(b).hex() for b in buffers]}

    async def do_copy_addr(self, source: list[int], address: int, length: int) -> dict[str, Any]:
        """Grant copy into an arbitrary address of this process (a hostile or buggy caller)."""
        seg = P.CopySegment(P.CopySide(True, *source), P.CopySide(False, 0, 0, address), length)
        body, _ = await self.domain.connection.checked(P.Op.GNT_COPY, P.encode_copy([seg]))
        return {"status": P.STATUS.unpack_from(body, 4)[0]}

    async def do_evt_alloc(self, remote: int) -> dict[str, Any]:
        port = await self.domain.events.alloc_unbound(remote)
        self.ports[port.port] = port
        return {"port": port.port}

    async def do_evt_bind(self, domid: int, port: int) -> dict[str, Any]:
        local = await self.domain.events.bind_interdomain(domid, port)
        self.ports[local.port] = local
        return {"port": local.port}

    async def do_notify(self, port: int) -> dict[str, Any]:
        self.ports[port].notify()
        return {}

    async def do_wait(self, port: int, timeout: float = 5.0) -> dict[str, Any]:
        with trio.move_on_after(timeout):
            return {"count": await self.ports[port].wait()}
        return {"count": 0}

    async def do_close_port(self, port: int) -> dict[str, Any]:
        await self.ports.pop(port).close()
        return {}

    async def do_raw(self, data: str) -> dict[str, Any]:
        """Send arbitrary bytes as one control message and report whether the link survived."""
        conn = self.domain.connection
        await conn._sock.send(binascii.unhexlify(data))
        with trio.move_on_after(2):
            try:
                await conn.checked(P.Op.STATISTICS)
                return {"alive": True}
            except (HypervisorError, OSError):
                pass
        return {"alive": False}

    async def do_store_ping(self, data: str) -> dict[str, Any]:
        """Open our XenStore connection, send bytes, return what comes back."""
        sock = trio.socket.from_stdlib_socket(await self.domain.store_connection())
        with sock:
            await sock.send(binascii.unhexlify(data))
            return {"reply": (await sock.recv(65536)).hex()}

    async def do_hold_memory(self, megabytes: int) -> dict[str, Any]:
        """Private memory, every page written: a process whose exit takes a while."""
        self.held = b"\1" * (megabytes << 20)
        return {}

    async def do_fork(self) -> dict[str, Any]:
        """A child process that only waits (a domain that is more than one process)."""
        pid = os.fork()
        if pid == 0:
            while True:
                signal.pause()
        return {"child": pid}

    async def do_statistics(self) -> dict[str, Any]:
        return {"statistics": await self.domain.statistics()}


def drop_privileges(uid: int) -> None:
    """Become an unprivileged user, as a sandboxed domain is (after loading Python)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


async def main() -> None:
    drop_privileges_from_environment()
    if "--user" in sys.argv:
        drop_privileges(int(sys.argv[sys.argv.index("--user") + 1]))
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    try:
        async with open_domain() as domain:
            agent = Agent(domain)
            _emit({"ok": True, "domid": domain.domid, "pid": os.getpid()})
            while True:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    _emit(await agent.run(json.loads(line)))
    except HypervisorError as exc:
        _emit({"ok": False, "errno": exc.errno or errno.EIO, "error": str(exc)})


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    trio.run(main)
