"""TOML configuration of a host: domains, their kinds, and disks in xl.cfg syntax.

    [[domain]]
    name = "stor"
    kind = "driver"

    [[domain]]
    name = "guest1"
    kind = "guest"
    disks = ["target=/var/lib/ringfence/guest1.img,vdev=xvda,format=raw,access=rw,backend=stor"]

Errors name the file, the line when it can be found, and the key.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from ringfence.errors import CommandError

VDEV_BASE = {"xvd": 202 << 8, "hd": 3 << 8, "sd": 8 << 8}

DEFAULT = """\
# ringfence's embedded default: a storage and a network driver domain, two guests.
[[domain]]
name = "stor"
kind = "driver"

[[domain]]
name = "net"
kind = "driver"

[[domain]]
name = "guest1"
kind = "guest"
disks = ["target={state}/guest1.img,vdev=xvda,format=raw,access=rw,backend=stor"]
vifs = ["mac=02:00:00:00:00:01,bridge=xenbr0,backend=net,ip=10.0.0.1/24 fd00::1/64"]

[[domain]]
name = "guest2"
kind = "guest"
disks = ["target={state}/guest2.img,vdev=xvda,format=raw,access=rw,backend=stor"]
vifs = ["mac=02:00:00:00:00:02,bridge=xenbr0,backend=net,ip=10.0.0.2/24 fd00::2/64"]
"""


@dataclass(frozen=True, slots=True)
class DiskSpec:
    target: str
    vdev: str = "xvda"
    format: str = "raw"
    access: str = "rw"
    backend: str = ""

    @property
    def mode(self) -> str:
        return "r" if self.access in ("r", "ro") else "w"

    @property
    def devid(self) -> int:
        """Xen's virtual device number: xvda = 51712 (202 << 8), xvdb = 51728, ..."""
        for prefix, base in VDEV_BASE.items():
            if self.vdev.startswith(prefix) and self.vdev[len(prefix):].isalpha():
                index = 0
                for ch in self.vdev[len(prefix):]:
                    index = index * 26 + (ord(ch) - ord("a") + 1)
                return base + (index - 1) * 16
        if self.vdev.isdigit():
            return int(self.vdev)
        raise ValueError(f"unknown vdev {self.vdev!r}")


@dataclass(frozen=True, slots=True)
class VifSpec:
    mac: str
    backend: str
    bridge: str = "xenbr0"
    ip: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DomainSpec:
    name: str
    kind: str
    disks: list[DiskSpec] = field(default_factory=list)
    vifs: list[VifSpec] = field(default_factory=list)
    spare: bool = False  # driver domains: keep a warm spare ready to take over on a crash


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    domains: list[DomainSpec]


def parse_disk(text: str) -> DiskSpec:
    """xl.cfg disk spec: ``target=PATH,vdev=xvda,format=raw,access=rw,backend=NAME``."""
    values: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("target", "vdev", "format", "access", "backend"):
            raise ValueError(f"bad disk spec item {item!r}")
        values[key] = value.strip()
    if "target" not in values:
        raise ValueError("disk spec needs target=")
    if values.get("format", "raw") != "raw":
        raise ValueError("only format=raw is supported")
    if values.get("access", "rw") not in ("rw", "w", "r", "ro"):
        raise ValueError(f"bad access {values['access']!r}")
    disk = DiskSpec(**values)
    disk.devid  # validates vdev
    return disk


def parse_vif(text: str) -> VifSpec:
    """xl.cfg vif spec: ``mac=02:00:00:00:00:01,bridge=xenbr0,backend=NAME,ip=CIDR[ CIDR]``."""
    values: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("mac", "bridge", "backend", "ip"):
            raise ValueError(f"bad vif spec item {item!r}")
        values[key] = value.strip()
    mac = values.get("mac", "")
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise ValueError(f"bad mac {mac!r}")
    if not values.get("backend"):
        raise ValueError("vif spec needs backend=")
    return VifSpec(mac, values["backend"], values.get("bridge", "xenbr0"),
                   tuple(values.get("ip", "").split()))


def load(path: str | None, state_dir: str) -> Config:
    if path is None:
        source, text = "<embedded default>", DEFAULT.format(state=state_dir)
    else:
        source = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise CommandError(f"{path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CommandError(f"{source}: {exc}") from None  # names line and column itself
    domains = []
    names = set()
    entries = data.get("domain", [])
    if not isinstance(entries, list):
        raise CommandError(f"{_at(source, text, '[domain')}: 'domain' must be an array of tables ([[domain]])")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CommandError(f"{source}: domain[{i}] must be a table")
        where = f"{_at(source, text, _entry_anchor(entry, i))}: domain[{i}]"
        name, kind = entry.get("name"), entry.get("kind", "guest")
        if not isinstance(name, str) or not name or "/" in name:
            raise CommandError(f"{where}: key 'name' must be a non-empty string")
        if name in names:
            raise CommandError(f"{where}: duplicate domain name {name!r}")
        names.add(name)
        if kind not in ("driver", "guest"):
            raise CommandError(f"{where} ({name}): key 'kind' must be 'driver' or 'guest'")
        disks = []
        for j, raw in enumerate(entry.get("disks", [])):
            try:
                disks.append(parse_disk(raw))
            except (ValueError, TypeError) as exc:
                where = f"{_at(source, text, str(raw))}: domain[{i}]"
                raise CommandError(f"{where} ({name}): key 'disks[{j}]': {exc}") from None
        vifs = []
        for j, raw in enumerate(entry.get("vifs", [])):
            try:
                vifs.append(parse_vif(raw))
            except (ValueError, TypeError) as exc:
                where = f"{_at(source, text, str(raw))}: domain[{i}]"
                raise CommandError(f"{where} ({name}): key 'vifs[{j}]': {exc}") from None
        spare = entry.get("spare", False)
        if not isinstance(spare, bool) or (spare and kind != "driver"):
            raise CommandError(f"{where} ({name}): key 'spare' must be true or false, on a driver domain")
        domains.append(DomainSpec(name, kind, disks, vifs, spare))
    drivers = {d.name for d in domains if d.kind == "driver"}
    for d in domains:
        for dev in [*d.disks, *d.vifs]:
            if dev.backend not in drivers:
                raise CommandError(f"{source}: domain {d.name}: backend {dev.backend!r} "
                                   "is not a driver domain")
    for driver in drivers:
        kinds = {("disk" if isinstance(dev, DiskSpec) else "vif") for d in domains
                 for dev in [*d.disks, *d.vifs] if dev.backend == driver}
        if len(kinds) > 1:
            raise CommandError(f"{source}: driver domain {driver!r} serves both disks and vifs; "
                               "use one driver domain per device class")
    return Config(source, domains)


def _entry_anchor(entry: dict[str, object], index: int) -> str:
    name = entry.get("name")
    return f'"{name}"' if isinstance(name, str) and name else f"#domain{index}"


def _at(source: str, text: str, needle: str) -> str:
    """``source:LINE`` for the first line holding ``needle`` (just ``source`` if none)."""
    for number, line in enumerate(text.splitlines(), 1):
        if needle and needle in line:
            return f"{source}:{number}"
    return source


def ensure_disk_images(config: Config, size: int = 64 << 20) -> None:
    """Create missing raw images (sparse) for the embedded default."""
    for d in config.domains:
        for disk in d.disks:
            if not os.path.exists(disk.target):
                os.makedirs(os.path.dirname(disk.target) or ".", exist_ok=True)
                with open(disk.target, "wb") as f:
                    f.truncate(size)
