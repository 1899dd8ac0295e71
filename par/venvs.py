"""Per-agent venvs: naming, metadata, validation, atomic build, locks, reuse, LRU eviction.

A venv is named `{agentAppId}_{sha[:7]}` (or `{name@version}_{sha[:7]}` when
there is no agentAppId), where `sha` is the SHA-256 of the effective
requirements.  It is reused only when it validates (`bin/python` runs, its
metadata matches the hash and the base interpreter, `sys.prefix` is the venv);
otherwise it is rebuilt.

Agents with the same requirements share their installed packages: the
installer runs once into a *layer*, `venvs/.layers/{key}` (a complete venv,
keyed by the requirements' hash and the interpreter), and each agent's venv is
its own small venv (its pyvenv.cfg, bin/python, metadata) whose
`lib/pythonX.Y/site-packages` is a link to the layer's.  Both are read-only to
agents, so sharing the folder gives up nothing that sharing files by hardlink
(as uv does from its cache) did not; what it saves is the rest: every venv of
the typical set used to cost ~1.3 MB of its own folders and install records,
and a new agent with requirements the host already has now gets its venv in
milliseconds, without running the installer.  A layer no venv links any more
is deleted with the last one (`prune`, eviction).

A build happens in a temporary sibling `.tmp-{name}-{random}` and is renamed
into place only after it validates, so a crash, kill -9 or timeout never
leaves a folder a later deploy could take for a good venv; `cleanup_stale`
removes the leftovers at start.  Deletion works the same way in reverse
(rename to a `.tmp-` name, then delete).  One lock file per venv name, kept
in `venvs/.locks/` (outside the venv, so deleting a venv never deletes its
lock), serializes threads and processes working on the same venv; different
venvs build in parallel.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from par import ids, layout, procs
from par.config import Config
from par.errors import ParError
from par.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir, remove_tree
from par.installers import Installer, select_installer, venv_python
from par.log import Timer, event

# 2: venvs link a shared layer (`layer`); schema-1 venvs are rebuilt once.
SCHEMA_VERSION = 2
METADATA_FILE = "par-venv.json"
# The effective requirements the venv was built from, kept for inspection.
REQUIREMENTS_FILE = "par-requirements.txt"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = f"{TMP_PREFIX}del-"  # a venv or layer being deleted
VALIDATE_TIMEOUT_S = 30.0
# A venv used this recently is never evicted: a deploy that was just handed it
# may not be among the caller's in-use deployments yet.
EVICT_GRACE_S = 600.0
# last_used is rewritten at most this often (LRU needs no finer grain; each write
# is two fsyncs on every redeploy)
TOUCH_EVERY_S = 60.0

PACKAGE_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}@[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LAYER_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
# What a venv's python prints for validation: its prefix and exact version.
# Run with -S: site's own venv detection sets sys.prefix, but its .pth
# processing is skipped, since a package's .pth would run its code as root.
_PROBE = ("import sys, site; "
          "site.addsitepackages = lambda known_paths, prefixes=None: known_paths; "
          "site.venv(None); print(sys.prefix); print(sys.version.split()[0])")


def venv_name(agent_app_id: str | None, package_id: str, requirements_sha: str) -> str:
    """`{agentAppId}_{sha[:7]}`, or `{name@version}_{sha[:7]}` without an agentAppId."""
    if not SHA256_RE.fullmatch(requirements_sha):
        raise ParError("invalid_sha", "requirements sha must be 64 lowercase hex digits",
                       "requirements_sha", 400)
    if agent_app_id is not None:
        owner = ids.agent_id(agent_app_id)
    elif PACKAGE_ID_RE.fullmatch(package_id):
        owner = package_id
    else:
        raise ParError("invalid_id", f"package id {package_id!r} is not name@version",
                       "package_id", 400)
    return f"{owner}_{requirements_sha[:7]}"


@dataclass(frozen=True)
class VenvMeta:
    """What PAR records about a venv or layer it built: `par-venv.json` holds these
    fields as a JSON object (schema 2)."""

    package_id: str
    agent_app_id: str | None
    requirements_sha256: str
    # The base interpreter's path and exact version ("3.11.2") at build time.
    python: str
    python_version: str
    installer: str
    installer_version: str
    created_at: float
    build_seconds: float
    last_used: float
    # The layer (key) whose packages the venv links; None for a layer itself.
    layer: str | None = None
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object) -> VenvMeta:
        """Parse `raw`; ValueError when it is not schema-1 metadata."""
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"not schema-{SCHEMA_VERSION} venv metadata")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(raw) != names:
            raise ValueError(f"metadata keys differ: {sorted(set(raw) ^ names)}")
        meta = cls(**raw)
        for key in ("package_id", "requirements_sha256", "python", "python_version", "installer"):
            if not isinstance(getattr(meta, key), str):
                raise ValueError(f"metadata {key} is not a string")
        if meta.layer is not None and not LAYER_KEY_RE.fullmatch(str(meta.layer)):
            raise ValueError("metadata layer is not a layer key")
        return meta


def read_meta(venv: Path) -> VenvMeta | None:
    """The venv's metadata, or None when it is missing or unreadable."""
    try:
        return VenvMeta.from_dict(json.loads((venv / METADATA_FILE).read_text("utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def write_meta(venv: Path, meta: VenvMeta) -> None:
    """Write the venv's metadata atomically."""
    atomic_write_text(venv / METADATA_FILE, json.dumps(meta.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class PythonInfo:
    """The base interpreter venvs are built from."""

    path: Path
    version: str


@dataclass(frozen=True)
class VenvResult:
    """What `VenvManager.ensure` returns."""

    path: Path
    name: str
    reused: bool
    installer: str
    seconds: float
    # The shared layer it links (bind it into the agent's sandbox too), or None.
    layer: Path | None = None


@dataclass(frozen=True)
class VenvInfo:
    """One row of `VenvManager.list`."""

    name: str
    path: Path
    # Bytes on disk of the venv and its layer, each hardlinked file counted once.
    size_bytes: int
    last_used: float
    in_use_by: tuple[str, ...]
    package_id: str | None
    agent_app_id: str | None
    python_version: str | None
    installer: str | None
    # The layer it shares, and how many venvs link it (this one included).
    layer: str | None = None
    layer_users: int = 0


@dataclass(frozen=True)
class PrewarmResult:
    installer: str
    seconds: float


class VenvCounters:
    """Thread-safe counters for /metrics: hits, misses, builds, failures,
    evictions and build_seconds."""

    FIELDS = ("hits", "misses", "builds", "failures", "evictions", "build_seconds")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(self.FIELDS, 0)

    def add(self, name: str, amount: float = 1) -> None:
        if name not in self._values:
            raise KeyError(name)
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, float]:
        """A consistent copy of all counters."""
        with self._lock:
            out = dict(self._values)
        out["build_seconds"] = round(out["build_seconds"], 3)
        return out


@contextmanager
def venv_lock(venvs_dir: Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock of venv `name`; yields False (without waiting) when
    `blocking` is False and someone else holds it.

    flock locks belong to an open file description, so two threads of one
    process exclude each other as well as two processes do.
    """
    lock_dir = venvs_dir / layout.LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _venv_dirs(root: Path) -> list[Path]:
    """The venv folders in `root` (temporary and lock folders excluded)."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if not p.name.startswith(".") and p.is_dir())


def _all_dirs(root: Path) -> list[Path]:
    """Every folder in `root` that may link a layer: venvs and builds in progress (not
    venvs being deleted: `_discard` renames them to `.tmp-del-...` first)."""
    try:
        return [p for p in root.iterdir()
                if p.name not in (layout.LAYER_DIR, layout.LOCK_DIR) and not p.name.startswith(TRASH_PREFIX)
                and p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []


def cleanup_stale(cfg: Config) -> list[str]:
    """Remove temporary build and deletion folders left by a crash; return their names.

    Call once at daemon start, before any build (a running build's temporary
    folder looks the same).
    """
    removed = []
    for root in (layout.venvs(cfg), layout.venvs(cfg) / layout.LAYER_DIR):
        try:
            entries = list(root.iterdir())
        except FileNotFoundError:
            continue
        stale = [p for p in entries if p.name.startswith(TMP_PREFIX)]
        for path in stale:
            remove_tree(path)
            removed.append(path.name)
        if stale:
            fsync_dir(root)
    return removed


def _inodes(path: Path) -> dict[tuple[int, int], int]:
    """(device, inode) -> bytes on disk of every file and folder under `path`."""
    out: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in filenames)]:
            try:
                st = os.lstat(entry)
            except FileNotFoundError:
                continue
            out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        # os.walk does not follow symlinked folders; lstat them as files.
        for n in dirnames:
            full = os.path.join(dirpath, n)
            if os.path.islink(full):
                st = os.lstat(full)
                out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return out


def linked_layer(venv: Path) -> Path | None:
    """The layer whose packages `venv` links (its site-packages link), or None."""
    try:
        for site in venv.glob("lib/python*/site-packages"):
            if site.is_symlink():
                target = site.parent / os.readlink(site)  # absolute as written: kept as is
                return target.parent.parent.parent  # <layer>/lib/pythonX.Y/site-packages
    except OSError:
        pass  # deleted meanwhile (another removal): it links nothing any more
    return None


def disk_usage(paths: Iterable[Path]) -> int:
    """Bytes on disk used by `paths` together with the layers their venvs link, each
    hardlinked file and each shared layer counted once."""
    seen: dict[tuple[int, int], int] = {}
    trees: dict[Path, None] = {}
    for path in paths:
        trees[path] = None
        layer = linked_layer(path)
        if layer is not None:
            trees[layer] = None
    for tree in trees:
        seen.update(_inodes(tree))
    return sum(seen.values())


def _same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def layer_key(requirements_sha: str, python: PythonInfo) -> str:
    """The layer for these requirements and this interpreter (path and exact version)."""
    raw = f"{requirements_sha}\0{python.path}\0{python.version}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _has_requirements(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


def _relocate(tmp: Path, final: Path) -> None:
    """Rewrite the temporary path to the final one in bin/ scripts and pyvenv.cfg.

    Installers write absolute shebangs (`#!/.../.tmp-x/bin/python`); after the
    rename they must name the final path.  Each file is replaced, never edited
    in place, so a file hardlinked from the cache is never changed.
    """
    old, new = str(tmp).encode(), str(final).encode()
    candidates = [tmp / "pyvenv.cfg"]
    bin_dir = tmp / "bin"
    if bin_dir.is_dir():
        candidates += sorted(bin_dir.iterdir())
    for path in candidates:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 4 * 1024**2:
            continue
        data = path.read_bytes()
        if old not in data or (b"\0" in data and not data.startswith(b"#!")):
            continue  # binaries keep their bytes (a length change would corrupt them)
        atomic_write_bytes(path, data.replace(old, new), mode=path.stat().st_mode & 0o7777)


def _os_error(exc: OSError, name: str) -> ParError:
    """A file-system failure during a build, as the ParError callers act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ParError("disk_full", f"No space left on device while building venv {name}",
                        None, 507)
    return ParError("venv_build_failed", f"Building venv {name} failed: {exc}", None, 500)


def cache_on_same_filesystem(cfg: Config) -> bool:
    """True when the shared cache and the venvs share a filesystem (so uv can
    hardlink instead of copying); worth a warning at start when it is False."""
    def device(path: Path) -> int:
        while not path.exists():
            path = path.parent
        return path.stat().st_dev

    return device(cfg.paths.cache_dir) == device(layout.venvs(cfg))


@dataclass(frozen=True)
class _Layer:
    """A layer handed to a venv build: its key, folder, metadata, and whether it existed."""

    key: str
    path: Path
    meta: VenvMeta
    reused: bool


def _link_layer(venv: Path, layer: Path, prompt: str) -> None:
    """Make `venv` (an empty folder) a venv of the layer's interpreter whose
    site-packages is the layer's.

    A venv is its pyvenv.cfg and bin/python: Python finds pyvenv.cfg beside its
    executable's folder and takes the venv as its prefix.  The interpreter links
    are copied from the layer (they point at the base interpreter); the layer's
    console scripts are linked, so they run (with the layer's python) from here
    too; activate scripts name the layer, so they are left out.
    """
    cfg_lines = [line for line in (layer / "pyvenv.cfg").read_text().splitlines()
                 if not line.replace(" ", "").startswith(("prompt=", "command="))]
    (venv / "pyvenv.cfg").write_text("\n".join([*cfg_lines, f"prompt = {prompt}"]) + "\n")
    (venv / "bin").mkdir(mode=0o755)
    for entry in sorted((layer / "bin").iterdir()):
        target = venv / "bin" / entry.name
        if entry.is_symlink():
            target.symlink_to(os.readlink(entry))  # python, python3, python3.X
        elif entry.name.startswith("python"):
            os.link(entry, target)  # an interpreter copied rather than linked
        elif not entry.name.lower().startswith(("activate", "deactivate")):
            target.symlink_to(entry)
    for site in sorted(layer.glob("lib/python*/site-packages")):
        own = venv / site.relative_to(layer)
        own.parent.mkdir(mode=0o755, parents=True)
        own.symlink_to(site)
    if (layer / "lib64").is_symlink():
        (venv / "lib64").symlink_to(os.readlink(layer / "lib64"))


def _run_identity(path: Path) -> tuple | None:
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


class VenvManager:
    """Owns the venvs folder: `ensure` (reuse or build), `list`, `prune`, `prewarm`."""

    def __init__(self, cfg: Config, logger: logging.Logger,
                 installer: Installer | None = None,
                 evict_grace_s: float = EVICT_GRACE_S) -> None:
        self.cfg = cfg
        self.evict_grace_s = evict_grace_s
        self.logger = logger
        self.root = layout.venvs(cfg)
        self.layers = self.root / layout.LAYER_DIR
        self.counters = VenvCounters()
        self._given_installer = installer
        self._installer = installer
        self._installer_lock = threading.Lock()
        self._python_lock = threading.Lock()
        self._python_cache: tuple[tuple[int, ...], PythonInfo] | None = None
        # venv path -> file identities when its python last ran and checked out (see validate)
        self._validated: dict[Path, tuple] = {}

    @property
    def installer(self) -> Installer:
        """The configured installer, chosen on first use."""
        with self._installer_lock:
            if self._installer is None:
                self._installer = select_installer(self.cfg)
            return self._installer

    def reset_installer(self) -> None:
        """Choose the installer again at the next build (after `install-uv`)."""
        with self._installer_lock:
            self._installer = self._given_installer

    # -- the base interpreter -------------------------------------------------

    def base_python(self) -> PythonInfo:
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
        with self._python_lock:
            if self._python_cache and self._python_cache[0] == key:
                return self._python_cache[1]
            result = procs.run([str(path), "-I", "-S", "-c", _PROBE], timeout=VALIDATE_TIMEOUT_S,
                               env=procs.child_env())
            lines = result.output.split()
            if not result.ok or len(lines) < 2:
                raise ParError("python_broken", f"base interpreter {path} does not run: "
                               f"{result.tail(5)}", "installer.python", 500)
            info = PythonInfo(path=path, version=lines[-1])
            self._python_cache = (key, info)
            return info

    # -- validation -------------------------------------------------------------

    def validate(self, path: Path, requirements_sha: str) -> str | None:
        """Why the venv (or layer) at `path` must not be reused, or None when it is good.

        A venv is good when its own files check out and so does the layer it links.
        """
        base = self.base_python()
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
            if linked is None or not _same_path(linked, layer):
                return f"site-packages does not link its layer {meta.layer}"
            problem = self.validate(layer, requirements_sha)
            if problem is not None:
                return f"its layer {meta.layer}: {problem}"
        identity = _run_identity(path)
        with self._python_lock:
            if identity is not None and self._validated.get(path) == identity:
                # Ran and checked out before, and neither the venv's folder, its python
                # link, the interpreter behind it nor pyvenv.cfg changed since: running
                # it again (tens of ms of every redeploy) would prove nothing new.
                return None
        result = procs.run([str(python), "-I", "-S", "-c", _PROBE], timeout=VALIDATE_TIMEOUT_S,
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
            with self._python_lock:
                self._validated[path] = identity
        return None

    def _put_in_place(self, tmp: Path, final: Path, requirements_sha: str, what: str) -> None:
        """Validate a finished build and rename it to its final name (durably).

        The rename keeps its files, so their validation carries over to `final`."""
        problem = self.validate(tmp, requirements_sha)
        if problem is not None:
            raise ParError("venv_invalid", f"the new {what} does not validate: {problem}",
                           None, 500)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        with self._python_lock:
            identity = self._validated.pop(tmp, None)
            if identity is not None and identity == _run_identity(final):
                self._validated[final] = identity

    def layer_path(self, venv: Path) -> Path | None:
        """The layer a venv links (what its unit must see besides the venv), or None."""
        meta = read_meta(venv)
        return self.layers / meta.layer if meta is not None and meta.layer else None

    # -- ensure -------------------------------------------------------------------

    def ensure(
        self,
        agent_app_id: str | None,
        package_id: str,
        requirements_text: str,
        requirements_sha: str,
        in_use: set[str],
    ) -> VenvResult:
        """Return a valid venv for these requirements: reuse it or build it.

        `requirements_sha` is the SHA-256 of `requirements_text` (the effective
        requirements).  `in_use` names the venvs current deployments use; eviction
        never touches them (nor this one).  A build reuses the requirements' layer
        when another venv built it already, else installs it.  Raises ParError on
        failure, leaving no partial venv or layer behind.
        """
        start = time.monotonic()
        name = venv_name(agent_app_id, package_id, requirements_sha)
        final = self.root / name
        fields = {"venv": name, "package_id": package_id}
        self.root.mkdir(parents=True, exist_ok=True)
        with venv_lock(self.root, name):
            if final.exists() or final.is_symlink():
                problem = self.validate(final, requirements_sha)
                if problem is None:
                    meta = self._touch(final)
                    self.counters.add("hits")
                    seconds = round(time.monotonic() - start, 3)
                    event(self.logger, "Reusing existing venv", **fields, seconds=seconds)
                    layer = self.layers / meta.layer if meta and meta.layer else None
                    return VenvResult(final, name, True, meta.installer if meta else "?", seconds,
                                      layer)
                event(self.logger, "Invalid venv found, rebuilding", logging.WARNING,
                      **fields, reason=problem)
                try:
                    self._discard(final)
                except OSError as exc:
                    self.counters.add("failures")
                    raise _os_error(exc, name) from exc
            self.counters.add("misses")
            protect = set(in_use) | {name}
            self._evict(protect, incoming=1)
            installer = self.installer
            try:
                with self._layer(installer, package_id, requirements_text,
                                 requirements_sha) as layer:
                    try:
                        build_seconds = self._build(name, agent_app_id, package_id,
                                                    requirements_text, requirements_sha, layer)
                    except BaseException:
                        if not layer.reused:  # nothing links the layer just built: no leftover
                            self._remove_quietly(layer.path)
                        raise
            except ParError as exc:
                self.counters.add("failures")
                event(self.logger, "Venv build failed", logging.ERROR, **fields,
                      code=exc.code, seconds=round(time.monotonic() - start, 3))
                raise
            self.counters.add("builds")
            self.counters.add("build_seconds", build_seconds)
            self._evict(protect, incoming=0)  # the byte budget, now that the size is known
        return VenvResult(final, name, False, layer.meta.installer,
                          round(time.monotonic() - start, 3), layer.path)

    def _touch(self, path: Path) -> VenvMeta | None:
        meta = read_meta(path)
        if meta is None or time.time() - meta.last_used < TOUCH_EVERY_S:
            return meta
        try:
            write_meta(path, dataclasses.replace(meta, last_used=round(time.time(), 3)))
        except OSError as exc:
            # Reuse must not fail because last_used could not be recorded.
            event(self.logger, "Could not record venv use", logging.WARNING,
                  venv=path.name, error=str(exc))
        return meta

    @contextmanager
    def _layer(self, installer: Installer, package_id: str, requirements_text: str,
               requirements_sha: str) -> Iterator[_Layer]:
        """The requirements' layer, reused when valid or built, held (locked) while the
        caller links a venv to it: pruning takes the same lock before deleting one."""
        base = self.base_python()
        key = layer_key(requirements_sha, base)
        path = self.layers / key
        self.layers.mkdir(parents=True, exist_ok=True)
        with venv_lock(self.root, f"layer-{key}"):
            problem = None
            if path.exists() or path.is_symlink():
                problem = self.validate(path, requirements_sha)
                meta = read_meta(path)
                if problem is None and meta is not None:
                    event(self.logger, "Reusing installed packages", layer=key,
                          package_id=package_id)
                    yield _Layer(key, path, meta, reused=True)
                    return
                event(self.logger, "Invalid layer found, rebuilding", logging.WARNING,
                      layer=key, reason=problem)
                try:
                    self._discard(path)
                except OSError as exc:
                    raise _os_error(exc, f"layer {key}") from exc
            meta = self._build_layer(installer, key, package_id, requirements_text,
                                     requirements_sha)
            yield _Layer(key, path, meta, reused=False)

    def _build_layer(self, installer: Installer, key: str, package_id: str,
                     requirements_text: str, requirements_sha: str) -> VenvMeta:
        """Install the requirements into a new layer: a temporary sibling, validated, renamed."""
        final = self.layers / key
        fields = {"layer": key, "package_id": package_id, "installer": installer.name}
        base = self.base_python()
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}-", dir=self.layers))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; agents run as other users
            with Timer() as total:
                event(self.logger, "Creating virtual environment", **fields,
                      python=str(base.path), python_version=base.version)
                with Timer() as create:
                    installer.create_venv(path=tmp, python=base.path, prompt=key)
                req_file = tmp / REQUIREMENTS_FILE
                atomic_write_text(req_file, requirements_text)
                install_seconds = 0.0
                if _has_requirements(requirements_text):
                    event(self.logger, "Installing dependencies", **fields,
                          create_seconds=create.seconds)
                    with Timer() as install:
                        installer.install(venv_path=tmp, requirements_file=req_file,
                                          timeout=self.cfg.installer.timeout_s)
                    install_seconds = install.seconds
                _relocate(tmp, final)
                now = round(time.time(), 3)
                meta = VenvMeta(
                    package_id=package_id, agent_app_id=None,
                    requirements_sha256=requirements_sha,
                    python=str(base.path), python_version=base.version,
                    installer=installer.name, installer_version=installer.version(),
                    created_at=now, build_seconds=round(time.monotonic() - total.start, 3),
                    last_used=now,
                )
                write_meta(tmp, meta)
                self._put_in_place(tmp, final, requirements_sha, f"layer {key}")
            event(self.logger, "Layer built", **fields, create_seconds=create.seconds,
                  install_seconds=install_seconds, seconds=total.seconds)
            return meta
        except OSError as exc:
            raise _os_error(exc, f"layer {key}") from exc
        finally:
            self._remove_quietly(tmp)

    def _build(self, name: str, agent_app_id: str | None, package_id: str,
               requirements_text: str, requirements_sha: str, layer: _Layer) -> float:
        """Make venv `name` linking `layer`: a temporary sibling, validated, renamed."""
        final = self.root / name
        fields = {"venv": name, "package_id": package_id, "layer": layer.key}
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=self.root))
        try:
            tmp.chmod(0o755)
            with Timer() as total:
                if layer.reused:
                    event(self.logger, "Creating virtual environment", **fields,
                          python=layer.meta.python, python_version=layer.meta.python_version)
                _link_layer(tmp, layer.path, prompt=name)
                atomic_write_text(tmp / REQUIREMENTS_FILE, requirements_text)
                now = round(time.time(), 3)
                write_meta(tmp, dataclasses.replace(
                    layer.meta, package_id=package_id, agent_app_id=agent_app_id,
                    created_at=now, last_used=now, layer=layer.key,
                    build_seconds=round(time.monotonic() - total.start, 3)))
                self._put_in_place(tmp, final, requirements_sha, f"venv {name}")
            event(self.logger, "Venv built", **fields, installer=layer.meta.installer,
                  layer_reused=layer.reused, seconds=total.seconds)
            return total.seconds
        except OSError as exc:
            raise _os_error(exc, name) from exc
        finally:
            self._remove_quietly(tmp)

    def _remove_quietly(self, path: Path) -> None:
        if not (path.exists() or path.is_symlink()):
            return
        try:
            remove_tree(path)
        except OSError as exc:
            # A leftover .tmp- folder is harmless (never reused) and cleanup_stale removes it.
            event(self.logger, "Could not remove temporary venv", logging.WARNING,
                  path=str(path), error=str(exc))

    def _discard(self, path: Path) -> None:
        """Delete a venv: rename it out of the way first, so a crash halfway
        through the deletion never leaves a half-deleted venv under its name."""
        trash = path.parent / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        fsync_dir(path.parent)
        self._remove_quietly(trash)

    # -- eviction -------------------------------------------------------------------

    def _last_used(self, path: Path) -> float:
        meta = read_meta(path)
        if meta is not None:
            return meta.last_used
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    def _free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _evict(self, protect: set[str], incoming: int, *, all_unused: bool = False) -> list[str]:
        """Delete least-recently-used venvs not in `protect` until the budget
        (cfg.venvs) holds with `incoming` more venvs; return the evicted names.
        Layers are counted in the bytes and deleted with the last venv linking them."""
        budget = self.cfg.venvs
        present = {p.name: p for p in _venv_dirs(self.root)}
        last_used = {n: self._last_used(p) for n, p in present.items()}
        recent = time.time() - self.evict_grace_s
        candidates = sorted((n for n in present if n not in protect and last_used[n] < recent),
                            key=lambda n: last_used[n])
        sizes: dict[Path, dict[tuple[int, int], int]] | None = None

        def reason() -> str | None:
            nonlocal sizes
            if all_unused:
                return "prune"
            if len(present) + incoming > budget.max_venvs:
                return "max_venvs"
            if self._free_bytes() < budget.min_free_bytes:
                return "min_free_bytes"
            if sizes is None:  # walked once, only when the cheap checks pass
                sizes = {p: _inodes(p) for p in [*present.values(), *_venv_dirs(self.layers)]}
            union: dict[tuple[int, int], int] = {}
            for tree in sizes.values():
                union.update(tree)
            if sum(union.values()) > budget.max_bytes:
                return "max_bytes"
            return None

        evicted = []
        for name in candidates:
            why = reason()
            if why is None:
                break
            with venv_lock(self.root, name, blocking=False) as locked:
                if not locked:
                    continue  # being reused or rebuilt right now
                try:
                    self._discard(present.pop(name))
                except FileNotFoundError:
                    continue  # already gone
            evicted.append(name)
            self.counters.add("evictions")
            event(self.logger, "Evicted venv", venv=name, reason=why, last_used=last_used[name])
            for layer in self._drop_unlinked_layers():
                if sizes is not None:
                    sizes.pop(layer, None)
            if sizes is not None:
                sizes.pop(self.root / name, None)
        return evicted

    def _drop_unlinked_layers(self) -> list[Path]:
        """Delete the layers no venv links (builds in progress included); return them."""
        def linked() -> set[str]:
            return {os.path.realpath(layer) for p in _all_dirs(self.root)
                    if (layer := linked_layer(p)) is not None}

        dropped = []
        in_use = linked()
        for layer in _venv_dirs(self.layers):
            if os.path.realpath(layer) in in_use:
                continue
            with venv_lock(self.root, f"layer-{layer.name}", blocking=False) as locked:
                # a build holding the lock is about to link it; look again under the lock
                if not locked or os.path.realpath(layer) in linked():
                    continue
                try:
                    self._discard(layer)
                except FileNotFoundError:
                    continue
            dropped.append(layer)
            event(self.logger, "Removed unused layer", layer=layer.name)
        return dropped

    def remove(self, name: str) -> bool:
        """Delete venv `name` (under its lock) and the layer it leaves unlinked; False
        when there was no such venv."""
        path = self.root / name
        with venv_lock(self.root, name):
            if not (path.exists() or path.is_symlink()):
                return False
            self._discard(path)
        self._drop_unlinked_layers()
        return True

    def prune(self, in_use: set[str], *, all_unused: bool = False) -> list[str]:
        """Evict until the budget holds (or, with `all_unused`, every venv not in
        `in_use`), drop layers no venv links and shared bytecode no venv links any
        more; return the evicted names."""
        evicted = self._evict(set(in_use), incoming=0, all_unused=all_unused)
        self._drop_unlinked_layers()
        self._prune_bytecode_store()
        return evicted

    def _prune_bytecode_store(self) -> int:
        """Delete .pyc files of the shared store that no venv links (link count 1)."""
        removed = 0
        for dirpath, _, filenames in os.walk(layout.pyc_cache(self.cfg)):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_nlink == 1:
                        os.unlink(path)  # a build racing this compiles in place instead
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    # -- listing and prewarm ----------------------------------------------------------

    def entries(self, in_use_by: Mapping[str, Iterable[str]] | None = None) -> list[VenvInfo]:
        """Every venv with its size (with its layer; hardlinks counted once), last use,
        users, and the layer it shares.

        `in_use_by` maps a venv name to the deployments using it.
        """
        in_use_by = in_use_by or {}
        venvs = _venv_dirs(self.root)
        layers = {p: linked_layer(p) for p in venvs}
        users: dict[Path, int] = {}
        for layer in layers.values():
            if layer is not None:
                users[layer] = users.get(layer, 0) + 1
        walked: dict[Path, dict[tuple[int, int], int]] = {}  # each tree walked once

        def inodes(tree: Path) -> dict[tuple[int, int], int]:
            if tree not in walked:
                walked[tree] = _inodes(tree)
            return walked[tree]

        out = []
        for path in venvs:
            meta = read_meta(path)
            layer = layers[path]
            size = {**inodes(path), **(inodes(layer) if layer is not None else {})}
            out.append(VenvInfo(
                name=path.name, path=path, size_bytes=sum(size.values()),
                last_used=meta.last_used if meta else self._last_used(path),
                in_use_by=tuple(sorted(in_use_by.get(path.name, ()))),
                package_id=meta.package_id if meta else None,
                agent_app_id=meta.agent_app_id if meta else None,
                python_version=meta.python_version if meta else None,
                installer=meta.installer if meta else None,
                layer=layer.name if layer is not None else None,
                layer_users=users.get(layer, 0) if layer is not None else 0,
            ))
        return out

    def prewarm(self, requirements_file: Path) -> PrewarmResult:
        """Install `requirements_file` into a throwaway venv so the shared cache
        holds everything it needs (the next build of it needs no network)."""
        installer = self.installer
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}prewarm-", dir=self.root))
        try:
            with Timer() as t:
                event(self.logger, "Prewarming cache", installer=installer.name,
                      requirements=str(requirements_file))
                installer.create_venv(path=tmp, python=self.base_python().path)
                installer.install(venv_path=tmp, requirements_file=requirements_file,
                                  timeout=self.cfg.installer.timeout_s)
            return PrewarmResult(installer.name, t.seconds)
        finally:
            self._remove_quietly(tmp)
