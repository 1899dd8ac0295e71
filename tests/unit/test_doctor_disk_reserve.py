"""`parctl doctor`'s "disk reserve": does an agent filling its state folder leave pard
room to write?  Fake mountinfo lines and statvfs; the real folders of tmp_path."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from par import disk_reserve
from par.cli.doctor import Check, check_disk_reserve
from par.config import Config, Paths
from par.daemon import Daemon
from par.disk_reserve import mount_of


def line(point: str, fstype: str, source: str, options: str) -> str:
    """One /proc/self/mountinfo line."""
    return f"36 25 8:1 / {point} rw,relatime shared:1 - {fstype} {source} {options}\n"


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    (tmp_path / "var-lib" / "private").mkdir(parents=True)
    return Config(paths=Paths(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache"))


def check(tmp_path: Path, cfg: Config, mounts: str) -> Check:
    info = tmp_path / "mountinfo"
    info.write_text(mounts)
    return check_disk_reserve(cfg, var_lib=tmp_path / "var-lib", mountinfo=info)


def fake_statvfs(monkeypatch: pytest.MonkeyPatch, bfree: int, bavail: int) -> None:
    monkeypatch.setattr(disk_reserve.os, "statvfs", lambda _p: SimpleNamespace(
        f_bfree=bfree, f_bavail=bavail, f_frsize=4096))


def test_ext4_with_a_root_reserve_is_ok(tmp_path: Path, cfg: Config,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_statvfs(monkeypatch, bfree=10_000, bavail=10_000 - 3276)
    c = check(tmp_path, cfg, line("/", "ext4", "/dev/vda1", "rw,errors=remount-ro"))
    assert c.status == "ok", c
    assert c.detail.endswith(": 12.8 MiB reserved for root; an agent filling its state "
                             "folder stops there, pard still writes"), c


def test_ext4_without_a_reserve_warns(tmp_path: Path, cfg: Config,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake_statvfs(monkeypatch, bfree=10_000, bavail=10_000)
    c = check(tmp_path, cfg, line("/", "ext4", "/dev/vda1", "rw"))
    assert (c.status, c.fix) == ("warn", "tune2fs -m 5 /dev/vda1"), c


def test_ext4_reserve_for_another_uid_warns(tmp_path: Path, cfg: Config,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake_statvfs(monkeypatch, bfree=10_000, bavail=5_000)
    c = check(tmp_path, cfg, line("/", "ext4", "/dev/vda", "rw,resuid=65534,resgid=65534"))
    assert c.status == "warn" and "uid 65534, not root" in c.detail, c
    assert c.fix is not None and c.fix.startswith("tune2fs -u 0 /dev/vda")


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_filesystems_without_a_root_reserve_warn(tmp_path: Path, cfg: Config,
                                                 fstype: str) -> None:
    c = check(tmp_path, cfg, line("/", "ext4", "/dev/vda", "rw")
              + line(str(tmp_path), fstype, "/dev/vdb", "rw,attr2,inode64"))
    assert c.status == "warn" and f"{fstype} keeps no space for root" in c.detail, c
    assert c.fix is not None and "own filesystem" in c.fix and "project quotas" in c.fix


def test_agents_state_on_another_filesystem_is_ok(tmp_path: Path, cfg: Config,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_stat = Path.stat

    def stat(self: Path, **kw: object) -> os.stat_result:
        st = real_stat(self)
        if self.name == "private":  # as if /var/lib/private were its own mount
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *tuple(st)[3:]))
        return st

    monkeypatch.setattr(Path, "stat", stat)
    c = check(tmp_path, cfg, line("/", "xfs", "/dev/vda", "rw"))
    assert c.status == "ok" and "another filesystem" in c.detail, c


def test_mount_of_takes_the_deepest_mount_and_unescapes(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(line("/", "ext4", "/dev/vda", "rw")
                    + line("/var/lib/with\\040space", "xfs", "/dev/vdb", "rw,resuid=5")
                    + line("/var", "btrfs", "/dev/vdc", "rw"))
    m = mount_of(Path("/var/lib/with space/x"), info)
    assert m is not None and (m.point, m.fstype, m.options["resuid"]) == (
        Path("/var/lib/with space"), "xfs", "5")
    m = mount_of(Path("/var/lib/other"), info)
    assert m is not None and m.fstype == "btrfs"
    m = mount_of(Path("/etc"), info)
    assert m is not None and m.fstype == "ext4"


def test_pard_warns_at_start_and_never_fails_on_the_check(
        tmp_path: Path, cfg: Config, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    daemon = Daemon(cfg, logging.getLogger("par.test.reserve"))
    monkeypatch.setattr(disk_reserve, "examine", lambda _state: disk_reserve.Finding(
        False, "xfs on /dev/vda (/): no reserve", "put it elsewhere"))
    with caplog.at_level(logging.WARNING, logger="par.test.reserve"):
        daemon._warn_without_disk_reserve()
    assert [r.getMessage() for r in caplog.records] == ["Agents' state can fill pard's disk"]

    def unreadable(_state: Path) -> disk_reserve.Finding:
        raise PermissionError(13, "Permission denied", "/proc/self/mountinfo")

    monkeypatch.setattr(disk_reserve, "examine", unreadable)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="par.test.reserve"):
        daemon._warn_without_disk_reserve()  # logged, not raised: pard starts anyway
    assert [r.getMessage() for r in caplog.records] == ["Could not check the disk reserve"]
