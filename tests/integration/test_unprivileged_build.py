"""The attacks on the venv build, reproduced against a real pard under real systemd.

1. An sdist's in-tree build backend tries to write /etc, /root and pard's state
   folder and to read /etc/shadow and the store: it runs as the build user in a
   sandboxed unit, so every attempt fails, and the build (which does not fail
   on them) still gives a healthy agent.
2. A wheel ships `<name>.data/scripts/python`, replacing the layer's bin/python:
   validation refuses it with lstat, nothing runs it as root.
3. A comment line ending in a backslash (pip does not continue it; PAR did) hid
   `-r /etc/shadow`, `--index-url`, `-e`: refused, naming requirements.txt, and
   no line of /etc/shadow shows in any message.
4. POST /venvs/prewarm went around the checker: refused with 400 naming the field.
"""

from __future__ import annotations

import io
import json
import pwd
import shutil
import stat
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from par.client import ApiError
from tests.httpfiles import serve_files
from tests.wheels import build_wheel

from . import agents
from .pard import Pard, apkg_with, new_root, running_pard

MARK = f"unpriv-{uuid.uuid4().hex[:8]}"

# The in-tree PEP 517 backend of the attacking sdist.  It tries everything at
# build time, and ships what happened inside the wheel it builds (as REPORT), so
# the test reads the outcome from the installed package.
_EVIL_BACKEND = '''
import base64, hashlib, io, json, os, pwd, zipfile

def _attack():
    out = {"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name}
    for key, path in WRITES.items():
        try:
            with open(path, "w") as fh:
                fh.write("pwned")
            out[key] = "written"
        except OSError as exc:
            out[key] = type(exc).__name__
    for key, path in READS.items():
        try:
            with open(path, "rb") as fh:
                out[key] = "read:" + fh.read(64).decode("latin-1")
        except OSError as exc:
            out[key] = type(exc).__name__
    return out

def _record(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return "%s,sha256=%s,%d" % (path, digest, len(data))

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    info = "%s-%s.dist-info" % (NAME, VERSION)
    files = {
        NAME + "/__init__.py": ("REPORT = %r\\n" % json.dumps(_attack())).encode(),
        info + "/METADATA": ("Metadata-Version: 2.1\\nName: %s\\nVersion: %s\\n"
                             % (NAME, VERSION)).encode(),
        info + "/WHEEL": b"Wheel-Version: 1.0\\nGenerator: evil\\nRoot-Is-Purelib: true\\n"
                         b"Tag: py3-none-any\\n",
    }
    record = [_record(p, d) for p, d in files.items()] + [info + "/RECORD,,"]
    files[info + "/RECORD"] = ("\\n".join(record) + "\\n").encode()
    name = "%s-%s-py3-none-any.whl" % (NAME, VERSION)
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return name
'''


def build_evil_sdist(dest: Path, name: str, writes: dict[str, str],
                     reads: dict[str, str]) -> Path:
    """An sdist whose in-tree backend attacks the host while it is built."""
    root = f"{name}-1.0"
    backend = (f"NAME = {name!r}\nVERSION = '1.0'\nWRITES = {writes!r}\nREADS = {reads!r}\n"
               + _EVIL_BACKEND)
    files = {
        "pyproject.toml": ('[build-system]\nrequires = []\nbuild-backend = "evil_backend"\n'
                           f'backend-path = ["."]\n\n[project]\nname = "{name}"\n'
                           'version = "1.0"\n'),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        "evil_backend.py": backend,
    }
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{rel}")
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def files_root() -> Iterator[Path]:
    root = new_root("unpriv-files")
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def served(files_root: Path) -> Iterator[str]:
    """A local HTTP server for the sdists requirements name by URL."""
    with serve_files(files_root) as base:
        yield base


@pytest.fixture(scope="module")
def pard(served: str) -> Iterator[Pard]:
    """A pard that may reach the network (URL requirements), with the offline
    wheelhouse still as its only index."""
    with running_pard("unpriv", {"installer": {"offline": False,
                                              "index_url": f"{served}/no-index/"}}) as p:
        yield p


def _shadow_lines() -> list[str]:
    return [ln for ln in Path("/etc/shadow").read_text().splitlines() if ln.strip()]


def _texts(pard: Pard, deployment: dict) -> str:
    """Everything a caller can read about a deployment: record, health, events."""
    c = pard.client()
    dep_id = deployment["deploymentId"]
    return json.dumps([deployment, c.deployment(dep_id), c.health(dep_id), c.events(dep_id)])


