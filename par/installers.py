"""Installers: how a venv is created and its requirements installed.

Two implementations behind one small interface: `UvInstaller` (fast: a shared
cache hardlinked into every venv) and `PipInstaller` (always available, the
fallback: the host's pip installs into a venv that has no pip of its own, see
par.host_pip).  `select_installer` picks one from the config; par.uv_bootstrap
gives a Debian host (which has no uv package) a uv binary from the configured index.

Installers only run commands and turn failures into `ParError`s; where venvs
live, their names, metadata and locks belong to `par.venvs`.  Creating an
empty venv (the base interpreter's `venv` module) runs as pard; installing
requirements, which runs package code (an sdist's build), runs through a
`par.build_sandbox.Runner`: the unprivileged, sandboxed build unit.
"""

from __future__ import annotations

import os
import shutil
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from par import layout, procs
from par.build_sandbox import DEFAULT_PATH, Runner, build_env, runner_for
from par.config import Config
from par.config import Installer as InstallerConfig
from par.errors import ParError
from par.host_pip import HostPipCache

__all__ = ["DEFAULT_PATH", "build_env"]  # re-exported: what an installer run's env is

# Seconds for steps that do not download anything (creating a venv, --version).
CREATE_TIMEOUT_S = 120.0
VERSION_TIMEOUT_S = 30.0
# Lines of installer output an error carries.
TAIL_LINES = 40

_DISK_FULL_MARKERS = ("No space left on device", "os error 28", "Errno 28", "ENOSPC")


def _env(overrides: dict[str, str | None]) -> dict[str, str]:
    """The child environment: only the operator's variables of ours that
    build_sandbox.PASSED_ENV lists (proxy, CA, index, locale; never PYTHON*, and
    nothing a package sets), then `overrides`."""
    return build_env({"HOME": "/tmp", **overrides})


def is_disk_full(output: str) -> bool:
    """True when an installer's output says the disk (or quota) is full."""
    return any(marker in output for marker in _DISK_FULL_MARKERS)


def install_error(result: procs.ProcResult, timeout: float) -> ParError:
    """The ParError for a failed or timed-out dependency install."""
    if result.timed_out:
        return ParError(
            "dependency_install_timeout",
            f"Dependency installation timed out after {timeout:g} s",
            "requirements.txt",
            504,
        )
    tail = result.tail(TAIL_LINES)
    if is_disk_full(result.output):
        return ParError(
            "disk_full",
            f"No space left on device while installing dependencies:\n{tail}",
            None,
            507,
        )
    return ParError(
        "dependency_install_failed",
        f"Dependency installation failed (exit {result.returncode}):\n{tail}",
        "requirements.txt",
        422,
    )


def _create_error(result: procs.ProcResult, path: Path) -> ParError:
    if is_disk_full(result.output):
        return ParError("disk_full", f"No space left on device creating {path}", None, 507)
    what = "timed out" if result.timed_out else f"failed (exit {result.returncode})"
    return ParError(
        "venv_create_failed",
        f"Creating the virtual environment {path.name} {what}:\n{result.tail(TAIL_LINES)}",
        None,
        500,
    )


def index_args(ic: InstallerConfig, *, uv: bool) -> list[str]:
    """Command-line options for the configured index, wheelhouses, offline mode and
    `only_binary`."""
    args: list[str] = []
    if ic.only_binary:
        args += ["--only-binary", ":all:"]
    if ic.index_url:
        args += ["--index-url", ic.index_url]
    for url in ic.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in ic.find_links:
        args += ["--find-links", link]
    if ic.offline:
        # uv can still use its cache offline (what prewarm fills); pip cannot,
        # so offline pip means find_links only.
        args += ["--offline"] if uv else ["--no-index"]
    return args


