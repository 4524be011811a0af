"""``ringfence bench recovery``: how long a storage driver domain crash is visible.

A host with two storage driver domains: ``stor`` serves the victim guest, ``stor2`` the
bystander. A probe reads the victim's disk one 4 KiB block at a time over NBD (its own
minimal NBD client, so that nothing but the I/O path is timed), a read every millisecond,
while ``stor`` is killed with -9 again and again: each kill's recovery time is kill → the
first read completed after it (the supervisor relaunches the domain, the backend runs the
handshake, blkfront reconnects and replays). Meanwhile fio reads the bystander's disk,
reporting twice a second. The kills come in short blocks (one every 0.6 s), with blocks
without kills in between; the
bystander's IOPS inside blocks of kills (every I/O over all their time), against its IOPS
inside blocks without (the probe running throughout), shows containment. The budgets
are the goals' (p99 at most 200 ms cold, 20 ms with a warm spare; bystander at least
95 %). The run is done twice: cold (each kill relaunches the driver domain) and warm (a
spare driver domain, started beforehand, takes over and a new spare starts behind it).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import trio

from ringfence.bench.report import Metric
from ringfence.isolation.spawn import popen_dying_with_us

CONFIG = """
[[domain]]
name = "stor"
kind = "driver"

[[domain]]
name = "stor2"
kind = "driver"

[[domain]]
name = "victim"
kind = "guest"
disks = ["target={dir}/victim.img,vdev=xvda,backend=stor"]

[[domain]]
name = "bystander"
kind = "guest"
disks = ["target={dir}/bystander.img,vdev=xvda,backend=stor2"]
"""
DISK = 64 << 20


# The probe's reads, in a process of its own: in the toolstack's (this one) a completion
# was seen late, by up to a GIL switch interval, whenever the toolstack was busy, which
# it is during a takeover. One record per read: submitted, completed (CLOCK_MONOTONIC,
# as time.monotonic() here), failed.
PROBE = """
import random, socket, struct, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.settimeout(30)
out = sys.stdout.buffer

def recv(n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SystemExit("NBD server closed the connection")
        data += chunk
    return data

magic, opt_magic, _ = struct.unpack(">QQH", recv(18))
if magic != 0x4E42444D41474943 or opt_magic != 0x49484156454F5054:
    raise SystemExit("not a fixed-newstyle NBD server")
sock.sendall(struct.pack(">I", 1))  # NBD_FLAG_C_FIXED_NEWSTYLE
sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # NBD_OPT_EXPORT_NAME ""
size, _ = struct.unpack(">QH", recv(10))
recv(124)
out.write(struct.pack("<Q", size))
out.flush()
handle, blocks, pace = 0, size // 4096, float(sys.argv[2])
submitted = 0.0
while True:
    handle += 1
    gap = submitted + pace - time.monotonic()
    if gap > 0:
        time.sleep(gap)
    submitted = time.monotonic()
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, handle, random.randrange(blocks) * 4096, 4096))
    magic, error, _ = struct.unpack(">IIQ", recv(16))
    if magic != 0x67446698:
        raise SystemExit("bad NBD reply")
    recv(4096)
    out.write(struct.pack("<ddB", submitted, time.monotonic(), error != 0))
    out.flush()
