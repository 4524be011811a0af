"""A running system: hypervisor, xenstored, supervised driver domains and guests.

:func:`open_system` brings up everything a configuration names and tears it all down in
order on exit. Storage driver domains are supervised: when one dies it is relaunched as a
new domain (or a warm spare takes over), its devices are handed to it in XenStore
(:mod:`toolstack.devices`), and the guests' frontends reconnect and replay — the guests only
see a pause.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from ringfence._statsock import STATS_SOCKET_ENV, fetch_statistics
from ringfence.errors import CommandError
from ringfence.hypervisor.io import xs_wire as W
from ringfence.hypervisor.io.xs_wire import Op, XenStoreError
from ringfence.hypervisor.sim.client import DOMAIN_FD_ENV, Dom0
from ringfence.isolation.launcher import open_launcher
from ringfence.isolation.sandbox import (SandboxedProcess, SandboxSpec, innermost_pid, sandbox_uid,
                                         spawn_sandboxed)
from ringfence.isolation.supervisor import (Launch, RestartPolicy, Service, Supervisor,
                                            close_notify_socket, notify_socket,
                                            receive_notification)
from ringfence.toolstack.config import Config, DiskSpec, DomainSpec, VifSpec
from ringfence.toolstack.control import control_path, serve_control
from ringfence.toolstack.devices import add_vbd, add_vif, stage_device, switch_backends
from ringfence.toolstack.hotplug import check_image
from ringfence.toolstack.hypervisor import open_hypervisor
from ringfence.xenbus.client import open_xenstore, present
from ringfence.xenbus.paths import TAKEOVER_KEY, DevicePaths
from ringfence.xenbus.state import XenbusState

log = logging.getLogger(__name__)

# What domains run, imported once by the launcher so that a domain starts as a fork of it
# (a driver domain's relaunch then costs milliseconds, not an interpreter's start-up).
DOMAIN_MODULES = ("ringfence.cli", "ringfence.xenbus.platforms", "ringfence.hypervisor.sim.client",
                  "ringfence.xenbus.sim", "ringfence.backends.blkback.cli",
                  "ringfence.backends.blkback.xenbus", "ringfence.toolstack.guest",
                  "ringfence.frontends.blkfront.device", "ringfence.frontends.blkfront.nbd")
# Domains with network devices (netback's driver domains, netfront's guests) fork from a
# launcher of their own: both bring pyroute2 (12 MB of heap, 240 modules), which every
# other domain would otherwise carry, and pay for when it forks and when it dies (a killed
# domain's exit, on a takeover's path, is mostly tearing down its address space).
NET_DOMAIN_MODULES = (*DOMAIN_MODULES, "ringfence.backends.netback.cli", "ringfence.backends.netback.xenbus",
                      "ringfence.frontends.netfront.device")
# dom0's daemons (xenstored and the toolstack's own thread) run at this nice value, the
# domains at 0: the guests' I/O and the driver domains serving it outrank the control
# plane's bookkeeping, which on a crash is most of the CPU a recovery takes (the next
# spare's staging, the switch in XenStore). On two busy cores a warm kill then costs a
# bystander guest less of its I/O. Nothing on a warm takeover's path waits for them: blkfront
# switches on the hypervisor's notice. The hypervisor, which stands in for Xen, runs at 0:
# that notice is on the path (at nice 10, 5 of 600 warm kills under load took over 20 ms,
# against 1 of 600 at 0).
CONTROL_PLANE_NICE = 10


@dataclass
class Guest:
    name: str
    domid: int
    disks: list[DiskSpec]
    vifs: dict[int, VifSpec] = field(default_factory=dict)  # by devid (ethN): stable across detach
    nbd_sockets: dict[str, str] = field(default_factory=dict)
    process: Any = None


@dataclass
class System:
    config: Config
    runtime_dir: str
    dom0: Dom0
    xenstore_path: str
    supervisor: Supervisor
    drivers: dict[str, Service] = field(default_factory=dict)
    driver_domids: dict[str, int] = field(default_factory=dict)
    guests: dict[str, Guest] = field(default_factory=dict)
    recoveries: list[tuple[str, float]] = field(default_factory=list)
    xenstored: Any = None
    driver_kinds: dict[str, str] = field(default_factory=dict)  # "vbd" or "vif"
    sandboxed: bool = True
    quiet: bool = True
    spares: dict[str, Any] = field(default_factory=dict)   # driver name -> Spare
    nursery: Any = None
    xs: Any = None   # the toolstack's own XenStore connection
    cgroup_group: str = ""  # its sandboxes' (cgroup_group(runtime_dir))
    launcher: Any = None  # isolation.launcher.Launcher, or None: domains exec'd
    net_launcher: Any = None  # for domains with network devices (NET_DOMAIN_MODULES), if any
    control_statistics: dict[str, int] = field(default_factory=dict)
    # The hypervisor sends death notices as a domain begins to exit (hypervisor/sim/exits.py)
    exits_announced: bool = False
    # Set, and replaced by a new one, whenever a spare has come to stand by.
    spare_news: trio.Event = field(default_factory=trio.Event)

    def launcher_for(self, networked: bool) -> Any:
        """The launcher a domain forks from: the network one's for a domain with network
        devices (a vif backend, a guest with vifs)."""
        return self.net_launcher if networked else self.launcher

    def spare_ready(self, name: str) -> bool:
        """A warm spare stands by for ``name``, has finished starting (it serves its
        statistics socket once connected to XenStore and watching its backend directory)
        and has the devices of ``name`` staged, the frontends standing by with it."""
        spare = self.spares.get(name)
        return spare is not None and spare.staging_done and spare.standing_by and os.path.exists(spare.stats)

    def takes_over_on_notice(self, name: str) -> bool:
        """Whether a crash of ``name`` is taken over on the hypervisor's death notices
        alone, sent as the domain begins to exit: its spare is ready, and each device
        staged for it stands by on a link whose takeover channel the hypervisor notifies."""
        spare = self.spares.get(name)
        return (self.exits_announced and spare is not None and self.spare_ready(name)
                and spare.staged <= spare.notified)

    async def wait_spare_ready(self, name: str) -> None:
        """Until :meth:`spare_ready`, woken when a spare comes to stand by (no polling:
        whoever waits for a spare between crashes does not cost the running domains)."""
        while True:
            news = self.spare_news
            if self.spare_ready(name):
                return
            await news.wait()

    def _spare_stands_by(self) -> None:
        news, self.spare_news = self.spare_news, trio.Event()
        news.set()

    def stats_socket(self, name: str, uid: int | None) -> str:
        """Where domain ``name`` answers statistics requests: a directory of its own user."""
        directory = os.path.join(self.runtime_dir, "stats", name)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if uid is not None and os.geteuid() == 0:
            os.chown(directory, uid, -1)
        return os.path.join(directory, "stats.sock")

    async def domain_statistics(self) -> dict[str, Any]:
        names = [*self.drivers, *self.guests]
        results: dict[str, Any] = {}

        async def one(name: str) -> None:
            results[name] = await fetch_statistics(os.path.join(self.runtime_dir, "stats", name, "stats.sock"))
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        return {name: results[name] for name in names}

    def guest_home(self, guest: Guest) -> str:
        """The guest's own directory (its NBD sockets): shared /run, not the private /tmp."""
        return os.path.join(self.runtime_dir, "guests", guest.name)

    async def add_guest(self, spec: DomainSpec) -> Guest:
        """Create and start a guest on the running host (``ringfence create``)."""
        if spec.name in self.guests or spec.name in self.drivers:
            raise CommandError(f"a domain named {spec.name!r} exists already")
        for dev, kind in [*((d, "vbd") for d in spec.disks), *((v, "vif") for v in spec.vifs)]:
            if self.driver_kinds.get(dev.backend) != kind:
                raise CommandError(f"backend {dev.backend!r} is not a driver domain serving {kind}s")
        for disk in spec.disks:
            check_image(self, disk.target)
        domid, fd = await self.dom0.create_domain(spec.name)
        guest = Guest(spec.name, domid, list(spec.disks), dict(enumerate(spec.vifs)))
        guest._fd = fd  # type: ignore[attr-defined]
        self.guests[spec.name] = guest
        await _write_guest_devices(self, self.xs, guest)
        await _start_guest(self, guest, self.sandboxed, self.quiet)
        return guest

    async def statistics(self) -> dict[str, Any]:
        services = [self.xenstored, *self.drivers.values()] if self.xenstored else list(self.drivers.values())
        return {"hypervisor": await self.dom0.statistics(),
                "xenstored": await fetch_statistics(
                    os.path.join(self.runtime_dir, "stats", "xenstored", "stats.sock")),
                "services": {s.name: asdict(s.statistics()) for s in services},
                "guests": {g.name: {"domid": g.domid, "nbd": g.nbd_sockets, "disks": len(g.disks),
                                    "vifs": len(g.vifs)} for g in self.guests.values()},
                "domains": await self.domain_statistics(),
                "recoveries": [{"driver": name, "ms": round(ms, 1)} for name, ms in self.recoveries],
                "control": dict(self.control_statistics),
                "launcher": asdict(self.launcher.statistics()) if self.launcher else None,
                "net_launcher": asdict(self.net_launcher.statistics()) if self.net_launcher else None}