def test_an_sdist_builds_unprivileged_and_its_attacks_fail(pard: Pard, files_root: Path,
                                                          served: str) -> None:
    targets = {"etc": f"/etc/{MARK}", "root": f"/root/{MARK}",
               "state": str(pard.state / MARK), "cache": str(pard.root / "cache" / MARK)}
    reads = {"shadow": "/etc/shadow", "store": str(pard.state / "state" / "par.db"),
             "token": str(pard.root / "token")}
    build_evil_sdist(files_root, "unprivevil", targets, reads)
    reqs = f"unprivevil @ {served}/unprivevil-1.0.tar.gz\n"
    d = pard.deploy("unpriv-evil", apkg_with(pard.root / "apkg",
                                             agents.with_requirements("unpriv-evil", reqs)))
    # a normal sdist still builds: the backend ran (its report is in the package)
    assert d["status"] == "healthy", _texts(pard, d)
    for path in targets.values():
        assert not Path(path).exists(), f"the build wrote {path}"
    layer = next(p for p in (pard.state / "venvs" / ".layers").iterdir()
                 if list(p.glob("lib/python3*/site-packages/unprivevil")))
    init = next(layer.glob("lib/python3*/site-packages/unprivevil/__init__.py"))
    namespace: dict = {}
    exec(init.read_text(), namespace)  # a string literal assignment, written by the build
    report = json.loads(namespace["REPORT"])
    assert report["uid"] != 0 and report["user"] == "par-build", report
    assert report["etc"] in ("OSError", "PermissionError"), report  # read-only file system
    assert report["root"] in ("PermissionError", "FileNotFoundError"), report
    assert report["state"] in ("FileNotFoundError", "OSError", "PermissionError"), report
    assert report["cache"] in ("FileNotFoundError", "OSError", "PermissionError"), report
    assert report["shadow"] == "PermissionError", report
    assert report["store"] == "FileNotFoundError", report  # the store is hidden
    assert not str(report["token"]).startswith("read:"), report
    # what the build wrote is root's and read-only now
    for path in (layer, init, layer / "bin"):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0) and not st.st_mode & 0o022, path
    assert not init.lstat().st_mode & stat.S_IWUSR
    shadow = _shadow_lines()
    assert not any(line in _texts(pard, d) for line in shadow)


@pytest.fixture
def pip_pard(pard: Pard) -> Iterator[Pard]:
    """The same pard, restarted with installer.kind pip for one test."""
    pard.installer = "pip"
    pard.write_config()
    pard.restart()
    try:
        yield pard
    finally:
        pard.installer = "uv"
        pard.write_config()
        pard.restart()


def _deploy_python_replacing_wheel(pard: Pard, tag: str) -> tuple[dict, Path, str]:
    marker = pard.root / f"{MARK}-{tag}-payload-ran"
    payload = f'#!/bin/sh\ntouch {marker}\nexec /usr/bin/python3.11 "$@"\n'.encode()
    dist = f"unprivpy{tag}"
    build_wheel(pard.local_packages, dist, "1.0", scripts={"python": payload})
    agent = f"unpriv-py-{tag}"
    d = pard.deploy(agent, apkg_with(pard.root / "apkg",
                                     agents.with_requirements(agent, f"{dist}==1.0\n")))
    return d, marker, dist


def _no_layer_with(pard: Pard, dist: str) -> bool:
    layers = pard.state / "venvs" / ".layers"
    return not [p for p in layers.iterdir() if list(p.glob(f"lib/python3*/site-packages/{dist}"))]


def test_a_wheel_replacing_bin_python_is_refused_by_validation(pip_pard: Pard) -> None:
    """pip installs a wheel's `.data/scripts/python` over the layer's bin/python:
    validation (lstat) refuses the layer, and nothing ever runs the payload."""
    d, marker, dist = _deploy_python_replacing_wheel(pip_pard, "pip")
    assert d["status"] == "failed", _texts(pip_pard, d)
    assert d["error"]["code"] == "venv_invalid", d["error"]
    assert "bin/python is not a link to the base interpreter" in d["error"]["message"]
    assert not marker.exists(), "the wheel's bin/python ran"
    assert _no_layer_with(pip_pard, dist)


def test_uv_refuses_a_wheel_replacing_bin_python(pard: Pard) -> None:
    d, marker, dist = _deploy_python_replacing_wheel(pard, "uv")
    assert d["status"] == "failed", _texts(pard, d)
    assert d["error"]["code"] == "dependency_install_failed", d["error"]
    assert "reserved name `python`" in d["error"]["message"]
    assert not marker.exists() and _no_layer_with(pard, dist)


@pytest.mark.parametrize("hidden", [
    "-r /etc/shadow",
    "--index-url http://127.0.0.1:9/simple",
    "-e /usr/lib/python3/dist-packages",
])
def test_a_backslash_after_a_comment_hides_nothing(pard: Pard, hidden: str) -> None:
    reqs = f"# pinned by hand \\\n{hidden}\n"
    agent = f"unpriv-bs-{uuid.uuid4().hex[:6]}"
    d = pard.deploy(agent, apkg_with(pard.root / "apkg",
                                     agents.with_requirements(agent, reqs)))
    assert d["status"] == "failed"
    err = d["error"]
    assert err["code"] == "requirements_continuation" and err["field"] == "requirements.txt"
    assert "requirements.txt line 1" in err["message"] and "backslash" in err["message"]
    texts = _texts(pard, d)
    assert not any(line in texts for line in _shadow_lines())


@pytest.mark.parametrize("text", [
    "-r /etc/shadow\n",
    "-e .\n",
    "unprivevil @ http://127.0.0.1:9/unprivevil-1.0.tar.gz\n",
    "# c \\\n-r /etc/shadow\n",
])
def test_prewarm_goes_through_the_requirements_checker(pard: Pard, text: str) -> None:
    with pytest.raises(ApiError) as info:
        pard.client().prewarm(text)
    assert info.value.status == 400 and info.value.field == "requirements", info.value
    assert "requirements line 1" in info.value.message
    assert not any(line in info.value.message for line in _shadow_lines())


def test_prewarm_of_good_requirements_runs_in_the_sandbox(pard: Pard) -> None:
    build_wheel(pard.local_packages, "unprivok", "1.0")
    res = pard.client().prewarm("unprivok==1.0\n")
    assert res["seconds"] >= 0
    cache = pard.root / "cache" / "uv"
    assert cache.stat().st_uid == _uid("par-build")
    assert not [p for p in (pard.state / "venvs").iterdir() if p.name.startswith(".tmp-")]


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid
