"""Shared layers: the installed packages agents with the same requirements share.

The installer runs once into a *layer*, `layout.layers(cfg)/{key}` (a complete
venv, keyed by the requirements' hash and the interpreter), and each agent's
venv is its own small venv (its pyvenv.cfg, bin/python, metadata) whose
`lib/pythonX.Y/site-packages` is a link to the layer's (par.venvs.links).  Both
are read-only to agents, so sharing the folder gives up nothing that sharing
files by hardlink (as uv does from its cache) did not; what it saves is the
rest: every venv of the typical set used to cost ~1.3 MB of its own folders and
install records, and a new agent with requirements the host already has gets
its venv in milliseconds, without running the installer.  A layer no venv links
any more is deleted with the last one (`Layers.drop_unlinked`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from par import layout
from par.config import Config
from par.fsutil import atomic_write_bytes, atomic_write_text
from par.installers import Installer, compile_bytecode, install_error
from par.log import Timer, event
from par.venvs.atomic import discard, os_error, remove_quietly, temp_dir
from par.venvs.links import link_layer, linked_layer
from par.venvs.locks import venv_lock
from par.venvs.meta import REQUIREMENTS_FILE, VenvMeta, read_meta, write_meta
from par.venvs.naming import layer_key, layer_lock_name, linking_dirs, venv_dirs
from par.venvs.python import BasePython
from par.venvs.seal import seal
from par.venvs.validate import Validator


@dataclass(frozen=True)
class Layer:
    """A layer handed to a venv build: its key, folder, metadata, and whether it existed."""

    key: str
    path: Path
    meta: VenvMeta
    reused: bool


def has_requirements(text: str) -> bool:
    """Whether requirements `text` names anything to install (not only comments)."""
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


def relocate(tmp: Path, final: Path) -> None:
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


class Layers:
    """The layers folder: reuse or build a layer, link a venv to it, drop unlinked ones."""

    def __init__(self, cfg: Config, logger: logging.Logger, base: BasePython,
                 validator: Validator) -> None:
        self.cfg = cfg
        self.logger = logger
        self.base = base
        self.validator = validator
        self.venvs = layout.venvs(cfg)  # where the locks are, and the venvs linking layers
        self.root = layout.layers(cfg)

    def path_of(self, key: str) -> Path:
        """The folder of layer `key`."""
        return self.root / key

    @contextmanager
    def acquire(self, installer: Installer, package_id: str, requirements_text: str,
                requirements_sha: str) -> Iterator[Layer]:
        """The requirements' layer, reused when valid or built, held (locked) while the
        caller links a venv to it: `drop_unlinked` takes the same lock before deleting one."""
        key = layer_key(requirements_sha, self.base.info())
        path = self.path_of(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with venv_lock(self.venvs, layer_lock_name(key)):
            if path.exists() or path.is_symlink():
                problem = self.validator.check(path, requirements_sha)
                meta = read_meta(path)
                if problem is None and meta is not None:
                    event(self.logger, "Reusing installed packages", layer=key,
                          package_id=package_id)
                    yield Layer(key, path, meta, reused=True)
                    return
                event(self.logger, "Invalid layer found, rebuilding", logging.WARNING,
                      layer=key, reason=problem)
                try:
                    discard(path, self.logger)
                except OSError as exc:
                    raise os_error(exc, f"layer {key}") from exc
            meta = self._build(installer, key, package_id, requirements_text, requirements_sha)
            yield Layer(key, path, meta, reused=False)

    def _build(self, installer: Installer, key: str, package_id: str,
               requirements_text: str, requirements_sha: str) -> VenvMeta:
        """Install the requirements into a new layer: a temporary sibling, validated, renamed."""
        final = self.path_of(key)
        fields = {"layer": key, "package_id": package_id, "installer": installer.name}
        base = self.base.info()
        tmp = temp_dir(self.root, key)
        try:
            tmp.chmod(0o755)  # mkdtemp makes it 0700; agents run as other users
            with Timer() as total:
                event(self.logger, "Creating virtual environment", logging.INFO, **fields,
                      python=str(base.path), python_version=base.version)
                with Timer() as create:
                    installer.create_venv(path=tmp, python=base.path, prompt=key)
                # the build may rewrite it: pard puts its own back (it decides how
                # python starts in the venv, so what its stdlib is)
                skeleton_cfg = (tmp / "pyvenv.cfg").read_bytes()
                req_file = tmp / REQUIREMENTS_FILE
                atomic_write_text(req_file, requirements_text)
                install_seconds = 0.0
                build_uid: int | None = None
                if has_requirements(requirements_text):
                    event(self.logger, "Installing dependencies", logging.INFO, **fields,
                          create_seconds=create.seconds)
                    with Timer() as install:
                        installer.install(venv_path=tmp, requirements_file=req_file,
                                          timeout=self.cfg.installer.timeout_s)
                    install_seconds = install.seconds
                    build_uid = installer.runner.build_uid()
                seal(tmp, build_uid, f"layer {key}")
                atomic_write_bytes(tmp / "pyvenv.cfg", skeleton_cfg)
                if has_requirements(requirements_text):
                    self._compile(installer, tmp, install_seconds)
                relocate(tmp, final)
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
                self.validator.put_in_place(tmp, final, requirements_sha, f"layer {key}")
            event(self.logger, "Layer built", logging.INFO, **fields,
                  create_seconds=create.seconds, install_seconds=install_seconds,
                  seconds=total.seconds)
            return meta
        except OSError as exc:
            raise os_error(exc, f"layer {key}") from exc
        finally:
            remove_quietly(tmp, self.logger)

    def _compile(self, installer: Installer, tmp: Path, install_seconds: float) -> None:
        """Bytecode from the shared store, by pard with the base interpreter, in what is
        left of the install timeout (the build is sealed: nothing in it runs)."""
        if not (installer.shared_bytecode and self.cfg.installer.compile_bytecode):
            return
        timeout = self.cfg.installer.timeout_s
        left = max(timeout - install_seconds, 1.0)
        compiled = compile_bytecode(self.cfg, tmp, left, self.base.info().path)
        if not compiled.ok:
            raise install_error(compiled, timeout)

    def build_venv(self, name: str, agent_app_id: str | None, package_id: str,
                   requirements_text: str, requirements_sha: str, layer: Layer) -> float:
        """Make venv `name` linking `layer`: a temporary sibling, validated, renamed.
        Returns the seconds it took."""
        final = layout.venv(self.cfg, name)
        fields = {"venv": name, "package_id": package_id, "layer": layer.key}
        tmp = temp_dir(self.venvs, name)
        try:
            tmp.chmod(0o755)
            with Timer() as total:
                if layer.reused:
                    event(self.logger, "Creating virtual environment", logging.INFO, **fields,
                          python=layer.meta.python, python_version=layer.meta.python_version)
                link_layer(tmp, layer.path, prompt=name)
                atomic_write_text(tmp / REQUIREMENTS_FILE, requirements_text)
                now = round(time.time(), 3)
                write_meta(tmp, dataclasses.replace(
                    layer.meta, package_id=package_id, agent_app_id=agent_app_id,
                    created_at=now, last_used=now, layer=layer.key,
                    build_seconds=round(time.monotonic() - total.start, 3)))
                self.validator.put_in_place(tmp, final, requirements_sha, f"venv {name}")
            event(self.logger, "Venv built", logging.INFO, **fields,
                  installer=layer.meta.installer, layer_reused=layer.reused,
                  seconds=total.seconds)
            return total.seconds
        except OSError as exc:
            raise os_error(exc, name) from exc
        finally:
            remove_quietly(tmp, self.logger)

    def drop_unlinked(self) -> list[Path]:
        """Delete the layers no venv links (builds in progress included); return them."""
        def linked() -> set[str]:
            return {os.path.realpath(layer) for p in linking_dirs(self.venvs)
                    if (layer := linked_layer(p)) is not None}

        dropped = []
        in_use = linked()
        for layer in venv_dirs(self.root):
            if os.path.realpath(layer) in in_use:
                continue
            with venv_lock(self.venvs, layer_lock_name(layer.name), blocking=False) as locked:
                # a build holding the lock is about to link it; look again under the lock
                if not locked or os.path.realpath(layer) in linked():
                    continue
                try:
                    discard(layer, self.logger)
                except FileNotFoundError:
                    continue
            dropped.append(layer)
            event(self.logger, "Removed unused layer", layer=layer.name)
        return dropped