def cgroup_group(runtime_dir: str) -> str:
    """The cgroup directory a system's sandboxes go in: the same for every start of a system
    (a new start finds a killed one's leftovers), another for another system on the host.
    Its runtime directory's name, for whoever lists the cgroups, and a digest of its path."""
    path = os.path.realpath(runtime_dir)
    # Only plain characters of the name: a cgroup's name must not start with "cgroup." nor
    # hold a newline, and the digest tells systems apart anyway.
    name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(path))[:64] or "root"
    return f"{name}.{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def _sandbox(name: str, sandboxed: bool, group: str, **limits: Any) -> SandboxSpec | None:
    if not sandboxed or os.geteuid() != 0:
        return None
    # Domains need the runtime directory (NBD sockets) visible: /run is shared, /tmp is not.
    return SandboxSpec(name, group=group, **limits)


@contextlib.asynccontextmanager
async def open_system(config: Config, runtime_dir: str, *, sandboxed: bool = True,
                      quiet: bool = True, driver_policy: RestartPolicy | None = None,
                      warm_spares: bool | None = None) -> AsyncIterator[System]:
    """The whole host; ``driver_policy`` overrides how driver domains are restarted
    (the default: at once, backoff doubling, 10 starts per minute); ``warm_spares``
    overrides the config's ``spare`` key for every driver domain."""
    os.makedirs(runtime_dir, exist_ok=True)
    guests = [d for d in config.domains if d.kind == "guest"]
    driver_kinds = {spec.name: "vif" if any(v.backend == spec.name for g in guests for v in g.vifs)
                    else "vbd" for spec in config.domains if spec.kind == "driver"}
    # The launchers import the domain programs while the hypervisor and xenstored start.
    async with open_launcher(DOMAIN_MODULES) as launcher, \
            (open_launcher(NET_DOMAIN_MODULES) if "vif" in driver_kinds.values()
             else contextlib.nullcontext()) as net_launcher, \
            open_hypervisor(runtime_dir, quiet=quiet) as (hv_path, dom0), \
            _at_nice(CONTROL_PLANE_NICE):
        xs_path = os.path.join(runtime_dir, "xenstored.sock")
        state_dir = os.path.join(runtime_dir, "xenstore-state")
        # The journal lets xenstored survive its own crashes within this host's life; a
        # previous host's tree (its domids, its devices) means nothing to a new hypervisor.
        shutil.rmtree(state_dir, ignore_errors=True)
        os.makedirs(state_dir, exist_ok=True)
        async with trio.open_nursery() as nursery:
            supervisor = await nursery.start(Supervisor().run)
            # xenstored is supervised too: after a crash it comes back from its journal,
            # registers with the hypervisor again, and every client redials.
            xs_argv = [sys.executable, "-m", "ringfence", "xenstored", "--socket", xs_path,
                       "--state-dir", state_dir, "--hypervisor", hv_path]

            xs_stats = os.path.join(runtime_dir, "stats", "xenstored", "stats.sock")
            os.makedirs(os.path.dirname(xs_stats), mode=0o700, exist_ok=True)

            async def prepare_xenstored() -> Launch:
                return Launch(xs_argv, env=dict(os.environ, **{STATS_SOCKET_ENV: xs_stats}),
                              kwargs={"stderr": subprocess.DEVNULL} if quiet else {})

            group = cgroup_group(runtime_dir)
            xenstored = Service("xenstored", prepare_xenstored,
                                SandboxSpec("xenstored", namespaces=frozenset(), uid=0, group=group,
                                            nice=CONTROL_PLANE_NICE),
                                RestartPolicy(initial_delay=0.01),
                                runtime_dir=os.path.join(runtime_dir, "notify"))
            await supervisor.add(xenstored)
            with trio.fail_after(30):
                await xenstored.wait_ready()
            system = System(config, runtime_dir, dom0, xs_path, supervisor,
                            sandboxed=sandboxed, quiet=quiet, cgroup_group=group, launcher=launcher,
                            net_launcher=net_launcher, driver_kinds=driver_kinds)
            system.xenstored = xenstored
            system.nursery = nursery
            system.exits_announced = (await dom0.statistics())["hypervisor"].get("exit_records") is not None
            system.xs = await nursery_xs(nursery, xs_path)
            # Guests exist first (their domids go into the vbds), start last.
            for spec in guests:
                domid, fd = await dom0.create_domain(spec.name)
                guest = Guest(spec.name, domid, list(spec.disks), dict(enumerate(spec.vifs)))
                guest._fd = fd  # type: ignore[attr-defined]
                system.guests[spec.name] = guest
            for spec in config.domains:
                if spec.kind == "driver":
                    await _start_driver(system, spec.name, sandboxed, quiet, driver_policy,
                                        spec.spare if warm_spares is None else warm_spares)
            for guest in system.guests.values():
                await _start_guest(system, guest, sandboxed, quiet)
            await nursery.start(serve_control, system, control_path(runtime_dir))
            try:
                yield system
            finally:
                for guest in system.guests.values():
                    if guest.process is not None:
                        guest.process.kill()
                spares, system.spares = list(system.spares.values()), {}  # none replaced now
                for spare in spares:
                    spare.process.kill()
                await supervisor.stop_all()
                with trio.move_on_after(10):
                    for service in [*system.drivers.values(), xenstored]:
                        while service.state.value not in ("stopped", "failed"):
                            await trio.sleep(0.02)
                nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager  # (entered beside the daemons' async contexts)
