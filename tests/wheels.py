"""Tiny packages the venv tests install: pure-Python wheels and a hanging sdist.

A wheel is a zip with the module, METADATA, WHEEL and RECORD; building them
here keeps the tests offline, fast and independent of any index.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.httpfiles import serve_files

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
UV = REPO / ".cache" / "tools" / "bin" / "uv"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(
    dest: Path,
    name: str,
    version: str = "1.0",
    *,
    modules: dict[str, str] | None = None,
    requires: list[str] | None = None,
    scripts: dict[str, bytes] | None = None,
    entry_points: dict[str, str] | None = None,
    data: dict[str, bytes] | None = None,
) -> Path:
    """Write `{name}-{version}-py3-none-any.whl` into `dest` and return its path.

    modules: file path inside the wheel -> source (default: a package `name`
    whose `VERSION` is `version`).  requires: Requires-Dist lines.
    scripts: files placed in the wheel's `.data/scripts/` (installed into bin/).
    entry_points: console script name -> "module:function".
    data: extra binary files inside the wheel (path -> bytes), e.g. to give it a size.
    """
    dist = name.replace("-", "_")
    modules = modules or {f"{dist}/__init__.py": f"VERSION = {version!r}\n"}
    info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {p: s.encode() for p, s in modules.items()}
    for script, body in (scripts or {}).items():
        files[f"{dist}-{version}.data/scripts/{script}"] = body
    files.update(data or {})
    if entry_points:
        lines = "".join(f"{n} = {target}\n" for n, target in entry_points.items())
        files[f"{info}/entry_points.txt"] = f"[console_scripts]\n{lines}".encode()
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires or [])
    files[f"{info}/METADATA"] = meta.encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: par-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [_record_line(p, d) for p, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, d in files.items():
            zi = zipfile.ZipInfo(p, date_time=(2024, 1, 1, 0, 0, 0))
            zi.external_attr = (0o755 if ".data/scripts/" in p else 0o644) << 16
            zf.writestr(zi, d)
    return path


# The in-tree build backend of the hanging sdist: it needs no setuptools (so
# it builds offline) and blocks as soon as the installer asks it anything,
# after touching its marker file (baked in, or $PAR_TEST_HANG_MARKER) so a test
# knows the build started.  Builds get no environment of the caller's: bake it in.
_HANG_BACKEND = '''\
import os, pathlib, time

_marker = os.environ.get("PAR_TEST_HANG_MARKER") or MARKER
if _marker:
    pathlib.Path(_marker).write_text(str(os.getpid()))
while True:
    time.sleep(1)
'''


def build_hanging_sdist(dest: Path, name: str = "hangpkg", version: str = "1.0",
                        marker: Path | None = None) -> Path:
    """Write an sdist whose build never finishes; return its path.  `marker`: the
    file its build writes its PID to when it starts."""
    root = f"{name}-{version}"
    files = {
        "pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "hang_backend"\n'
            'backend-path = ["."]\n\n'
            f'[project]\nname = "{name}"\nversion = "{version}"\n'
        ),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        "hang_backend.py": f"MARKER = {str(marker) if marker else None!r}\n" + _HANG_BACKEND,
    }
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in files.items():
            data = text.encode()
            ti = tarfile.TarInfo(f"{root}/{rel}")
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return path


@contextmanager
def serve_index(dists: Path, root: Path) -> Iterator[str]:
    """Serve the wheels and sdists in `dists` as a PEP 503 simple index on
    127.0.0.1; yields the index URL (`.../simple`).  `root` is a scratch folder."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[str]] = {}
    for dist in sorted(dists.iterdir()):
        if not dist.name.endswith((".whl", ".tar.gz")):
            continue
        (files / dist.name).write_bytes(dist.read_bytes())
        project = re.sub(r"[-_.]+", "-", re.split(r"-\d", dist.name, maxsplit=1)[0]).lower()
        digest = hashlib.sha256(dist.read_bytes()).hexdigest()
        projects.setdefault(project, []).append(
            f'<a href="../../files/{dist.name}#sha256={digest}">{dist.name}</a><br>')
    for project, links in projects.items():
        page = root / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>")
    with serve_files(root) as base:
        yield f"{base}/simple"


def _required(path: Path, what: str) -> Path:
    """`path` if it exists; else skip (locally) or fail (CI=true)."""
    if path.exists():
        return path
    reason = f"{what} not found at {path}: run scripts/install-deps"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def uv_binary() -> Path:
    """The uv binary scripts/install-deps provides (skip or fail without it)."""
    return _required(UV, "uv")


def wheelhouse() -> Path:
    """The offline wheelhouse of the typical agent set (skip or fail without it)."""
    return _required(WHEELHOUSE, "wheelhouse")
