"""par.build_sandbox and par.venvs.seal without systemd: the build unit's properties,
the refusals that keep a build from silently running as root, and sealing."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from par import build_sandbox, config
from par.build_sandbox import RootRunner, UnitRunner, runner_for, unit_properties
from par.errors import ParError
from par.venvs.seal import seal


def _cfg(tmp_path: Path, **installer: object) -> config.Config:
    base = config.with_state_dir(config.from_dict(None), tmp_path / "state", tmp_path / "cache")
    return dataclasses.replace(base, installer=dataclasses.replace(base.installer, **installer))


def test_unit_properties_confine_the_build(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    layer = tmp_path / "state/venvs/.layers/.tmp-k-1"
    uv = tmp_path / "state/tools/uv"
    uv.parent.mkdir(parents=True)
    uv.touch()
    wheels = tmp_path / "checkout/wheels"  # under /tmp, which PrivateTmp= hides
    wheels.mkdir(parents=True)
    props = unit_properties(cfg, "par-build", [layer, tmp_path / "cache/uv"],
                            [uv, Path("/usr/share/wheels"), wheels, Path("/usr/bin")],
                            tmp_path / "env", 300)
    for expected in ("User=par-build", "ProtectSystem=strict", "ProtectHome=yes",
                     "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=",
                     f"TemporaryFileSystem={tmp_path}/state:ro {tmp_path}/cache:ro",
                     f"BindPaths={layer} {tmp_path}/cache/uv",
                     # inputs the sandbox hides are bound back; /usr/bin needs no bind
                     f"BindReadOnlyPaths={uv} {wheels}",
                     "InaccessiblePaths=-/etc/par -/etc/par/token",
                     "RuntimeMaxSec=300s", f"EnvironmentFile={tmp_path}/env"):
        assert expected in props, expected
    assert not [p for p in props if p.startswith("DynamicUser")]


def test_paths_that_would_split_a_property_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ParError) as info:
        unit_properties(_cfg(tmp_path), "par-build", [Path("/var/lib/a b")], [], None, 10)
    assert info.value.code == "build_sandbox_path"


def test_environment_file_quotes_values() -> None:
    text = build_sandbox._env_file_text({"A": 'x"y\\z', "B": "http://u:p@proxy:3128"})
    assert text == 'A="x\\"y\\\\z"\nB="http://u:p@proxy:3128"\n'
    with pytest.raises(ParError):
        build_sandbox._env_file_text({"A": "two\nlines"})


def test_no_silent_fallback_to_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the sandbox on and no systemd, a build fails, naming the opt-out."""
    monkeypatch.setattr(build_sandbox.Path, "is_dir", lambda self: False)
    runner = runner_for(_cfg(tmp_path))
    assert isinstance(runner, UnitRunner)
    with pytest.raises(ParError) as info:
        runner.prepare([tmp_path / "v"])
    assert info.value.code == "build_sandbox_unavailable"
    assert "installer.sandbox: false" in info.value.message
    assert isinstance(runner_for(_cfg(tmp_path, sandbox=False)), RootRunner)


def test_a_missing_build_user_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ParError) as info:
        build_sandbox.build_user(_cfg(tmp_path, build_user="par-no-such-user"))
    assert info.value.code == "build_user_missing" and "sysusers" in info.value.message


def test_build_user_root_is_refused_by_the_config() -> None:
    with pytest.raises(config.ConfigError):
        config.from_dict({"installer": {"build_user": "root"}})


def _skeleton(top: Path) -> None:
    (top / "bin").mkdir(parents=True)
    (top / "lib/python3.11/site-packages").mkdir(parents=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_seal_makes_the_build_roots_without_following_symlinks(tmp_path: Path) -> None:
    top = tmp_path / "layer"
    _skeleton(top)
    outside = tmp_path / "outside"
    outside.write_text("x")
    os.chown(outside, 4242, 4242)
    mod = top / "lib/python3.11/site-packages/m.py"
    mod.write_text("X = 1\n")
    mod.chmod(0o4777)
    (top / "bin/link").symlink_to(outside)
    for path in (top, top / "bin", mod):
        os.lchown(path, 4242, 4242)
    seal(top, 4242, "layer t")
    st = mod.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o555)
    assert (top.lstat().st_uid, stat.S_IMODE((top / "bin").lstat().st_mode) & 0o022) == (0, 0)
    assert outside.stat().st_uid == 4242  # the link's target is not touched


@pytest.mark.parametrize("bad", ["lib-link", "fifo", "foreign"])
def test_seal_refuses_what_a_build_cannot_have_made(tmp_path: Path, bad: str) -> None:
    top = tmp_path / "layer"
    _skeleton(top)
    if bad == "lib-link":
        (top / "lib").rename(tmp_path / "lib-moved")
        (top / "lib").symlink_to("/")
    elif bad == "fifo":
        os.mkfifo(top / "bin/pipe")
    else:
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        (top / "bin/f").write_text("x")
        os.chown(top / "bin/f", 4343, 4343)
    with pytest.raises(ParError) as info:
        seal(top, 4242, "layer t")
    assert info.value.code == "venv_invalid"