async def _at_nice(nice: int) -> AsyncIterator[None]:
    """The calling thread (the toolstack's) at ``nice`` for the block, where it can come back
    from it afterwards (root): rootless, it stays as it is."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if os.geteuid() != 0 or nice <= before:
        yield
        return
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


async def nursery_xs(nursery: trio.Nursery, path: str) -> Any:
    """A XenStore connection that lives as long as ``nursery`` (it redials after a xenstored
    restart)."""
    ready = trio.Event()
    holder: list[Any] = []

    async def hold() -> None:
        async with open_xenstore(path, reconnect=True) as xs:
            holder.append(xs)
            ready.set()
            await trio.sleep_forever()
    nursery.start_soon(hold)
    await ready.wait()
    return holder[0]


SPARE_DELAY = 0.5  # after a takeover, the next spare starts once recovery has had the CPUs
SPARE_START_TIMEOUT = 30.0  # seconds a spare may take to come up
# Seconds a spare starts at SCHED_IDLE: on a host whose CPUs are busy it would get none
# (seen at 8 s and more with fio on both cores), so it goes on at normal priority then.
SPARE_IDLE_GRACE = 2.0
STANDBY_TIMEOUT = 5.0  # seconds the frontends may take to stand by with a spare
FRONTEND_TIMEOUT = 10.0  # seconds a spare's staging waits for the frontends to connect


@dataclass
class Spare:
    """A warm spare: a driver domain already started that takes over the devices of its
    predecessor the moment that one dies. Their backend halves are written for it
    beforehand (``staged``: (kind, frontend, devid)), so that its backends wait at InitWait
    for the frontends, which a takeover only points at it."""
    domid: int
    name: str
    process: Any
    stats: str  # its statistics socket while it stands by: the domain's once it takes over
    staged: set[tuple[str, int, int]] = field(default_factory=set)
    staging_done: bool = False
    standby: set[tuple[str, int, int]] = field(default_factory=set)  # staged on a standby link
    standing_by: bool = False  # the frontends' standby links to it are up (or given up on)
    takeover_ports: list[Any] = field(default_factory=list)  # dom0's ends, on those links
    # the devices whose takeover channels the hypervisor notifies when the active domain dies
    notified: set[tuple[str, int, int]] = field(default_factory=set)
    took_over: bool = False


def _devices_of(system: System, name: str) -> list[tuple[DevicePaths, dict[str, Any]]]:
    """The devices driver domain ``name`` serves (backend domid 0: to be filled in) and the
    keys add_vbd or add_vif writes for each."""
    devices: list[tuple[DevicePaths, dict[str, Any]]] = []
    for guest in system.guests.values():
        devices += [(DevicePaths("vbd", guest.domid, 0, disk.devid),
                     {"target": disk.target, "mode": disk.mode, "vdev": disk.vdev})
                    for disk in guest.disks if disk.backend == name]
        devices += [(DevicePaths("vif", guest.domid, 0, devid),
                     {"mac": vif.mac, "bridge": vif.bridge, "ip": vif.ip})
                    for devid, vif in guest.vifs.items() if vif.backend == name]
    return devices


async def _hand_over(system: System, name: str, old: int | None, domid: int,
                     staged: set[tuple[str, int, int]] | None = None,
                     on_standby: set[tuple[str, int, int]] | None = None) -> None:
    """Write (or move, after a crash) the devices of driver domain ``name`` to ``domid``.
    Devices ``staged`` for it (a warm spare) only have their frontends pointed at it, all in
    one pipeline (``on_standby``: those whose frontends stand by with it); what was staged
    for a device removed since goes."""
    xs, staged = system.xs, staged or set()
    switches = []
    for paths, keys in _devices_of(system, name):
        key = (paths.kind, paths.frontend_domid, paths.devid)
        previous = dataclasses.replace(paths, backend_domid=old) if old is not None else None
        replaces = previous.backend if previous is not None else None
        if previous is not None and key in staged:
            switches.append((previous, dataclasses.replace(paths, backend_domid=domid),
                             key in (on_standby or ())))
            staged.discard(key)
        elif paths.kind == "vbd":
            await add_vbd(xs, backend=domid, frontend=paths.frontend_domid, devid=paths.devid,
                          replaces=replaces, **keys)
        else:
            await add_vif(xs, backend=domid, frontend=paths.frontend_domid, devid=paths.devid,
                          replaces=replaces, **keys)
    if switches:
        await switch_backends(xs, switches)
    for kind, frontend, devid in staged:
        with contextlib.suppress(XenStoreError):
            await xs.rm(DevicePaths(kind, frontend, domid, devid).backend)
    await _discard_staged(system, domid, staged)
    if old is not None and old != domid:
        # The dead domain's own directory goes too, as libxl removes a destroyed domain's
        # (its device directories went above): else four nodes stayed for every restart.
        with contextlib.suppress(XenStoreError):
            await xs.rm(f"/local/domain/{old}")


async def _until_ready(sock: Any, pid: int) -> None:
    """Until the process ``pid`` (or one of its own) says READY=1 on ``sock``."""
    while ("READY", "1") not in await receive_notification(sock, pid):
        pass


async def _discard_staged(system: System, spare: int, staged: set[tuple[str, int, int]]) -> None:
    """The frontends' standby directories made for a spare that will not take over, and
    their ``standby`` keys where those still name them (left naming a dead spare's, they
    had blkfront try it again and again until the next spare's staging)."""
    slots = [DevicePaths(kind, frontend, spare, devid) for kind, frontend, devid in staged if kind == "vbd"]
    # (A pipeline returns each request's error: a node gone already is passed over.)
    with contextlib.suppress(XenStoreError):
        pointers = await system.xs.pipeline([(Op.READ, W.join(f"{paths.frontend}/standby"), 0) for paths in slots])
        await system.xs.pipeline(
            [(Op.RM, W.join(paths.standby), 0) for paths in slots]
            + [(Op.RM, W.join(f"{paths.frontend}/standby"), 0)
               for paths, pointer in zip(slots, pointers) if pointer == paths.standby.encode()])


async def _stage(system: System, name: str, spare: Spare) -> None:
    """Write the devices of driver domain ``name`` for its warm spare (see :class:`Spare`).
    A device that cannot be staged is handed over whole when the spare takes over."""
    current = system.driver_domids[name]
    try:
        for paths, keys in _devices_of(system, name):
            key = (paths.kind, paths.frontend_domid, paths.devid)
            if await stage_device(system.xs, dataclasses.replace(paths, backend_domid=spare.domid),
                                  current, **keys):
                spare.standby.add(key)
            spare.staged.add(key)
    except XenStoreError as exc:
        log.warning("devices not staged for the warm spare", extra={"kv": {
            "driver": name, "spare": spare.domid, "error": str(exc)}})
    spare.staging_done = True


async def _wait_connected(system: System, directories: list[str], timeout: float) -> None:
    """Until each of these device halves says Connected (or is gone), ``timeout`` at most.
    Woken by a watch on each state, not polling: a spare starts on CPUs the running
    domains use, and every wake-up of ours costs them."""
    with trio.move_on_after(timeout):
        for directory in directories:
            read = [(Op.READ, W.join(f"{directory}/state"), 0)]
            async with system.xs.watch_and(f"{directory}/state", read) as (events, replies):
                while present(replies)[0] not in (b"4", None):
                    try:
                        await events.receive()
                    except trio.EndOfChannel:  # the connection is gone for good (as blkfront)
                        raise XenStoreError("EIO", "watch ended") from None
                    replies = await system.xs.pipeline(read)


async def _wait_frontends(system: System, name: str) -> None:
    """Until the frontends of ``name``'s vbds are connected (the first spare starts with
    the guests), so that a spare's staging knows what they offer (``feature-standby``)."""
    await _wait_connected(system, [paths.frontend for paths, _ in _devices_of(system, name)
                                   if paths.kind == "vbd"], FRONTEND_TIMEOUT)


async def _wait_standing_by(system: System, spare: Spare, active: int | None) -> None:
    """Until the frontends stand by with the spare: the backends staged for it on a
    standby link say Connected. A frontend that does not in time costs only a slower
    takeover. ``active``: the driver domain the spare would take over from."""
    await _wait_connected(system, [DevicePaths(kind, frontend, spare.domid, devid).backend
                                   for kind, frontend, devid in list(spare.standby)], STANDBY_TIMEOUT)
    await _bind_takeover_channels(system, spare, active)
    _normal_priority(spare.process)  # it started at SCHED_IDLE: ready to serve now
    spare.standing_by = True
    system._spare_stands_by()


async def _bind_takeover_channels(system: System, spare: Spare, active: int | None) -> None:
    """Bind the channels the frontends opened for dom0 on their standby links to the spare
    (TAKEOVER_KEY), so that a takeover tells them at once, and have the hypervisor notify
    them itself the moment the ``active`` driver domain's process has exited
    (``notify_on_death``): the frontends switch without waiting for the supervisor to wake
    and hear of it (:func:`_signal_takeover` tells them again then, for a hypervisor that
    could not). The port numbers are the guests' word: one that cannot be bound costs only
    that device the wait for XenStore's switch."""
    devices = sorted(spare.standby)
    slots = [DevicePaths(kind, frontend, spare.domid, devid) for kind, frontend, devid in devices]
    raws = await system.xs.read_many([f"{paths.standby}/{TAKEOVER_KEY}" for paths in slots])
    for device, paths, raw in zip(devices, slots, raws):
        try:
            port = int(raw or b"")
            if not 0 < port < 1 << 17:  # Xen's event channel ABI has at most 2^17 ports
                raise ValueError(f"port {port} out of range")
            bound = await system.dom0.events.bind_interdomain(paths.frontend_domid, port)
        except (ValueError, OSError) as exc:
            log.info("no takeover channel", extra={"kv": {"device": paths.standby, "error": str(exc)}})
            continue
        # (A takeover meanwhile closes the ports bound so far; start_spare closes the rest.)
        spare.takeover_ports.append(bound)
        if active is not None:
            try:
                await system.dom0.notify_on_death(active, bound.port)
                spare.notified.add(device)
            except OSError as exc:  # gone already: the supervisor's signal it is
                log.info("no death notice", extra={"kv": {"device": paths.standby, "error": str(exc)}})


def _signal_takeover(spare: Spare) -> None:
    """The spare takes over (the supervisor saw every process of the driver domain before
    it exit): its frontends switch to their standby links now, before the switch in
    XenStore lands (most heard it from the hypervisor already: one more is harmless)."""
    for port in spare.takeover_ports:
        port.notify()


async def _close_takeover_channels(spare: Spare) -> None:
    ports, spare.takeover_ports = spare.takeover_ports, []
    for port in ports:
        with contextlib.suppress(OSError):
            await port.close()


async def _let_go_of(system: System, spare: Spare) -> None:
    """A spare that will not take over: killed, and what was staged for it removed."""
    spare.process.kill()
    await _close_takeover_channels(spare)
    await _discard_staged(system, spare.domid, spare.staged)
    with contextlib.suppress(XenStoreError):
        await system.xs.rm(f"/local/domain/{spare.domid}")


async def _start_driver(system: System, name: str, sandboxed: bool, quiet: bool,
                        policy: RestartPolicy | None = None, warm_spare: bool = False) -> None:
    started_once = False
    generation = 0
    serves_net = system.driver_kinds.get(name) == "vif"
    program = [sys.executable, "-m", "ringfence", "netback" if serves_net else "blkback"]
    kwargs = {"stderr": subprocess.DEVNULL} if quiet else {}
    # A network driver domain creates TAPs and a bridge in its own network namespace: it
    # keeps root there (as a Linux driver domain is root in its own VM).
    group = system.cgroup_group
    sandbox = (_sandbox(name, sandboxed, group, uid=0 if serves_net else None)
               or SandboxSpec(name, namespaces=frozenset({"net"}) if serves_net else frozenset(),
                              group=group))
    uid = sandbox.uid if sandbox.uid is not None else sandbox_uid(name)
    stats = system.stats_socket(name, uid)
    staging = trio.Lock()  # a takeover waits for the staging of its spare's devices

    def teardown_of(domid: int, fd: int | None = None) -> Any:
        async def teardown() -> None:
            with contextlib.suppress(OSError):
                await system.dom0.destroy_domain(domid)
            if fd is not None:
                os.close(fd)
        return teardown

    async def start_spare(delay: float = 0.0) -> None:
        nonlocal generation
        await trio.sleep(delay)
        generation += 1
        spare_name = f"{name}.spare{generation}"
        domid, fd = await system.dom0.create_domain(spare_name)
        # Its own cgroup (the active one's goes with the active one), the same user.
        spec = dataclasses.replace(sandbox, name=spare_name, uid=uid, start_idle=True)
        # And its own notify socket: its READY=1 says it is up the moment it is (and none of
        # its messages go to whoever started the toolstack, systemd say).
        notify_dir = os.path.join(system.runtime_dir, "notify")
        os.makedirs(notify_dir, mode=0o755, exist_ok=True)
        notify_path = os.path.join(notify_dir, f"{spare_name}.sock")
        notify = None
        try:
            notify = notify_socket(notify_path, spec)
            spare_stats = os.path.join(os.path.dirname(stats), f"spare{generation}.sock")
            env = dict(os.environ, **{DOMAIN_FD_ENV: str(fd), STATS_SOCKET_ENV: spare_stats,
                                      "NOTIFY_SOCKET": notify_path})
            process = await spawn_sandboxed(spec, program, pass_fds=(fd,), env=env,
                                            launcher=system.launcher_for(serves_net), **kwargs)
        except BaseException:
            close_notify_socket(notify, notify_path)
            with contextlib.suppress(OSError):
                await system.dom0.destroy_domain(domid)
            raise
        finally:
            os.close(fd)
        spare = system.spares[name] = Spare(domid, spare_name, process, spare_stats)
        system.nursery.start_soon(replace_if_dead, spare)
        # It started at SCHED_IDLE, and stays there until it stands by: its start-up and
        # its side of the frontends' standby links take only CPU the running domains leave.
        # Then it runs at normal priority, to serve at once when it takes over (which also
        # raises it: prepare). On a host whose CPUs stay busy it would get no CPU at all,
        # so it goes to normal priority SPARE_IDLE_GRACE after its start in any case.
        grace = trio.CancelScope()
        system.nursery.start_soon(_normal_priority_after, SPARE_IDLE_GRACE, process, grace)

        def standing() -> bool:
            """Still the spare: one that took over before it was ready (a crash while it
            started) has its devices handed over whole, and is the active domain now."""
            return system.spares.get(name) is spare

        await _wait_frontends(system, name)
        async with staging:
            if standing():
                await _stage(system, name, spare)
        try:
            with trio.move_on_after(SPARE_START_TIMEOUT):
                await _until_ready(notify, process.pid)
        finally:
            close_notify_socket(notify, notify_path)
        if standing():
            await _wait_standing_by(system, spare, system.driver_domids.get(name))
        grace.cancel()
        if not spare.standing_by:  # (standing by raised it: _wait_standing_by)
            _normal_priority(process)
        if standing():
            return
        if spare.standing_by:  # it took over while the frontends stood by: no channels kept
            await _close_takeover_channels(spare)
        elif spare.took_over:  # as it started: up only now, its statistics are the domain's
            with contextlib.suppress(OSError):
                os.replace(spare.stats, stats)

    async def replace_if_dead(spare: Spare) -> None:
        """A spare that dies before it takes over: what was staged for it goes (the
        frontends let go of their standby links), and another one starts."""
        await spare.process.wait()
        if system.spares.get(name) is not spare:
            return  # it took over (the supervisor has it now), or was let go of
        del system.spares[name]
        log.warning("warm spare died; starting another", extra={"kv": {"driver": name, "spare": spare.domid}})
        with trio.CancelScope(shield=True):
            async with staging:
                await _let_go_of(system, spare)
            with contextlib.suppress(OSError):
                await system.dom0.destroy_domain(spare.domid)
        system.nursery.start_soon(start_spare, SPARE_DELAY)

    async def prepare() -> Launch:
        nonlocal started_once
        old = system.driver_domids.get(name) if started_once else None
        if sandboxed and os.geteuid() == 0:
            # The driver domain runs as its own unprivileged user: give it its disks.
            for guest in system.guests.values():
                for disk in guest.disks:
                    if disk.backend == name:
                        os.chown(disk.target, uid, -1)
        spare = system.spares.pop(name, None) if started_once else None
        if spare is not None and spare.process.process.poll() is None:
            # Warm: the spare takes the name and the devices; a new spare starts behind it.
            # The frontends standing by with it hear it first; the dead domain's teardown
            # goes on meanwhile (a frontend that hears of it only through XenStore ends its
            # grants once the hypervisor has dropped its mappings, trying again meanwhile).
            _signal_takeover(spare)
            _normal_priority(spare.process)
            spare.took_over = True
            system.driver_domids[name] = spare.domid
            # Its statistics are the domain's from now: the guests' I/O may be on it already.
            # (A spare not up yet gets its socket renamed by start_spare once it is.)
            with contextlib.suppress(OSError):
                os.replace(spare.stats, stats)
            async with trio.open_nursery() as nursery, staging:  # the name is not on a guest's path
                nursery.start_soon(_rename_taking_over, system, spare, name)
                await _hand_over(system, name, old, spare.domid, spare.staged, spare.standby)
            system.nursery.start_soon(_close_takeover_channels, spare)
            system.nursery.start_soon(start_spare, SPARE_DELAY)
            return Launch(program, teardown=teardown_of(spare.domid), adopt=spare.process)
        await service.wait_torn_down()
        if spare is not None:
            await _let_go_of(system, spare)
        domid, fd = await system.dom0.create_domain(name)
        system.driver_domids[name] = domid
        await _hand_over(system, name, old, domid)
        started_once = True
        if warm_spare and name not in system.spares:
            system.nursery.start_soon(start_spare)
        env = dict(os.environ, **{DOMAIN_FD_ENV: str(fd), STATS_SOCKET_ENV: stats})
        return Launch(program, pass_fds=(fd,), env=env, teardown=teardown_of(domid, fd), kwargs=kwargs,
                      launcher=system.launcher_for(serves_net))

    service = Service(name, prepare, sandbox, policy or RestartPolicy(initial_delay=0.01, watchdog=None),
                      runtime_dir=os.path.join(system.runtime_dir, "notify"))
    service.overlaps_teardown = True
    # A spare standing by takes over on the hypervisor's notice that the killed domain has
    # begun to exit, not at its death: that exit then takes its turn among the rest.
    service.death_awaited = lambda: not system.takes_over_on_notice(name)

    def on_state(svc: Service) -> None:
        if svc.state.value == "ready" and svc.last_recovery_ms is not None and svc.starts > 1:
            system.recoveries.append((svc.name, svc.last_recovery_ms))
        if svc.state.value == "failed" and system.nursery is not None:
            system.nursery.start_soon(_mark_failed, system, svc.name,
                                      f"driver domain {svc.name} failed: start limit "
                                      f"({svc.policy.burst} starts in {svc.policy.interval:.0f} s)")

    service.on_state = on_state
    system.drivers[name] = await system.supervisor.add(service)
    with trio.fail_after(30):
        await service.wait_ready()


async def _mark_failed(system: System, name: str, reason: str) -> None:
    """The supervisor gave up on a driver domain: its devices' backends are marked failed
    (``hotplug-error`` and Closed, as libxl does on a failed hotplug), so that frontends
    fail their I/O instead of waiting for a backend that will not come."""
    domid = system.driver_domids.get(name)
    if domid is None or system.xs is None:
        return
    log.error("devices marked failed", extra={"kv": {"driver": name, "reason": reason}})
    spare = system.spares.pop(name, None)
    if spare is not None:
        # The frontends standing by with it switched to it when the hypervisor saw the
        # death that hit the limit: it goes too, so that they fail over to the devices
        # marked failed here rather than run on a driver domain nobody supervises.
        await _let_go_of(system, spare)
    base = f"/local/domain/{domid}/backend"
    for guest in system.guests.values():
        devices = [("vbd", d.devid) for d in guest.disks if d.backend == name]
        devices += [("vif", devid) for devid, v in guest.vifs.items() if v.backend == name]
        for kind, devid in devices:
            path = f"{base}/{kind}/{guest.domid}/{devid}"
            with contextlib.suppress(XenStoreError):
                async for tx in system.xs.transaction():
                    async with tx:
                        await tx.write(f"{path}/hotplug-error", reason)
                        await tx.write(f"{path}/state", str(int(XenbusState.Closed)))


async def _write_guest_devices(system: System, xs: Any, guest: Guest) -> None:
    """A new guest's devices, served by the driver domains running now."""
    for disk in guest.disks:
        if system.sandboxed and os.geteuid() == 0:
            os.chown(disk.target, sandbox_uid(disk.backend), -1)
        await add_vbd(xs, backend=system.driver_domids[disk.backend], frontend=guest.domid,
                      devid=disk.devid, target=disk.target, mode=disk.mode, vdev=disk.vdev)
    for devid, vif in guest.vifs.items():
        await add_vif(xs, backend=system.driver_domids[vif.backend], frontend=guest.domid,
                      devid=devid, mac=vif.mac, bridge=vif.bridge, ip=vif.ip)


async def _start_guest(system: System, guest: Guest, sandboxed: bool, quiet: bool) -> None:
    fd = guest._fd  # type: ignore[attr-defined]
    # The guest's own directory: a sandboxed guest may run as its own user and must create
    # its NBD sockets there.
    home = system.guest_home(guest)
    os.makedirs(home, mode=0o755, exist_ok=True)
    # A guest is root in its own namespaces (as a guest kernel owns its NICs): it creates
    # its ethN TAPs there, including those attached later.
    needs_root = True
    argv = [sys.executable, "-m", "ringfence", "guest", "--nbd-dir", home]
    for disk in guest.disks:
        guest.nbd_sockets[disk.vdev] = os.path.join(home, f"{disk.vdev}.sock")
    env = dict(os.environ, **{DOMAIN_FD_ENV: str(fd), STATS_SOCKET_ENV: system.stats_socket(guest.name, None)})
    ready = os.path.join(home, "ready")
    with open(ready, "wb") as out:
        kwargs: dict[str, Any] = {"stdout": out}
        if quiet:
            kwargs["stderr"] = subprocess.DEVNULL
        group = system.cgroup_group
        spec = (_sandbox(guest.name, sandboxed, group, uid=0 if needs_root else None)
                or SandboxSpec(guest.name, namespaces=frozenset({"net"}), uid=0, group=group))
        boxed = await spawn_sandboxed(spec, argv, pass_fds=(fd,), env=env,
                                      launcher=system.launcher_for(bool(guest.vifs)), **kwargs)
        guest.process = boxed.process
    os.close(fd)
    with trio.fail_after(60):
        while b"guest ready" not in open(ready, "rb").read():
            if guest.process.poll() is not None:
                raise RuntimeError(f"guest {guest.name} exited during start")
            await trio.sleep(0.02)


def guest_pid(guest: Guest) -> int:
    """The guest's own process (inside its namespaces), for nsenter."""
    return innermost_pid(guest.process.pid)


async def _rename_taking_over(system: System, spare: Spare, name: str) -> None:
    try:
        await system.dom0.rename_domain(spare.domid, name)
    except OSError as exc:
        # It died as it took over: the supervisor, which has it now, restarts it cold.
        log.warning("spare gone as it took over", extra={"kv": {"driver": name, "spare": spare.domid,
                                                                "error": str(exc)}})


async def _normal_priority_after(seconds: float, process: SandboxedProcess,
                                 scope: trio.CancelScope) -> None:
    with scope:
        await trio.sleep(seconds)
        _normal_priority(process)


def _normal_priority(process: SandboxedProcess) -> None:
    """Every thread of a spare runs at normal priority again (it started at SCHED_IDLE)."""
    if process.process.poll() is not None:
        return
    pid = innermost_pid(process.pid)
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))
