"""Random garbage and truncated messages on live control connections (Hypothesis).

Each example opens a fresh domain connection (or a dom0 one), sends junk, and checks that
the daemon still serves a bystander domain."""
from __future__ import annotations

import os
import sys

import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from ringfence.hypervisor.sim import protocol as P
from ringfence.testing.sim import open_agent, open_hypervisor

messages = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.builds(lambda op, rid, body: P.encode(op, rid, body),
              st.sampled_from([int(o) for o in P.Op] + [0, 99, 0x8001]),
              st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.builds(lambda op, body, cut: P.encode(op, 1, body)[:cut],
              st.sampled_from([int(o) for o in P.Op]), st.binary(max_size=40), st.integers(1, 50)),
)


SENDER = """
import socket, sys
target, dom0 = sys.argv[1], sys.argv[2] == "1"
if dom0:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(target)
else:
    sock = socket.socket(fileno=int(target))
sock.settimeout(2)
try:
    for junk in sys.argv[3:]:
        sock.send(bytes.fromhex(junk))
        if not sock.recv(65536):
            break
except OSError:
    pass
"""


async def _send_all(target: str | int, junk: list[bytes], dom0: bool) -> None:
    # A separate process: whoever sends on a domain socket becomes that domain (the kernel
    # attaches its credentials), and a destroyed domain's process is killed.
    fds = () if dom0 else (int(target),)
    await trio.run_process([sys.executable, "-c", SENDER, str(target), "1" if dom0 else "0",
                            *(j.hex() for j in junk)], pass_fds=fds)


async def test_random_garbage_never_hurts_the_daemon(tmp_path):
    async with open_hypervisor(tmp_path) as (path, dom0), open_agent(dom0, "bystander") as good:
        examples = []

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(messages, min_size=1, max_size=4), st.booleans())
        def collect(junk, as_dom0):
            examples.append((junk, as_dom0))

        collect()
        for i, (junk, as_dom0) in enumerate(examples):
            if as_dom0:
                await _send_all(path, junk, True)
            else:
                _, fd = await dom0.create_domain(f"junk{i}")
                await _send_all(fd, junk, False)
                os.close(fd)
            assert (await good.ok("info"))["domid"] == good.domid
        stats = (await dom0.statistics())["hypervisor"]
        assert stats["protocol_errors"] >= 10
        # connections closed before HELLO leave no domain behind
        with trio.fail_after(5):
            while [d for d in await dom0.list_domains() if d["name"].startswith("junk")]:
                await trio.sleep(0.05)
        assert len(os.listdir(f"/proc/{good.pid}/fd")) < 50
