"""Whether an agent filling its state folder leaves pard room to write.

systemd has no size bound for `StateDirectory=`, and by default the agents' state
(/var/lib/private) shares a filesystem with pard's (`paths.state_dir`).  What keeps
pard writing its store, events and deployments then is ext4's reserve: blocks only a
writer whose fsuid is the superblock's `resuid` (default 0; mount option `resuid=`)
may take (ext4_has_free_clusters).  Agents run as dynamic users and builds as
`par-build`, so they stop at it with ENOSPC; pard is uid 0 and needs no
CAP_SYS_RESOURCE (par.service's bounding set leaves it out).  XFS and btrfs keep no
such reserve.  `parctl doctor` shows the finding, pard logs it at start when it is a
warning (docs/security.md, attack 10; tests/integration/test_disk_exhaustion.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# Filesystems that keep blocks for uid `resuid=` (default 0) only.
RESERVE_FILESYSTEMS = ("ext4", "ext3", "ext2")
MOUNTINFO = Path("/proc/self/mountinfo")
AGENTS_STATE = Path("/var/lib/private/par-agents")  # agent_state.TOP, DynamicUser=


@dataclass(frozen=True)
class Mount:
    """A line of /proc/self/mountinfo: where, what, and the superblock's options."""

    point: Path
    fstype: str
    source: str
    options: dict[str, str]


@dataclass(frozen=True)
class Finding:
    """ok: an agent filling its state folder cannot take pard's last free space."""

    ok: bool
    detail: str
    fix: str | None = None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: Path, mountinfo: Path = MOUNTINFO) -> Mount | None:
    """The mount `path` is on: the last (topmost) of the longest mount points above it."""
    path = Path(os.path.realpath(path))
    best: Mount | None = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        point = Path(_unescape(fields[4]))
        if path != point and point not in path.parents:
            continue
        if best is not None and len(point.parts) < len(best.point.parts):
            continue
        opts = dict(o.partition("=")[::2] for o in fields[sep + 3].split(",")) \
            if len(fields) > sep + 3 else {}
        best = Mount(point, fields[sep + 1], _unescape(fields[sep + 2]), opts)
    return best


def existing(path: Path) -> Path:
    """`path`, or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def format_mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


def examine(state_dir: Path, agents_state: Path = AGENTS_STATE,
            mountinfo: Path = MOUNTINFO) -> Finding:
    """Agents' state on another filesystem than `state_dir`, or on ext4 with blocks
    reserved for root: ok; anything else: what is wrong and what to do."""
    state = existing(state_dir)
    agents = existing(agents_state)
    if state.stat().st_dev != agents.stat().st_dev:
        return Finding(True, f"agents' state ({agents}) is on another filesystem than "
                             f"{state}: an agent filling it cannot fill pard's")
    mount = mount_of(state, mountinfo)
    if mount is None:
        return Finding(False, f"no mount found for {state} in {mountinfo}")
    where = f"{mount.fstype} on {mount.source} ({mount.point}), shared by {state} and {agents}"
    if mount.fstype not in RESERVE_FILESYSTEMS:
        return Finding(False, f"{where}: {mount.fstype} keeps no space for root, so an agent "
                              "filling its state folder leaves pard none either",
                       f"put {agents} on its own filesystem, or project quotas on it "
                       "(docs/security.md)")
    resuid = mount.options.get("resuid", "0")
    if resuid != "0":
        return Finding(False, f"{where}: its reserve is for uid {resuid}, not root, so an "
                              "agent filling its state folder leaves pard none",
                       f"tune2fs -u 0 {mount.source} and drop resuid= from its mount options")
    st = os.statvfs(state)
    # f_bfree - f_bavail: the root reserve (plus ext4's few MiB for its own metadata)
    reserved = (st.f_bfree - st.f_bavail) * st.f_frsize
    if reserved <= 0:
        return Finding(False, f"{where}: no blocks are reserved for root, so an agent filling "
                              "its state folder leaves pard none", f"tune2fs -m 5 {mount.source}")
    return Finding(True, f"{where}: {format_mib(reserved)} reserved for root; an agent "
                         "filling its state folder stops there, pard still writes")
