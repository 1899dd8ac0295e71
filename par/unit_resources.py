"""What a unit's processes use, read from the cgroup and /proc (psutil)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Resources:
    """Summed resource use of a unit's processes."""

    pids: tuple[int, ...]
    rss_bytes: int
    cpu_seconds: float


def pids_in(cgroup: str, main_pid: int) -> list[int]:
    """PIDs in the cgroup `cgroup` (as systemd names it), else the main process and its
    children."""
    root = _cgroup2_root()
    if cgroup and root is not None:
        try:
            procs = root / cgroup.lstrip("/") / "cgroup.procs"
            return [int(x) for x in procs.read_text().split()]
        except OSError:
            pass
    if not main_pid:
        return []
    try:
        return [main_pid] + [c.pid for c in psutil.Process(main_pid).children(recursive=True)]
    except psutil.Error:
        return []


def resources_of(pids: list[int]) -> Resources:
    """Summed RSS and CPU time of `pids` (those that exited meanwhile left out)."""
    rss = 0
    cpu = 0.0
    alive: list[int] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                rss += proc.memory_info().rss
                t = proc.cpu_times()
                cpu += t.user + t.system
            alive.append(pid)
        except psutil.Error:
            continue  # exited between the listing and the read
    return Resources(tuple(alive), rss, round(cpu, 3))


def _cgroup2_root() -> Path | None:
    """Where the unified cgroup hierarchy is mounted (None when there is none)."""
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    except OSError:
        pass
    return None
