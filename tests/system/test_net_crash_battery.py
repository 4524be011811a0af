"""Crash battery for the network driver domain: killed again and again while guest1
streams TCP to guest2; the receiver checks every byte of the stream (each 8-byte word is
its own offset: a lost, duplicated, reordered or corrupted byte shows) and the stream
makes progress between kills."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import trio

from ringfence.isolation.supervisor import RestartPolicy
from ringfence.testing.streams import LineReader
from ringfence.toolstack.config import load
from ringfence.toolstack.system import guest_pid, open_system

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

KILLS = 100
CONFIG = """
[[domain]]
name = "net"
kind = "driver"

[[domain]]
name = "guest1"
kind = "guest"
vifs = ["mac=02:00:00:00:00:01,backend=net,ip=10.9.0.1/24"]

[[domain]]
name = "guest2"
kind = "guest"
vifs = ["mac=02:00:00:00:00:02,backend=net,ip=10.9.0.2/24"]
"""

RECEIVER = r"""
import socket, struct, sys
listener = socket.socket(); listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("10.9.0.2", 5201)); listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
offset, pending = 0, b""
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    pending += data
    whole = len(pending) // 8 * 8
    for (word,) in struct.iter_unpack("<Q", pending[:whole]):
        if word != offset:
            print(f"mismatch at {offset}: {word}", flush=True); sys.exit(1)
        offset += 8
    pending = pending[whole:]
    print(f"received {offset}", flush=True)
print(f"done {offset} {len(pending)}", flush=True)
"""

SENDER = r"""
import signal, socket, struct, sys
stop = False
def on_term(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, on_term)
sock = socket.create_connection(("10.9.0.2", 5201), timeout=120)
offset = 0
while not stop:
    sock.sendall(b"".join(struct.pack("<Q", offset + 8 * i) for i in range(2048)))
    offset += 8 * 2048
sock.shutdown(socket.SHUT_WR); sock.recv(1)
print(f"sent {offset}", flush=True)
"""


async def test_net_driver_killed_under_a_verified_tcp_stream():
    runtime = f"/run/ringfence-netbattery-{os.getpid()}"
    os.makedirs(runtime, exist_ok=True)
    try:
        with open(f"{runtime}/host.toml", "w") as f:
            f.write(CONFIG)
        policy = RestartPolicy(initial_delay=0.0, stable_after=0.0, burst=KILLS * 2, watchdog=None)
        async with open_system(load(f"{runtime}/host.toml", runtime), runtime,
                               driver_policy=policy) as system:
            g1, g2 = (guest_pid(system.guests[n]) for n in ("guest1", "guest2"))

            def inside(pid: int, script: str) -> list[str]:
                return ["nsenter", "-t", str(pid), "-n", sys.executable, "-c", script]

            receiver = await trio.lowlevel.open_process(inside(g2, RECEIVER), stdout=subprocess.PIPE)
            lines = LineReader(receiver.stdout)
            assert await lines.next() == "listening"
            sender = await trio.lowlevel.open_process(inside(g1, SENDER), stdout=subprocess.PIPE)
            received = 0
            rng = random.Random(7)
            service = system.drivers["net"]
            for kill in range(KILLS):
                with trio.fail_after(60):  # the stream moves between kills
                    target = received + (256 << 10)
                    while received < target:
                        line = await lines.next()
                        assert line.startswith("received"), line
                        received = int(line.split()[1])
                await trio.sleep(rng.uniform(0.0, 0.2))
                service.kill()
                with trio.fail_after(30):
                    while service.state.value != "ready" or service.starts < kill + 2:
                        await trio.sleep(0.01)
            sender.terminate()
            with trio.fail_after(120):
                while not (line := await lines.next()).startswith("done"):
                    assert line.startswith("received"), line
                sent_line = await LineReader(sender.stdout).next()
            sent = int(sent_line.split()[1])
            done, leftover = map(int, line.split()[1:])
            assert done == sent and leftover == 0  # every byte, in order, exactly once
            assert service.crashes == KILLS
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
