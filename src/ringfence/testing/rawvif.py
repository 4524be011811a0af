"""A vif frontend written by hand, for tests that must send a network backend what netfront
never would (hostile or scanning frontends). It runs in a domain process: the XenBus
handshake of Linux's netfront on vif 0, and rings the test fills itself."""
from __future__ import annotations

from typing import Any

from ringfence.hypervisor.io import netif
from ringfence.hypervisor.io.ring import FrontRing


class RawVif:
    """Vif 0 of domain ``dom``: its two ring pages and ``extra_pages`` more, all in
    ``pages`` (rings first), the tx ring at ``pages.buffer[:4096]``, rx at the next page."""

    def __init__(self, dom: Any, xs: Any, backend: str, backend_id: int, pages: Any) -> None:
        self.dom, self.xs, self.backend, self.backend_id, self.pages = dom, xs, backend, backend_id, pages
        self.path = f"/local/domain/{dom.domid}/device/vif/0"
        self.ring_grefs = [dom.grant_table.grant_access(backend_id, f) for f in pages.frames[:2]]

    @classmethod
    async def open(cls, dom: Any, xs: Any, extra_pages: int = 0) -> RawVif:
        path = f"/local/domain/{dom.domid}/device/vif/0"
        backend = (await xs.read(path + "/backend")).decode()
        backend_id = int(await xs.read(path + "/backend-id"))
        return cls(dom, xs, backend, backend_id, await dom.memory.alloc_pages(2 + extra_pages))

    def grant(self, page: int, readonly: bool = False) -> int:
        """Grant the backend page ``page`` of ``pages``."""
        return int(self.dom.grant_table.grant_access(self.backend_id, self.pages.frames[page],
                                                     readonly=readonly))

    async def wait_backend(self, state: bytes) -> None:
        async with self.xs.watch(self.backend + "/state") as events:
            async for _ in events:
                if await self.xs.read(self.backend + "/state") == state:
                    return

    async def wait_closed(self) -> None:
        """The backend disconnected us; state Initialising again, to connect anew."""
        await self.wait_backend(b"6")
        await self.xs.write(self.path + "/state", "1")

    async def connect(self) -> tuple[FrontRing, FrontRing, Any]:
        """Once the backend waits for us: fresh rings, a channel, our keys, Connected; returns
        the tx ring, the rx ring and the port once the backend is connected too."""
        await self.wait_backend(b"2")
        tx = FrontRing(self.pages.buffer[:4096], netif.TX_REQUEST.size, netif.TX_RESPONSE.size, netif.TX_SLOT)
        rx = FrontRing(self.pages.buffer[4096:8192], netif.RX_REQUEST.size, netif.RX_RESPONSE.size,
                       netif.RX_SLOT)
        port = await self.dom.events.alloc_unbound(self.backend_id)
        for key, value in (("tx-ring-ref", self.ring_grefs[0]), ("rx-ring-ref", self.ring_grefs[1]),
                           ("event-channel", port.port), ("request-rx-copy", 1), ("state", 4)):
            await self.xs.write(f"{self.path}/{key}", str(value))
        await self.wait_backend(b"4")
        return tx, rx, port
