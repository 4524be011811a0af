"""XenStore paths of split devices, as Xen's toolstack lays them out."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DevicePaths:
    """Where a device's two halves live: ``kind`` is "vbd" or "vif"."""
    kind: str
    frontend_domid: int
    backend_domid: int
    devid: int

    @property
    def backend(self) -> str:
        return f"/local/domain/{self.backend_domid}/backend/{self.kind}/{self.frontend_domid}/{self.devid}"

    @property
    def frontend(self) -> str:
        return f"/local/domain/{self.frontend_domid}/device/{self.kind}/{self.devid}"

    def backend_key(self, key: str) -> str:
        return f"{self.backend}/{key}"

    def frontend_key(self, key: str) -> str:
        return f"{self.frontend}/{key}"

    @property
    def standby(self) -> str:
        """The frontend's directory for a standby link to this backend (a warm spare's)."""
        return standby_dir(self.frontend, self.backend_domid)

    def queue_key(self, queue: int, key: str, *, frontend: bool = True, queues: int = 1) -> str:
        """Per-queue keys (multi-queue): ``queue-N/key``, or plain ``key`` with one queue."""
        base = self.frontend if frontend else self.backend
        return f"{base}/queue-{queue}/{key}" if queues > 1 else f"{base}/{key}"


STANDBY = "standby-"  # a frontend directory's standby links: standby-<backend domid>
# In a standby directory: a channel the frontend opened for dom0, which the toolstack
# notifies the moment the spare takes over (before its switch in XenStore lands).
TAKEOVER_KEY = "takeover-event-channel"


def standby_dir(frontend: str, backend_domid: int | str) -> str:
    return f"{frontend}/{STANDBY}{backend_domid}"


def standby_domid(frontend: str, path: str) -> int | None:
    """The backend a standby directory of ``frontend`` is for, or None if ``path`` is none."""
    name = path[len(frontend) + 1:] if path.startswith(frontend + "/") else ""
    domid = name.removeprefix(STANDBY)
    return int(domid) if name.startswith(STANDBY) and domid.isdigit() else None


def parse_backend_path(path: str) -> DevicePaths | None:
    """``/local/domain/B/backend/KIND/F/DEV[/...]`` → DevicePaths, else None."""
    parts = path.strip("/").split("/")
    if len(parts) < 7 or parts[:2] != ["local", "domain"] or parts[3] != "backend":
        return None
    try:
        return DevicePaths(parts[4], int(parts[5]), int(parts[2]), int(parts[6]))
    except ValueError:
        return None


def parse_frontend_path(path: str) -> DevicePaths | None:
    """``/local/domain/F/device/KIND/DEV[/...]`` → DevicePaths with backend unknown (-1)."""
    parts = path.strip("/").split("/")
    if len(parts) < 6 or parts[:2] != ["local", "domain"] or parts[3] != "device":
        return None
    try:
        return DevicePaths(parts[4], int(parts[2]), -1, int(parts[5]))
    except ValueError:
        return None


def can_change_devices(base: str, path: str, key: str) -> bool:
    """Whether a watch event at ``path``, under a directory of devices ``base``
    (``base/A/B/...``: a backend's ``KIND/FRONTEND/DEVID``, a guest's ``KIND/DEVID``), can
    make a device appear or go: ``base`` itself, its first two levels, or a device's ``key``
    (the node that says it is complete). Keys below a device, most of them written by its
    own driver, cannot."""
    if not path.startswith(base):
        return True
    parts = path[len(base):].strip("/").split("/")
    return len(parts) <= 2 or (len(parts) == 3 and parts[2] == key)