# Run by the base interpreter as pard (root), after the build was sealed
# (par.venvs.seal): it never runs the venv's own python, reads regular files
# only and never writes through a symlink.  Stdlib only.  Every .py under lib/
# gets a .pyc hardlinked from a store keyed by the
# source's content, mtime and size (what a timestamp pyc's header holds): the
# sources uv installs are hardlinks of one cached file, so each module is
# compiled once per host and every later venv only links the result.
_COMPILE_SCRIPT = r"""
import hashlib, importlib.util, os, py_compile, shutil, stat, sys
from concurrent.futures import ProcessPoolExecutor

lib, store = sys.argv[1], os.path.join(sys.argv[2], sys.implementation.cache_tag)
if os.path.islink(lib) or not os.path.isdir(lib):
    sys.exit("%s is not a folder" % lib)
MODE = py_compile.PycInvalidationMode.TIMESTAMP

def compile_to(src, cfile):
    try:
        py_compile.compile(src, cfile=cfile, dfile=os.path.relpath(src, lib), doraise=True,
                           invalidation_mode=MODE)
        return True
    except (py_compile.PyCompileError, SyntaxError, ValueError):
        return False  # like compileall: a module that does not compile stays source-only

def build(job):
    src, stored = job
    os.makedirs(os.path.dirname(stored), exist_ok=True)
    tmp = "%s.%d.tmp" % (stored, os.getpid())
    if compile_to(src, tmp):
        os.replace(tmp, stored)

jobs = []
for dirpath, dirnames, filenames in os.walk(lib):
    for name in filenames:
        if not name.endswith(".py"):
            continue
        src = os.path.join(dirpath, name)
        st = os.lstat(src)
        cache = os.path.join(dirpath, "__pycache__")
        if not stat.S_ISREG(st.st_mode) or (os.path.lexists(cache) and (
                os.path.islink(cache) or not os.path.isdir(cache))):
            continue  # a symlink could name any file on the host: never read it as root
        with open(src, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        key = "%s-%d-%d" % (digest, int(st.st_mtime), st.st_size & 0xFFFFFFFF)
        jobs.append((src, os.path.join(store, key[:2], key + ".pyc")))

missing = sorted({stored: src for src, stored in jobs if not os.path.exists(stored)}.items())
if len(missing) > 32 and (os.cpu_count() or 1) > 1:
    with ProcessPoolExecutor() as pool:
        list(pool.map(build, [(src, stored) for stored, src in missing], chunksize=16))
else:
    for stored, src in missing:
        build((src, stored))

linked = compiled = 0
for src, stored in jobs:
    target = importlib.util.cache_from_source(src)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.link(stored, target)
        linked += 1
    except FileExistsError:
        pass
    except FileNotFoundError:  # did not compile, or pruned meanwhile
        compiled += compile_to(src, target)
    except OSError:  # another filesystem or too many links: a copy still works
        shutil.copy2(stored, target)
        compiled += 1
fresh = sum(os.path.exists(stored) for stored, _ in missing)
print("bytecode: %d modules, %d newly compiled, %d linked, %d copied or compiled in place"
      % (len(jobs), fresh, linked, compiled))
"""


def compile_bytecode(cfg: Config, venv_path: Path, timeout: float,
                     python: Path | None = None) -> procs.ProcResult:
    """Give every module under the venv's lib/ a .pyc, shared through
    `cache_dir/pyc` (compiled once per host, hardlinked into each venv), with the
    base interpreter `python` (default: installer.python), never the venv's own.
    Returns the run's result; the caller decides what a failure means."""
    # -I -S: no site, so no package's .pth file runs (as root) during the build
    argv = [str(python or cfg.installer.python), "-I", "-S", "-c", _COMPILE_SCRIPT,
            str(venv_path / "lib"), str(layout.pyc_cache(cfg))]
    return procs.run(argv, timeout=timeout, env=_env({}))


def _prompt(prompt: str | None) -> list[str]:
    return ["--prompt", prompt] if prompt else []


def venv_python(venv_path: Path) -> Path:
    """The interpreter of a venv."""
    return venv_path / "bin" / "python"


