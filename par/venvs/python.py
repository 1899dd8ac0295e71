"""The base interpreter venvs are built from, and the probe that asks a python who it is."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from par import procs
from par.config import Config
from par.errors import ParError

VALIDATE_TIMEOUT_S = 30.0
# What a python prints when probed: its prefix and exact version.  Run with -S:
# site's own venv detection sets sys.prefix, but its .pth processing is skipped,
# since a package's .pth would run its code as root.
PROBE = ("import sys, site; "
         "site.addsitepackages = lambda known_paths, prefixes=None: known_paths; "
         "site.venv(None); print(sys.prefix); print(sys.version.split()[0])")


@dataclass(frozen=True)
class PythonInfo:
    """The base interpreter venvs are built from."""

    path: Path
    version: str


class BasePython:
    """The configured interpreter (`installer.python`), probed once per version of its file."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        # (device, inode, size, mtime) of the interpreter's file -> what it said
        self._cache: tuple[tuple[int, ...], PythonInfo] | None = None

    def info(self) -> PythonInfo:
        """The configured interpreter and its exact version.

        Asked again whenever the interpreter's file changes (an apt upgrade),
        so venvs of the old version stop validating and get rebuilt.
        """
        path = self.cfg.installer.python
        try:
            st = path.resolve().stat()
        except OSError as exc:
            raise ParError("python_missing", f"base interpreter {path} not found",
                           "installer.python", 500) from exc
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._cache and self._cache[0] == key:
                return self._cache[1]
            result = procs.run([str(path), "-I", "-S", "-c", PROBE], timeout=VALIDATE_TIMEOUT_S,
                               env=procs.child_env())
            lines = result.output.split()
            if not result.ok or len(lines) < 2:
                raise ParError("python_broken", f"base interpreter {path} does not run: "
                               f"{result.tail(5)}", "installer.python", 500)
            info = PythonInfo(path=path, version=lines[-1])
            self._cache = (key, info)
            return info
