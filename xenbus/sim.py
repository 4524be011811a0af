"""xenstored on the sim platform: domains' connections, rings and deaths from the hypervisor."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

import trio

from ringfence.hypervisor.sim.client import Dom0, SimDomain, StoreRing, open_dom0
from ringfence.hypervisor.sim.protocol import EventKind
from ringfence.xenbus.client import XenStore, open_xenstore_stream
from ringfence.xenbus.ring_transport import mapped_domain_ring, serve_domain_ring, setup_guest_ring
from ringfence.xenbus.server import XenStoreServer

log = logging.getLogger(__name__)

TRANSPORTS = ("ring", "socket")
TRANSPORT_ENV = "RINGFENCE_XENSTORE_TRANSPORT"


async def serve_hypervisor_domains(server: XenStoreServer, hypervisor: str, *,
                                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Take every domain's XenStore connection and ring from the hypervisor, with the domid
    it vouches for, and turn domain deaths into @releaseDomain."""
    async with open_dom0(hypervisor) as store_link, open_dom0(hypervisor) as events:
        await store_link.register_store()
        await events.subscribe()
        rings: dict[int, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_domains, server, events, rings)
            task_status.started()
            while True:
                event = await store_link.next_store_event()
                if isinstance(event, StoreRing):
                    nursery.start_soon(_serve_ring, server, store_link, event, rings)
                else:
                    nursery.start_soon(server.serve_domain_connection,
                                       trio.socket.from_stdlib_socket(event.sock), event.domid)


async def _serve_ring(server: XenStoreServer, dom0: Dom0, event: StoreRing,
                      rings: dict[int, trio.CancelScope]) -> None:
    if event.domid in rings:
        return
    with trio.CancelScope() as scope:
        rings[event.domid] = scope
        try:
            async with mapped_domain_ring(dom0, event.domid, event.port) as (ring, port):
                if event.domid not in server.domains or server.domains[event.domid].get("port") != event.port:
                    server.introduce_domain(event.domid, port=event.port)
                log.info("serving ring", extra={"kv": {"domid": event.domid, "port": event.port,
                                                       "resumed": event.replayed}})
                await serve_domain_ring(server, event.domid, ring, port, resumed=event.replayed)
        except OSError as exc:  # the domain died meanwhile, or its ring page is not there
            log.warning("cannot serve ring", extra={"kv": {"domid": event.domid, "error": exc}})
        finally:
            if rings.get(event.domid) is scope:
                del rings[event.domid]


async def _watch_domains(server: XenStoreServer, events: Dom0,
                         rings: dict[int, trio.CancelScope]) -> None:
    while True:
        kind, domid = await events.next_event()
        if kind == EventKind.RELEASED:
            log.info("domain released", extra={"kv": {"domid": domid}})
            if domid in rings:
                rings[domid].cancel()
            server.release_domain(domid)
        elif kind == EventKind.INTRODUCED and domid not in server.domains:
            server.introduce_domain(domid)


def default_transport() -> str:
    transport = os.environ.get(TRANSPORT_ENV) or "ring"
    if transport not in TRANSPORTS:
        raise ValueError(f"${TRANSPORT_ENV}={transport!r}: choose from {', '.join(TRANSPORTS)}")
    return transport


@contextlib.asynccontextmanager
async def open_domain_xenstore(domain: SimDomain, transport: str | None = None) -> AsyncIterator[XenStore]:
    """This domain's XenStore connection, authenticated by the hypervisor: over its ring page
    and event channel as a Xen guest's (``ring``, the default), or a socket (``socket``)."""
    if (transport or default_transport()) == "ring":
        guest = await setup_guest_ring(domain)
        async with open_xenstore_stream(guest.stream(), guest.reconnect) as xs:
            yield xs
        return

    async def dial() -> trio.abc.Stream:
        sock = await domain.store_connection()
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    # A restarted xenstored registers with the hypervisor again; until then dialling fails
    # (ENOTCONN) and the client keeps trying.
    async with open_xenstore_stream(await dial(), dial) as xs:
        yield xs
