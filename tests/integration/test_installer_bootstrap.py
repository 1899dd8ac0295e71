"""uv with no step by hand, and a pip fallback without pip in every venv (real systemd).

1. `installer.kind: auto` and no uv anywhere: pard fetches `installer.uv_version`
   from the index the test serves (a wheel made around the real uv binary),
   into state_dir/tools, checked against the index's sha256; the next build uses
   uv, run by the build user from that folder.
2. The index cannot be reached: builds use pip, and `/health`'s `installer`
   and the deploy's events say why.  The operator's PIP_RETRIES, set in a
   par.service drop-in, reaches the fetch and the build (they fail fast).
   A pip-built layer carries no pip; an agent without requirements costs
   well under 1 MiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.wheels import build_wheel, serve_index, uv_binary

from . import agents
from .conftest import wait_for
from .pard import TEST_TOKEN, Pard, apkg_with, free_port, new_root

UV_VERSION = "0.13.9"  # installer.uv_version's default, and scripts/install-deps' uv
DROP_IN = Path("/run/systemd/system/par.service.d/uvb-test.conf")


def _uv_version() -> str:
    out = subprocess.run([str(uv_binary()), "--version"], capture_output=True, text=True,
                         timeout=10).stdout.split()
    return out[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Path:
    """The index's files: uv (the real binary in a wheel) and a tiny requirement."""
    if _uv_version() != UV_VERSION:
        pytest.skip(f"scripts/install-deps' uv is not {UV_VERSION}")
    folder = tmp_path_factory.mktemp("uvb-dists")
    build_wheel(folder, "uv", UV_VERSION, modules={"uv/__init__.py": ""},
                scripts={"uv": uv_binary().read_bytes()})
    build_wheel(folder, "uvb-alpha", "1.0")
    return folder


def _pard(config: dict) -> Pard:
    p = Pard(new_root("uvb"), installer="auto",
             config_extra={"listen": {"tcp": f"127.0.0.1:{free_port()}"},
                           "installer": {"uv_path": None, "offline": False, "find_links": [],
                                         **config}})
    p.root.mkdir(parents=True, exist_ok=True)
    (p.root / "token").write_text(TEST_TOKEN + "\n")
    (p.root / "token").chmod(0o600)
    p.config_extra["listen"]["token_file"] = str(p.root / "token")
    return p


@pytest.fixture
def drop_in() -> Iterator[Path]:
    """A par.service drop-in, as an operator writes one; removed afterwards."""
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield DROP_IN
    finally:
        DROP_IN.unlink(missing_ok=True)
        try:
            DROP_IN.parent.rmdir()
        except OSError:
            pass
        subprocess.run(["systemctl", "daemon-reload"], timeout=60, check=False)


def _health(p: Pard) -> dict:
    return p.client().daemon_health()["installer"]


def _layer_of(p: Pard, venv: str) -> Path:
    meta = json.loads((p.state / "venvs" / venv / "par-venv.json").read_text())
    return p.state / "venvs" / ".layers" / meta["layer"]


def _size(top: Path) -> int:
    return sum(f.lstat().st_size for f in top.rglob("*"))


def test_pard_fetches_uv_and_the_next_build_uses_it(dists, tmp_path):
    with serve_index(dists, tmp_path / "index") as index:
        p = _pard({"index_url": index})
        try:
            p.start()
            status = wait_for(lambda: (h := _health(p))["name"] == "uv" and h, timeout=60)
            assert status["bootstrap"]["state"] == "ready", status
            assert status["path"] == str(p.state / "tools" / "uv") and "reason" not in status
            uv = p.state / "tools" / "uv"
            assert os.stat(uv).st_mode & 0o755 == 0o755
            record = json.loads((p.state / "tools" / "uv.json").read_text())
            wheel = next(dists.glob("uv-*.whl"))
            assert record["version"] == UV_VERSION
            assert record["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
            d = p.deploy("uvb-fetched", apkg_with(p.root / "apkg", agents.with_requirements(
                "uvb-fetched", "uvb-alpha==1.0\n")))
            assert d["status"] == "healthy", d
            meta = json.loads((p.state / "venvs" / d["venv"] / "par-venv.json").read_text())
            assert meta["installer"] == "uv"
            assert list(_layer_of(p, d["venv"]).glob("lib/python3*/site-packages/uvb_alpha"))
        finally:
            p.teardown()


def test_unreachable_index_builds_with_pip_and_says_why(dists, tmp_path, drop_in):
    wheels = tmp_path / "wheels"  # what the build needs, where the build user can read it
    wheels.mkdir()
    for whl in dists.glob("uvb_alpha-*.whl"):
        (wheels / whl.name).write_bytes(whl.read_bytes())
    dead = f"http://127.0.0.1:{free_port()}/simple"  # nothing listens there
    # the operator's pip setting reaches the fetch and the build: no retries, fast failures
    drop_in.write_text("[Service]\nEnvironment=PIP_RETRIES=0\n")
    p = _pard({"index_url": dead})
    p.local_packages.mkdir(parents=True, exist_ok=True)
    p.config_extra["installer"]["find_links"] = [str(p.local_packages)]
    try:
        p.start()
        for whl in wheels.iterdir():
            (p.local_packages / whl.name).write_bytes(whl.read_bytes())
            (p.local_packages / whl.name).chmod(0o644)
        status = wait_for(lambda: (h := _health(p)).get("bootstrap", {}).get("state") == "failed"
                          and h, timeout=90)
        assert status["name"] == "pip", status
        assert status["reason"].startswith(f"uv {UV_VERSION} could not be fetched: "), status
        assert "127.0.0.1" in status["reason"] and "\n" not in status["reason"]
        assert not (p.state / "tools" / "uv").exists()

        d = p.deploy("uvb-pip", apkg_with(p.root / "apkg", agents.with_requirements(
            "uvb-pip", "uvb-alpha==1.0\n")))
        assert d["status"] == "healthy", d
        layer = _layer_of(p, d["venv"])
        meta = json.loads((layer / "par-venv.json").read_text())
        assert meta["installer"] == "pip"
        site = next(layer.glob("lib/python3*/site-packages"))
        assert (site / "uvb_alpha").is_dir()
        assert not (site / "pip").exists() and not list(site.glob("pip-*.dist-info"))
        assert not (layer / "bin" / "pip").exists()
        assert list(site.glob("uvb_alpha/__pycache__/*.pyc"))  # pard's shared bytecode
        events = p.client().events(d["deploymentId"])["events"]
        built = [e for e in events if e.get("event") == "Venv built"]
        assert built and "could not be fetched" in json.dumps(built[0]), events

        # no requirements: the venv and its (empty) layer cost well under 1 MiB
        d = p.deploy("uvb-empty", apkg_with(p.root / "apkg", agents.probe("uvb-empty")))
        assert d["status"] == "healthy", d
        venv = p.state / "venvs" / d["venv"]
        assert _size(venv) + _size(_layer_of(p, d["venv"])) < 1024 * 1024
    finally:
        p.teardown()
