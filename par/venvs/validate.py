"""Whether a venv or layer may be reused, and putting a finished build in place.

A venv is reused only when it validates: its metadata matches the requirements'
hash and the base interpreter, its `bin/python*` are symlinks to the base
interpreter, its `pyvenv.cfg` is a regular file naming the base interpreter's
folder as `home` (what makes `sys.prefix` the venv), and the layer it links
validates too; otherwise it is rebuilt.

Validation never runs anything from the venv: pard is root, and a venv's
files were written by a build running package code.  Everything is checked
with `lstat` (a symlink is never followed to decide); the base interpreter
itself is probed by par.venvs.python.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from par import layout
from par.config import Config
from par.errors import ParError
from par.fsutil import fsync_dir
from par.venvs.links import linked_layer, same_path
from par.venvs.meta import METADATA_FILE, read_meta
from par.venvs.python import BasePython

# The interpreter names a venv's bin/ holds (python, python3, python3.11).
_PYTHON_NAME_RE = re.compile(r"^python(\d+(\.\d+)?)?$")


def _interpreter_problem(path: Path, base: Path) -> str | None:
    """Why bin/python* of the venv at `path` is not the base interpreter, or None."""
    bin_dir = path / "bin"
    try:
        if not stat.S_ISDIR(bin_dir.lstat().st_mode):
            return "bin is not a folder"
        names = sorted(e.name for e in os.scandir(bin_dir) if _PYTHON_NAME_RE.match(e.name))
    except OSError:
        return "bin/python is missing"
    if "python" not in names:
        return "bin/python is missing"
    real_base = os.path.realpath(base)
    for name in names:
        entry = bin_dir / name
        if not stat.S_ISLNK(entry.lstat().st_mode):
            return f"bin/{name} is not a link to the base interpreter {base}"
        if os.path.realpath(entry) != real_base:
            return f"bin/{name} links {os.path.realpath(entry)}, not the base interpreter {base}"
    return None


def _pyvenv_problem(path: Path, base: Path) -> str | None:
    """Why pyvenv.cfg would not make `path` the prefix of the base interpreter, or None."""
    cfg = path / "pyvenv.cfg"
    try:
        if not stat.S_ISREG(cfg.lstat().st_mode):
            return "pyvenv.cfg is not a regular file"
        lines = cfg.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return "pyvenv.cfg is missing or unreadable"
    values = {k.strip().lower(): v.strip() for k, sep, v in (ln.partition("=") for ln in lines)
              if sep}
    if values.get("home") != str(base.parent):
        return f"pyvenv.cfg home is {values.get('home')!r}, not {str(base.parent)!r}"
    if values.get("include-system-site-packages", "false").lower() != "false":
        return "pyvenv.cfg includes the system site-packages"
    return None


class Validator:
    """Validates venvs and layers without running them."""

    def __init__(self, cfg: Config, base: BasePython) -> None:
        self.base = base
        self.layers = layout.layers(cfg)

    def check(self, path: Path, requirements_sha: str) -> str | None:
        """Why the venv (or layer) at `path` must not be reused, or None when it is good.

        A venv is good when its own files check out and so does the layer it links.
        """
        base = self.base.info()
        problem = _interpreter_problem(path, base.path)
        if problem is not None:
            return problem
        meta = read_meta(path)
        if meta is None:
            return f"{METADATA_FILE} is missing or unreadable"
        if meta.requirements_sha256 != requirements_sha:
            return "requirements hash differs from the metadata"
        if meta.python != str(base.path):
            return f"built from {meta.python}, configured interpreter is {base.path}"
        if meta.python_version != base.version:
            return f"built for Python {meta.python_version}, interpreter is now {base.version}"
        problem = _pyvenv_problem(path, base.path)
        if problem is not None:
            return problem
        if meta.layer is not None:
            layer = self.layers / meta.layer
            linked = linked_layer(path)
            if linked is None or not same_path(linked, layer):
                return f"site-packages does not link its layer {meta.layer}"
            problem = self.check(layer, requirements_sha)
            if problem is not None:
                return f"its layer {meta.layer}: {problem}"
        return None

    def put_in_place(self, tmp: Path, final: Path, requirements_sha: str, what: str) -> None:
        """Validate a finished build and rename it to its final name (durably)."""
        problem = self.check(tmp, requirements_sha)
        if problem is not None:
            raise ParError("venv_invalid", f"the new {what} does not validate: {problem}",
                           None, 500)
        os.rename(tmp, final)
        fsync_dir(final.parent)
