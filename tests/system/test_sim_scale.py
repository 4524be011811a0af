"""Scale (issue 3, item 9): 100 domains, each with a ring pair (two ring pages and an event
channel) and 64 granted pages mapped by its peer, under the 20000-fd hard limit."""
from __future__ import annotations

import contextlib
import os
import resource

import trio

from ringfence.testing.sim import open_agent, open_hypervisor

PAIRS = 50  # 100 domains
PAGES = 64 + 2


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_hundred_domains_with_rings_and_mapped_pages(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard <= 20000 or os.environ.get("CI_IGNORE_NOFILE"), "run under the machines' limit"
    async with open_hypervisor(tmp_path) as (path, dom0), contextlib.AsyncExitStack() as stack:
        hv_pid = int([d for d in os.listdir("/proc") if d.isdigit() and
                      os.path.exists(f"/proc/{d}/cmdline") and
                      path.encode() in open(f"/proc/{d}/cmdline", "rb").read()][0])
        pairs = []
        for i in range(PAIRS):
            front = await stack.enter_async_context(open_agent(dom0, f"front{i}"))
            back = await stack.enter_async_context(open_agent(dom0, f"back{i}"))
            pairs.append((front, back))

        async def wire(front, back):
            pages = await front.ok("alloc", count=PAGES)
            grefs = [(await front.ok("grant", to=back.domid, frame=f))["gref"]
                     for f in pages["frames"]]
            await front.ok("write", range=pages["range"], offset=4096 * 65, data=b"tail".hex())
            mapped = await back.ok("map", domid=front.domid, grefs=grefs)
            port = (await front.ok("evt_alloc", remote=back.domid))["port"]
            bport = (await back.ok("evt_bind", domid=front.domid, port=port))["port"]
            await front.ok("notify", port=port)
            assert (await back.ok("wait", port=bport))["count"] == 1
            got = await back.ok("read", map=mapped["map"], offset=4096 * 65, length=4)
            assert bytes.fromhex(got["data"]) == b"tail"

        async with trio.open_nursery() as nursery:
            for front, back in pairs:
                nursery.start_soon(wire, front, back)

        listed = await dom0.list_domains()
        assert len(listed) == 2 * PAIRS
        stats = (await dom0.statistics())["hypervisor"]
        assert stats["maps"] == PAIRS * PAGES
        # The hypervisor holds a few fds per domain, none per page; a mapper holds none either.
        hv_fds = _fd_count(hv_pid)
        assert hv_fds < 4 * 2 * PAIRS + 50, hv_fds
        front, back = pairs[0]
        assert _fd_count(back.pid) < 30
        assert _fd_count(front.pid) < PAGES + 30  # the granter holds its own pages