class Installer(ABC):
    """Creates venvs and installs requirements into them."""

    name: ClassVar[str]
    # Whether pard compiles bytecode into the shared store after the build
    # (`compile_bytecode`); pip compiles inside the build itself.
    shared_bytecode: ClassVar[bool] = False

    def __init__(self, cfg: Config, runner: Runner | None = None) -> None:
        self.cfg = cfg
        self.runner = runner or runner_for(cfg)
        self._version: str | None = None
        self._version_lock = threading.Lock()

    @abstractmethod
    def create_venv(self, *, path: Path, python: Path, prompt: str | None = None,
                    timeout: float = CREATE_TIMEOUT_S) -> None:
        """Create an empty venv at `path` (an empty or missing folder) from `python`;
        `prompt` is the name activate scripts show (default: the folder's name)."""

    @abstractmethod
    def install(self, *, venv_path: Path, requirements_file: Path,
                timeout: float) -> procs.ProcResult:
        """Install `requirements_file` (a file inside the venv) into the venv through
        the runner (the sandboxed build); raise ParError on failure or timeout."""

    @abstractmethod
    def _query_version(self) -> str: ...

    def version(self) -> str:
        """The installer's version string (asked once per instance)."""
        with self._version_lock:
            if self._version is None:
                self._version = self._query_version()
            return self._version

    def _inputs(self) -> list[Path]:
        """What the build reads besides the venv and cache: local find_links folders."""
        return [Path(link) for link in self.cfg.installer.find_links if link.startswith("/")]

    def _run_build(self, argv: list[str], venv_path: Path, cache: Path, readable: list[Path],
                   env: dict[str, str], timeout: float) -> procs.ProcResult:
        self.runner.prepare([venv_path, cache])
        result = self.runner.run(argv, env=env, writable=[venv_path, cache],
                                 readable=readable + self._inputs(), timeout=timeout)
        if not result.ok:
            raise install_error(result, timeout)
        return result

    def _run_create(self, argv: list[str], path: Path, timeout: float) -> None:
        result = procs.run(argv, timeout=timeout, env=_env({}))
        if not result.ok:
            raise _create_error(result, path)


class UvInstaller(Installer):
    """`python -m venv --without-pip`, then `uv pip install` from the shared cache;
    pard then adds bytecode from the shared store (`compile_bytecode`)."""

    name = "uv"
    shared_bytecode = True

    def __init__(self, cfg: Config, uv: Path, runner: Runner | None = None) -> None:
        super().__init__(cfg, runner)
        self.uv = uv

    @property
    def cache_dir(self) -> Path:
        return layout.installer_cache(self.cfg, "uv")

    def _uv_env(self) -> dict[str, str]:
        return _env({
            "UV_CACHE_DIR": str(self.cache_dir),
            # Hardlinks from the cache: near-zero copy time and disk per venv.
            "UV_LINK_MODE": "hardlink",
            "UV_PYTHON_DOWNLOADS": "never",
            # trust what the host trusts (Debian's store, update-ca-certificates), as pip
            # does, not the roots bundled in uv: UV_SYSTEM_CERTS (uv >= 0.9), and
            # UV_NATIVE_TLS for an older uv an operator points uv_path at (a newer uv
            # ignores it when UV_SYSTEM_CERTS is set)
            "UV_SYSTEM_CERTS": "1",
            "UV_NATIVE_TLS": "1",
            # no uv.toml of the host or of a user: PAR passes every option itself
            "UV_NO_CONFIG": "1",
            "NO_COLOR": "1",
            "VIRTUAL_ENV": None,  # uv must target --python, not an inherited venv
        })

    def create_venv(self, *, path: Path, python: Path, prompt: str | None = None,
                    timeout: float = CREATE_TIMEOUT_S) -> None:
        # The stdlib's venv without pip is as fast as `uv venv` and gives both
        # installers the same layout; uv installs into it through --python.
        argv = [str(python), "-m", "venv", "--without-pip", *_prompt(prompt), str(path)]
        self._run_create(argv, path, timeout)

    def install(self, *, venv_path: Path, requirements_file: Path,
                timeout: float) -> procs.ProcResult:
        argv = [
            str(self.uv), "pip", "install", "--no-progress",
            "--python", str(venv_python(venv_path)),
            "--cache-dir", str(self.cache_dir),
            "--link-mode", "hardlink",
        ]
        argv += index_args(self.cfg.installer, uv=True)
        argv += ["-r", str(requirements_file)]
        # Not uv's --compile-bytecode: it compiles every module again for every venv
        # (seconds per build, a private copy of each .pyc); pard's shared store
        # compiles each module once per host, after the build.
        return self._run_build(argv, venv_path, self.cache_dir, [self.uv], self._uv_env(),
                               timeout)

    def _query_version(self) -> str:
        result = procs.run([str(self.uv), "--version"], timeout=VERSION_TIMEOUT_S,
                           env=self._uv_env())
        if not result.ok:
            raise ParError("installer_broken", f"{self.uv} --version failed: {result.tail(5)}",
                           "installer.uv_path", 500)
        # "uv 0.13.9 (x86_64-unknown-linux-gnu)" -> "0.13.9"
        parts = result.output.split()
        return parts[1] if len(parts) > 1 else result.output.strip()


