"""sd_notify(3) without libsystemd: READY=1, STATUS=, WATCHDOG=1 over $NOTIFY_SOCKET.

Used by every daemon (hypervisor, xenstored, drivers) so that systemd's Type=notify and
ringfence's own supervisor see the same signals. A missing $NOTIFY_SOCKET makes every
call a no-op, so daemons call it unconditionally.
"""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self._address = address or None
        self._socket: socket.socket | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send KEY=value lines, e.g. notify(READY=1, STATUS="serving"). True if sent."""
        if self._address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(payload, self._address)
        except OSError:
            return False  # the supervisor went away; the daemon keeps serving regardless
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
