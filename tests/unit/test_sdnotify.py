from __future__ import annotations

import socket

from ringfence._sdnotify import Notifier


def test_notify_reaches_the_socket(tmp_path) -> None:
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    notifier = Notifier(path)
    assert notifier.ready("serving 3 domains")
    assert server.recv(256) == b"READY=1\nSTATUS=serving 3 domains"
    assert notifier.watchdog()
    assert server.recv(256) == b"WATCHDOG=1"
    notifier.close()


def test_no_socket_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().ready()
