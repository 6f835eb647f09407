"""What the coordinator reads from /proc: server RSS and CPU time, host CPU steal, machine facts.

Theory of operation
-------------------
The server under test is a process tree (imserver may run helper processes
or threads; threads are included in a process's own counters). ``ServerProbe``
sums VmRSS (``/proc/<pid>/status``) and utime+stime (``/proc/<pid>/stat``,
in clock ticks) over the root pid and its live descendants, read at scenario
phase boundaries only, never on the hot path. CPU time per delivered message
is then (CPU delta) / (messages), the "server CPU per message" of the bench
notes. ``HostCpu`` samples the first line of ``/proc/stat``: the share of
time stolen by the hypervisor, and the host's busy time, from which the CPU
used by *other* processes during a measurement (other tenants of the shared
machine: ``foreign_cpu_pct``) is derived, to tell a slow server from a busy
neighbour.

What makes figures comparable across hosts (``MachineInfo``, recorded with
every run): the CPU model and clock, a fixed single-thread Python workload
timed on this host (``calibrate``: the best of ``CALIBRATION_ROUNDS``, in
microseconds; a host where it takes twice as long will show about half the
throughput), and the latency of a durable 4 KiB append to the file system
the servers' data directories live on (``fsync_probe``: write +
``fdatasync``, what a WAL commit pays). Figures are still best compared as
ratios to the baselines measured in the same run.
Linux only; on other systems the probe reports zeros.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

PROC: Final = Path("/proc")
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CALIBRATION_ROUNDS: Final = 7
CALIBRATION_ITERATIONS: Final = 200_000
FSYNC_PROBES: Final = 40
FSYNC_BLOCK: Final = 4096


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            text = (task / "children").read_text()
            found.extend(int(child) for child in text.split())
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


class ServerProbe:
    """RSS and CPU of the server process tree (``pid`` None: unknown, all zeros)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def rss_bytes(self) -> int:
        if self.pid is None:
            return 0
        return sum(_rss_bytes(p) for p in process_tree(self.pid))

    def cpu_s(self) -> float:
        if self.pid is None:
            return 0.0
        return sum(_cpu_ticks(p) for p in process_tree(self.pid)) / CLOCK_TICKS

    def cpu_split_s(self) -> tuple[float, float]:
        """(root process, its live descendants) CPU seconds: imserver's own CPU apart from
        its worker plugin processes (children of ``serve --workers``)."""
        if self.pid is None:
            return 0.0, 0.0
        root = _cpu_ticks(self.pid)
        rest = sum(_cpu_ticks(p) for p in process_tree(self.pid)[1:])
        return root / CLOCK_TICKS, rest / CLOCK_TICKS


class HostCpu(NamedTuple):
    """The host's CPU counters (first line of /proc/stat), in clock ticks."""

    total: int
    tasks: int
    """user + nice + system: time running processes. Interrupt and softirq time is left
    out: on loopback much of it is our own TCP traffic, not attributed to any process."""
    steal: int

    @classmethod
    def sample(cls) -> HostCpu:
        try:
            first = (PROC / "stat").read_text().splitlines()[0].split()
        except OSError:
            return cls(0, 0, 0)
        values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
        return cls(sum(values), values[0] + values[1] + values[2], values[7])

    def steal_pct_since(self, earlier: HostCpu) -> float:
        total = self.total - earlier.total
        return round(100.0 * (self.steal - earlier.steal) / total, 1) if total > 0 else 0.0

    def busy_s_since(self, earlier: HostCpu) -> float:
        """CPU seconds spent running processes on this host (all cores)."""
        return (self.tasks - earlier.tasks) / CLOCK_TICKS


def foreign_cpu_pct(host0: HostCpu, host1: HostCpu, ours_s: float, wall_s: float) -> float:
    """CPU used by processes other than the server and the load workers, in % of one core:
    the noise from other tenants of a shared machine during a measurement."""
    if wall_s <= 0:
        return 0.0
    return round(max(0.0, 100.0 * (host1.busy_s_since(host0) - ours_s) / wall_s), 1)


class FsyncProbe(msgspec.Struct, frozen=True):
    directory: str
    p50_us: float
    p90_us: float
    cpu_us: float
    """CPU time (this process, user + system) per append + fdatasync."""


class MachineInfo(msgspec.Struct, frozen=True):
    nproc: int
    cpu_model: str
    mem_total_mb: int
    kernel: str
    python: str
    load_avg_1m: float
    cpu_mhz: float = 0.0
    """/proc/cpuinfo "cpu MHz" of the first CPU (0: not recorded)."""
    calibration_us: float = 0.0
    """``calibrate()``: the fixed Python workload's best time on this host (0: not recorded)."""
    fsync: FsyncProbe | None = None


def _calibration_workload() -> int:
    """Dict and integer work typical of an interpreter-bound server; fixed forever, so
    that its time compares hosts (do not change it: old runs would not compare)."""
    table: dict[int, int] = {}
    total = 0
    for i in range(CALIBRATION_ITERATIONS):
        table[i & 1023] = i
        total += table.get((i * 7) & 1023, 0) ^ i
    return total


def calibrate() -> float:
    """Microseconds the fixed workload takes on one thread here: best of
    ``CALIBRATION_ROUNDS`` (the best is the least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(CALIBRATION_ROUNDS):
        t0 = time.perf_counter()
        _calibration_workload()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e6, 1)


def fsync_probe(directory: str | None = None) -> FsyncProbe:
    """Latency of a 4 KiB append + ``fdatasync`` in ``directory`` (default: the temp
    directory, where the benchmark servers keep their data)."""
    where = directory or tempfile.gettempdir()
    block = os.urandom(FSYNC_BLOCK)
    walls: list[float] = []
    fd, path = tempfile.mkstemp(prefix="imbench-fsync-", dir=where)
    try:
        cpu0 = time.process_time()
        for _ in range(FSYNC_PROBES):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            walls.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
    finally:
        os.close(fd)
        os.unlink(path)
    deciles = statistics.quantiles(walls, n=10)
    return FsyncProbe(
        directory=where,
        p50_us=round(statistics.median(walls) * 1e6, 1),
        p90_us=round(deciles[-1] * 1e6, 1),
        cpu_us=round(cpu / FSYNC_PROBES * 1e6, 1),
    )


def machine_info() -> MachineInfo:
    model = "unknown"
    mhz = 0.0
    mem_mb = 0
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) // 1024
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return MachineInfo(
        nproc=os.cpu_count() or 0,
        cpu_model=model,
        mem_total_mb=mem_mb,
        kernel=platform.release(),
        python=sys.version.split()[0],
        load_avg_1m=round(load, 2),
        cpu_mhz=round(mhz, 1),
        calibration_us=calibrate(),
        fsync=fsync_probe(),
    )
