"""Whether a venv or layer may be reused, and putting a finished build in place.

A venv is reused only when it validates: `bin/python` runs, its metadata
matches the requirements' hash and the base interpreter, `sys.prefix` is the
venv, and the layer it links validates too; otherwise it is rebuilt.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from par import layout, procs
from par.config import Config
from par.errors import ParError
from par.fsutil import fsync_dir
from par.installers import venv_python
from par.venvs.links import linked_layer, same_path
from par.venvs.meta import METADATA_FILE, read_meta
from par.venvs.python import PROBE, VALIDATE_TIMEOUT_S, BasePython

# The file identities deciding how a venv's python runs (see run_identity).
Identity = tuple[tuple[int, ...], ...]


def run_identity(path: Path) -> Identity | None:
    """What decides how the venv's python runs, as file identities: the venv folder
    (a rebuilt venv is a new folder; its mtime changes with every reuse's metadata
    write, so only its inode counts), bin/python (a link), the interpreter it
    resolves to, and pyvenv.cfg.  None when one of them cannot be read."""
    try:
        folder = path.stat()
        files = (venv_python(path).lstat(), venv_python(path).stat(), (path / "pyvenv.cfg").stat())
    except OSError:
        return None
    return ((folder.st_dev, folder.st_ino),
            *((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in files))


class Validator:
    """Validates venvs and layers, remembering which ones ran and checked out."""

    def __init__(self, cfg: Config, base: BasePython) -> None:
        self.base = base
        self.layers = layout.layers(cfg)
        self._lock = threading.Lock()
        # venv path -> file identities when its python last ran and checked out
        self._proven: dict[Path, Identity] = {}

    def check(self, path: Path, requirements_sha: str) -> str | None:
        """Why the venv (or layer) at `path` must not be reused, or None when it is good.

        A venv is good when its own files check out and so does the layer it links.
        """
        base = self.base.info()
        python = venv_python(path)
        if not python.exists():
            return "bin/python is missing"
        meta = read_meta(path)
        if meta is None:
            return f"{METADATA_FILE} is missing or unreadable"
        if meta.requirements_sha256 != requirements_sha:
            return "requirements hash differs from the metadata"
        if meta.python != str(base.path):
            return f"built from {meta.python}, configured interpreter is {base.path}"
        if meta.python_version != base.version:
            return f"built for Python {meta.python_version}, interpreter is now {base.version}"
        if meta.layer is not None:
            layer = self.layers / meta.layer
            linked = linked_layer(path)
            if linked is None or not same_path(linked, layer):
                return f"site-packages does not link its layer {meta.layer}"
            problem = self.check(layer, requirements_sha)
            if problem is not None:
                return f"its layer {meta.layer}: {problem}"
        identity = run_identity(path)
        with self._lock:
            if identity is not None and self._proven.get(path) == identity:
                # Ran and checked out before, and neither the venv's folder, its python
                # link, the interpreter behind it nor pyvenv.cfg changed since: running
                # it again (tens of ms of every redeploy) would prove nothing new.
                return None
        result = procs.run([str(python), "-I", "-S", "-c", PROBE], timeout=VALIDATE_TIMEOUT_S,
                           env=procs.child_env(), cwd=path)
        lines = result.output.splitlines()
        if not result.ok or len(lines) < 2:
            return f"bin/python does not run: {result.tail(3) or result.returncode}"
        prefix, version = lines[-2], lines[-1]
        if os.path.realpath(prefix) != os.path.realpath(path):
            return f"sys.prefix is {prefix}, not the venv"
        if version != meta.python_version:
            return f"bin/python is Python {version}, metadata says {meta.python_version}"
        if identity is not None:
            with self._lock:
                self._proven[path] = identity
        return None

    def put_in_place(self, tmp: Path, final: Path, requirements_sha: str, what: str) -> None:
        """Validate a finished build and rename it to its final name (durably).

        The rename keeps its files, so their validation carries over to `final`."""
        problem = self.check(tmp, requirements_sha)
        if problem is not None:
            raise ParError("venv_invalid", f"the new {what} does not validate: {problem}",
                           None, 500)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        with self._lock:
            identity = self._proven.pop(tmp, None)
            if identity is not None and identity == run_identity(final):
                self._proven[final] = identity