"""
RECORD = struct.Struct("<ddB")
# A read issued at most every millisecond: a steady guest, not one that takes every cycle it
# can get. An unpaced probe took half the host's CPU and pushed the bystander's path into
# a read-per-wake-up mode at a quarter of its rate for seconds at a time, which fell on
# blocks with and without kills unevenly (the ratio swung by ±8 %). A recovery longer than
# the pace is measured as before: the read in flight at the kill, or the next, waits for it.
PROBE_PACE = 0.001


class NbdProbe:
    """One read at a time through NBD, completion times recorded: a process of its own
    (see PROBE), whose records a thread here reads."""

    def __init__(self, path: str) -> None:
        # (Killed, the benchmark takes the probe and fio with it: left behind, they spun on
        # their dead NBD sockets and slowed whatever ran next.)
        self.process = popen_dying_with_us([sys.executable, "-c", PROBE, path, str(PROBE_PACE)],
                                           stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        (self.size,) = struct.unpack("<Q", self._read(8))
        self.completions: list[tuple[float, float]] = []  # (submitted, completed)
        self.errors = 0
        self._completed = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="nbd-probe", daemon=True)

    def _read(self, n: int) -> bytes:
        assert self.process.stdout is not None
        data = self.process.stdout.read(n)
        if len(data) < n:
            raise ConnectionError(f"the probe stopped (status {self.process.poll()})")
        return data

    def _loop(self) -> None:
        try:
            while True:
                submitted, completed, failed = RECORD.unpack(self._read(RECORD.size))
                self.errors += failed
                with self._completed:
                    self.completions.append((submitted, completed))
                    self._completed.notify_all()
        except ConnectionError:
            pass

    def first_completion(self, issued_after: float, done_after: float, timeout: float) -> float:
        """When the first read issued after ``issued_after`` and completed after ``done_after``
        completed (waits for it without polling: the benchmark must not take the CPU it
        measures the system without)."""
        deadline = time.monotonic() + timeout
        with self._completed:
            while True:
                done = []
                for issued, completed in reversed(self.completions):  # in the order issued
                    if issued <= issued_after:
                        break
                    if completed > done_after:
                        done.append(completed)
                if done:
                    return min(done)
                if not self._completed.wait(deadline - time.monotonic()):
                    raise TimeoutError("no read completed after the kill")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.thread.join(timeout=30)


class FioSeries:
    """fio reading the bystander's disk in one run, reporting twice a second (fio's
    --status-interval): no restart between windows, nothing but the I/O. A thread reads
    fio's reports and stamps each with when it came (CLOCK_MONOTONIC, as time.monotonic()
    here), so that each interval between two reports can be placed in time."""

    INTERVAL = 0.5  # seconds between reports

    def __init__(self, uri: str) -> None:
        self.process = popen_dying_with_us(
            ["fio", "--name=bystander", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
             "--bs=4k", "--iodepth=8", "--runtime=3600", "--time_based", "--thread",
             f"--status-interval={int(self.INTERVAL * 1000)}ms", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # (came at, total ios, job runtime in ms), cumulative
        self.samples: list[tuple[float, int, int]] = []
        self.thread = threading.Thread(target=self._read, name="fio-reports", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        decoder, text = json.JSONDecoder(), ""
        for chunk in iter(lambda: self.process.stdout.read(4096), ""):  # type: ignore[union-attr]
            came = time.monotonic()
            text += chunk
            while (start := text.find("{")) >= 0:
                try:
                    report, end = decoder.raw_decode(text, start)
                except ValueError:
                    break  # not whole yet
                text = text[end:]
                job = report["jobs"][0]
                self.samples.append((came, int(job["read"]["total_ios"]), int(job["job_runtime"])))

    def intervals_within(self, windows: list[tuple[float, float]]) -> list[tuple[int, int]]:
        """(ios, ms of fio's runtime) of each interval between reports that lies wholly
        inside one of ``windows`` ((start, end) times): an interval is (the report before it
        came, its own came]."""
        samples = list(self.samples)
        return [(ios_b - ios_a, ms_b - ms_a)
                for (began, ios_a, ms_a), (came, ios_b, ms_b) in zip(samples, samples[1:])
                if ms_b > ms_a and any(start <= began and came <= end for start, end in windows)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.thread.join(timeout=30)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# Seconds of kills, then as many without, and again: shorter than the host's own swings
# (the bystander alone runs at a third more or less for several seconds at a time, with
# the same CPU time), so that they fall on both kinds of block alike.
BLOCK = 1.5
# Seconds from one kill to the next inside a block (plus up to KILL_JITTER, so that a kill
# falls at any point of the I/O): as often as a warm spare can take over (its successor
# starts SPARE_DELAY after a takeover and is ready some 0.1 s later), and the same cold, so
# that the two bystander ratios are for the same rate of crashes. Each crash costs the host
# some 50 ms of CPU cold (the new domain's start, xenstored, the toolstack, the hypervisor,
# the guest's reconnection), 65-80 ms warm (the takeover and the next spare's start): the
# ratio falls with the rate (cold at a kill every 0.3 s, 0.93 to 0.97).
KILL_PERIOD = 0.6
KILL_JITTER = 0.1
# Kills each way: the issue asks for at least 50, but a p99 of 50 is their slowest (of 100,
# the second slowest), and one hiccup of the host's (its own reads, with nothing killed,
# reach 20 ms under this load) would stand for the whole tail. Twice as many also halve
# the variance of the bystander's ratio.
KILLS = 100
WARM_UP = 6.0  # seconds of fio before the first block
SETTLE_TIMEOUT = 30.0  # seconds a kill's recovery (and, warm, its next spare) may take


async def _measure(quick: bool, warm: bool, progress: Callable[[str], None],
                   kills: int | None = None) -> tuple[list[float], float, float]:
    """Kill ``stor`` repeatedly; returns the recovery times (ms) and the bystander's IOPS
    during the kills and without them (I/Os over the time of the half-second intervals
    inside blocks of each kind)."""
    from ringfence.isolation.supervisor import RestartPolicy
    from ringfence.toolstack.config import load
    from ringfence.toolstack.system import open_system
    kills = kills or (10 if quick else KILLS)
    label = "warm" if warm else "cold"
    runtime = f"/run/ringfence-bench-recovery-{os.getpid()}"
    os.makedirs(runtime, exist_ok=True)
    for name in ("victim", "bystander"):
        with open(os.path.join(runtime, f"{name}.img"), "wb") as f:
            f.truncate(DISK)
    config_path = os.path.join(runtime, "host.toml")
    with open(config_path, "w") as f:
        f.write(CONFIG.format(dir=runtime))
    config = load(config_path, runtime)
    # Every kill is a crash to recover from at once: no backoff, no start limit.
    policy = RestartPolicy(initial_delay=0.0, stable_after=0.0, burst=10 * kills + 10, watchdog=None)
    recoveries: list[float] = []
    try:
        async with open_system(config, runtime, driver_policy=policy, warm_spares=warm) as system:
            victim = system.guests["victim"].nbd_sockets["xvda"]
            bystander_uri = f"nbd+unix:///?socket={system.guests['bystander'].nbd_sockets['xvda']}"
            # The victim's probe runs throughout, so that the only difference between the
            # intervals compared is the kills (on two cores its I/O alone costs the bystander).
            probe = NbdProbe(victim)
            probe.start()
            fio = FioSeries(bystander_uri)
            service = system.drivers["stor"]

            async def settled() -> None:
                """Until the victim's driver domain serves (and, warm, its next spare is
                ready): what a kill costs ends there."""
                with trio.move_on_after(SETTLE_TIMEOUT):
                    await service.wait_ready()
                    if warm:
                        await system.wait_spare_ready("stor")
                    return
                spare = system.spares.get("stor")
                raise RuntimeError(
                    f"stor not settled {SETTLE_TIMEOUT:g} s after kill {len(recoveries)}: "
                    f"service {service.state.value}, spare " + (
                        "none" if spare is None else f"{spare.name} staging_done={spare.staging_done} "
                        f"standing_by={spare.standing_by} alive={spare.process.process.poll() is None}"))

            last_kill = -KILL_PERIOD

            async def kill_once() -> None:
                nonlocal last_kill
                await trio.sleep_until(last_kill + KILL_PERIOD + random.random() * KILL_JITTER)
                await settled()
                last_kill = trio.current_time()
                crashes = service.crashes
                # A recovery is timed from the first SIGKILL. From the moment the signal
                # had gone to every process of the domain's cgroup, none of them runs
                # another instruction of its own, so a read issued from then on is the
                # next domain's to serve. (Not "completed once the supervisor has seen the
                # death": a warm takeover does not wait for the supervisor, whose wake-up
                # on a busy host came up to 50 ms late.) Both instants are read at the
                # killer's real-time priority: this thread, at the control plane's nice
                # value, ran again after kill() up to 14 ms later on busy CPUs, and before
                # it up to 7 ms later, and all of that counted as recovery.
                kill = service.kill()
                if kill is None:
                    raise RuntimeError("stor was not running when it was to be killed")
                killed, signalled = kill.started, kill.signalled
                with trio.fail_after(30):
                    # Both waits sleep until woken: no polling beside the recovery.
                    await service.wait_for(lambda s: s.crashes != crashes)
                first = await trio.to_thread.run_sync(probe.first_completion, signalled, signalled, 30.0)
                recoveries.append((first - killed) * 1000)
                progress(f"{label}: kill {len(recoveries)}/{kills}: first read after {recoveries[-1]:.1f} ms")

            # Blocks of kills and blocks without, in turn, fio running throughout: the host's
            # own drift (whole seconds at a third less, seen with no kill at all) then falls
            # on both alike. A block of kills ends once the last kill's recovery (and, warm,
            # its new spare's start-up) is over, so that a block without has none of it.
            progress(f"{label}: {kills} kills in blocks of {BLOCK:g} s (one every {KILL_PERIOD:g} s), "
                     "between blocks without; "
                     "fio 4 KiB randread qd8 on the bystander throughout")
            # Connected, and past the first seconds of a fresh system, slower for a while
            # (seen at a third of the rate for up to 4 s): not counted.
            await trio.sleep(WARM_UP)
            with_kills: list[tuple[float, float]] = []
            without: list[tuple[float, float]] = []
            while True:
                began = time.monotonic()
                # As long as the block of kills before it (which runs on until the last
                # recovery is over): both kinds get the same time, and the ratio's error
                # is not set by the shorter one.
                await trio.sleep(with_kills[-1][1] - with_kills[-1][0] if with_kills else BLOCK)
                without.append((began, time.monotonic()))
                if len(recoveries) == kills:
                    break
                began = time.monotonic()
                while len(recoveries) < kills and time.monotonic() - began < BLOCK:
                    await kill_once()
                await settled()
                with_kills.append((began, time.monotonic()))
            await trio.sleep(FioSeries.INTERVAL * 2)  # the last block's last report
            during, alone = fio.intervals_within(with_kills), fio.intervals_within(without)
            await trio.to_thread.run_sync(fio.stop)
            if not during or not alone:
                raise RuntimeError("fio reported no whole interval inside a block")
            progress(f"{label}: bystander iops without kills {_rates(alone)}, during the kills {_rates(during)}")
            progress(f"{label}: bystander ratio {_iops(during) / _iops(alone):.3f} "
                     f"± {_ratio_error(during, alone):.3f} (one standard error, from "
                     f"{len(during)} and {len(alone)} intervals)")
            seconds_with_kills = sum(end - start for start, end in with_kills)
            progress(f"{label}: each kill cost the bystander "
                     f"{_cost_per_kill(during, alone, seconds_with_kills, len(recoveries)):.0f} ms "
                     "of its I/O time")
            await trio.to_thread.run_sync(probe.stop)
            if probe.errors:
                raise RuntimeError(f"the victim saw {probe.errors} I/O errors across the kills")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    progress(f"{label}: p50 {statistics.median(recoveries):.1f} ms, "
             f"p99 {_percentile(recoveries, 0.99):.1f} ms over {len(recoveries)} kills")
    # Throughput is I/Os over time, every interval counted: a stall the kills cause weighs
    # what it cost (a median of intervals would pass over a few slow ones).
    return recoveries, _iops(during), _iops(alone)


def _iops(intervals: list[tuple[int, int]]) -> float:
    return sum(ios for ios, _ in intervals) * 1000 / sum(ms for _, ms in intervals)


def _rates(intervals: list[tuple[int, int]]) -> list[int]:
    return [round(ios * 1000 / ms) for ios, ms in intervals]


def _cost_per_kill(during: list[tuple[int, int]], alone: list[tuple[int, int]],
                   seconds_with_kills: float, kills: int) -> float:
    """What each kill cost the bystander, in ms of its own I/O time: the I/Os it did not
    do in the blocks of kills, at its rate without. Unlike the ratio, it does not depend
    on how often the kills come."""
    return (1 - _iops(during) / _iops(alone)) * seconds_with_kills * 1000 / max(kills, 1)


def _ratio_error(during: list[tuple[int, int]], alone: list[tuple[int, int]]) -> float:
    """The standard error of during/alone, from the spread of the intervals' rates (the
    host's own noise: a run's ratio is good to about this much)."""
    def relative_error(intervals: list[tuple[int, int]]) -> float:
        rates = [ios / ms for ios, ms in intervals]
        if len(rates) < 2:
            return float("inf")
        return statistics.stdev(rates) / len(rates) ** 0.5 / statistics.fmean(rates)
    return _iops(during) / _iops(alone) * (relative_error(during) ** 2 + relative_error(alone) ** 2) ** 0.5


async def _run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    cold, during, alone = await _measure(quick, False, progress)
    warm, during_warm, alone_warm = await _measure(quick, True, progress)
    return [Metric("kill_to_io_p50_cold", statistics.median(cold), 200.0, "ms", "<=1.0"),
            Metric("kill_to_io_p99_cold", _percentile(cold, 0.99), 200.0, "ms", "<=1.0"),
            Metric("kill_to_io_p50_warm", statistics.median(warm), 20.0, "ms", "<=1.0"),
            Metric("kill_to_io_p99_warm", _percentile(warm, 0.99), 20.0, "ms", "<=1.0"),
            Metric("bystander_throughput", during, alone, "iops", ">=0.95"),
            Metric("bystander_throughput_warm", during_warm, alone_warm, "iops", ">=0.95")]


def run(quick: bool, progress: Callable[[str], None]) -> list[Metric]:
    if os.geteuid() != 0:
        raise RuntimeError("the recovery benchmark sandboxes driver domains: run it as root")
    if not shutil.which("fio"):
        raise RuntimeError("the recovery benchmark needs fio (apt-get install fio)")
    return trio.run(_run, quick, progress)