class PipInstaller(Installer):
    """`python -m venv --without-pip`, then the host's pip installs into it
    (`pip --python <venv>/bin/python install`): no venv carries a pip of its own;
    pard then adds bytecode from the shared store, as for uv."""

    name = "pip"
    shared_bytecode = True

    def __init__(self, cfg: Config, runner: Runner | None = None) -> None:
        super().__init__(cfg, runner)
        self.host_pip = HostPipCache(cfg.installer.python)

    @property
    def cache_dir(self) -> Path:
        return layout.installer_cache(self.cfg, "pip")

    def create_venv(self, *, path: Path, python: Path, prompt: str | None = None,
                    timeout: float = CREATE_TIMEOUT_S) -> None:
        argv = [str(python), "-m", "venv", "--without-pip", *_prompt(prompt), str(path)]
        self._run_create(argv, path, timeout)

    def install(self, *, venv_path: Path, requirements_file: Path,
                timeout: float) -> procs.ProcResult:
        pip = self.host_pip.get()
        argv = [
            *pip.install_command(venv_python(venv_path)), "install",
            "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
            "--cache-dir", str(self.cache_dir),
            # pard compiles into the shared store after the build (compile_bytecode)
            "--no-compile",
        ]
        argv += index_args(self.cfg.installer, uv=False)
        argv += ["-r", str(requirements_file)]
        env = _env({"PIP_CONFIG_FILE": os.devnull})  # no pip.conf of the host or a user
        return self._run_build(argv, venv_path, self.cache_dir, pip.readable, env, timeout)

    def _query_version(self) -> str:
        return self.host_pip.get().version


def _executable(path: Path | None) -> Path | None:
    if path is not None and path.is_file() and os.access(path, os.X_OK):
        return path
    return None


def find_uv(cfg: Config) -> Path | None:
    """The uv binary to use: `installer.uv_path` when set (and nothing else),
    otherwise `state_dir/tools/uv`, then `uv` on PATH; None when there is none."""
    if cfg.installer.uv_path is not None:
        return _executable(cfg.installer.uv_path)
    found = _executable(layout.tools(cfg) / "uv")
    if found:
        return found
    which = shutil.which("uv")
    return _executable(Path(which)) if which else None


def select_installer(cfg: Config) -> Installer:
    """The installer `installer.kind` asks for: auto = uv when found, else pip."""
    kind = cfg.installer.kind
    if kind == "pip":
        return PipInstaller(cfg)
    uv = find_uv(cfg)
    if uv is not None:
        return UvInstaller(cfg, uv)
    if kind == "uv":
        where = cfg.installer.uv_path or f"{layout.tools(cfg) / 'uv'} or PATH"
        raise ParError(
            "uv_not_found",
            f"installer.kind is uv but no uv binary was found at {where}: "
            "run `parctl installer install-uv` or set installer.kind: auto",
            "installer.uv_path",
            500,
        )
    return PipInstaller(cfg)
