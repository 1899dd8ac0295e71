"""The host's pip: the one pip PAR runs, so no venv carries a pip of its own.

Debian's `python3-pip` (a dependency of the package) gives the base
interpreter a `pip` module; `pip --python <venv>/bin/python install ...`
(pip >= 22.3) installs into a venv made `--without-pip`.  Without it, Debian's
`python3-pip-whl` (which python3-venv pulls in) still has pip as a wheel, and a
wheel on `sys.path` runs: `<venv>/bin/python <wheel>/pip install ...` installs
into that venv.  Either way the venv gets only what its requirements name.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from par import procs
from par.build_sandbox import build_env
from par.errors import ParError

# Debian's python3-pip-whl (a dependency of python3-venv): pip as a wheel.
DEBIAN_PIP_WHEELS = Path("/usr/share/python-wheels")
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class HostPip:
    """How to run the host's pip: the base interpreter's module, or a pip wheel."""

    python: Path
    version: str
    wheel: Path | None = None  # None: `python -m pip`

    def command(self) -> list[str]:
        """argv prefix of a pip acting for `python` itself (`download` needs no target)."""
        if self.wheel is None:
            return [str(self.python), "-m", "pip"]
        return [str(self.python), "-I", f"{self.wheel}/pip"]

    def install_command(self, target: Path) -> list[str]:
        """argv prefix of a pip whose `install` goes into the interpreter `target` (a venv's)."""
        if self.wheel is None:
            # a general option: it must come before the subcommand (pip 23.0)
            return [str(self.python), "-m", "pip", "--python", str(target)]
        return [str(target), "-I", f"{self.wheel}/pip"]

    @property
    def readable(self) -> list[Path]:
        """What a sandboxed build must be able to read besides the OS (the wheel)."""
        return [self.wheel] if self.wheel is not None else []


def _wheel_version(wheel: Path) -> str:
    # pip-23.0.1-py3-none-any.whl -> 23.0.1
    parts = wheel.name.split("-")
    return parts[1] if len(parts) > 1 else "?"


def probe(python: Path, wheels: Path = DEBIAN_PIP_WHEELS) -> HostPip:
    """The host's pip for `python`: its own pip module (>= 22.3, for --python), else
    Debian's pip wheel; ParError when there is neither."""
    result = procs.run([str(python), "-I", "-c", "import pip; print(pip.__version__)"],
                       timeout=PROBE_TIMEOUT_S, env=build_env({"HOME": "/tmp"}))
    if result.ok:
        version = result.output.strip().splitlines()[-1]
        try:
            major, minor = (int(x) for x in version.split(".")[:2])
        except ValueError:
            major, minor = 0, 0
        if (major, minor) >= (22, 3):
            return HostPip(python, version)
    found = sorted(wheels.glob("pip-*.whl"))
    if found:
        return HostPip(python, _wheel_version(found[-1]), found[-1])
    raise ParError("installer_broken",
                   f"no pip for {python}: install python3-pip (or python3-venv, which brings "
                   "Debian's pip wheel)", "installer.python", 500)


class HostPipCache:
    """`probe`, asked once (a lock makes concurrent builds wait for one probe)."""

    def __init__(self, python: Path) -> None:
        self.python = python
        self._found: HostPip | None = None
        self._lock = threading.Lock()

    def get(self) -> HostPip:
        """The host's pip (probed at the first call)."""
        with self._lock:
            if self._found is None:
                self._found = probe(self.python)
            return self._found
