"""xenstored on the sim platform: domains' connections and deaths from the hypervisor."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import trio

from ringfence.hypervisor.sim.client import SimDomain, open_dom0
from ringfence.hypervisor.sim.protocol import EventKind
from ringfence.xenbus.client import XenStore, open_xenstore_stream
from ringfence.xenbus.server import XenStoreServer

log = logging.getLogger(__name__)


async def serve_hypervisor_domains(server: XenStoreServer, hypervisor: str, *,
                                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Take every domain's XenStore connection from the hypervisor, with the domid it
    vouches for, and turn domain deaths into @releaseDomain."""
    async with open_dom0(hypervisor) as store_link, open_dom0(hypervisor) as events:
        await store_link.register_store()
        await events.subscribe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_domains, server, events)
            task_status.started()
            while True:
                domid, sock = await store_link.next_store_connection()
                nursery.start_soon(server.serve_domain_connection,
                                   trio.socket.from_stdlib_socket(sock), domid)


async def _watch_domains(server: XenStoreServer, events) -> None:  # type: ignore[no-untyped-def]
    while True:
        kind, domid = await events.next_event()
        if kind == EventKind.RELEASED:
            log.info("domain released", extra={"kv": {"domid": domid}})
            server.release_domain(domid)
        elif kind == EventKind.INTRODUCED and domid not in server.domains:
            server.introduce_domain(domid)


@contextlib.asynccontextmanager
async def open_domain_xenstore(domain: SimDomain) -> AsyncIterator[XenStore]:
    """This domain's XenStore connection, authenticated by the hypervisor."""
    async def dial() -> trio.abc.Stream:
        sock = await domain.store_connection()
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    # A restarted xenstored registers with the hypervisor again; until then dialling fails
    # (ENOTCONN) and the client keeps trying.
    async with open_xenstore_stream(await dial(), dial) as xs:
        yield xs
