"""Choosing a platform, and XenStore's framing for Linux's xenbus device."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from ringfence.hypervisor.io import xs_wire as W
from ringfence.xenbus.platforms import MessagePerWrite, choose_platform, xenstore_endpoint


def test_auto_is_sim_when_the_sim_hypervisor_started_us(monkeypatch):
    monkeypatch.setenv("RINGFENCE_DOMAIN_FD", "3")
    assert choose_platform("auto") == "sim"
    assert choose_platform("xen") == "xen"
    with pytest.raises(ValueError, match="unknown platform"):
        choose_platform("kvm")


def test_xenstored_path_wins_as_in_libxenstore(monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", "/tmp/xs.sock")
    assert xenstore_endpoint() == "/tmp/xs.sock"
    monkeypatch.delenv("XENSTORED_PATH")
    assert xenstore_endpoint() in ("/run/xenstored/socket", "/dev/xen/xenbus")


class Recorder(trio.abc.Stream):
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data) -> None:
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes=None):
        return b""

    async def aclose(self) -> None:
        pass


async def test_each_message_is_written_alone_even_when_batched_or_split():
    """Linux's xenbus device handles one message per write() and drops the rest."""
    messages = [W.encode(W.Op.READ, i, 0, f"/local/domain/{i}\0".encode()) for i in range(5)]
    messages.append(W.encode(W.Op.WATCH_EVENT, 9, 0, b""))  # an empty payload too
    recorder = Recorder()
    stream = MessagePerWrite(recorder)
    batch = b"".join(messages)
    await stream.send_all(batch[:7])        # half a header
    await stream.send_all(batch[7:40])      # the rest of one message and part of the next
    await stream.send_all(batch[40:])
    assert recorder.writes == messages
