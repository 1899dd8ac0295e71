"""VenvManager, the facade over the venvs folder: `ensure` (reuse or build), `entries`,
`remove`, `prune`, `prewarm`.

The parts it composes: the base interpreter (par.venvs.python), validation
(par.venvs.validate), shared layers (par.venvs.layers), the budget and its
eviction (par.venvs.budget), bytecode pruning (par.venvs.pyc); names, locks,
metadata and sizes come from their own modules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from par import layout
from par.config import Config
from par.errors import ParError
from par.fsutil import atomic_write_text
from par.installers import Installer, UvInstaller, find_uv, select_installer
from par.log import Timer, event
from par.uv_bootstrap import UvBootstrap
from par.venvs.atomic import discard, os_error, remove_quietly, temp_dir
from par.venvs.budget import EVICT_GRACE_S, Budget
from par.venvs.counters import VenvCounters
from par.venvs.layers import Layers
from par.venvs.links import linked_layer
from par.venvs.locks import venv_lock
from par.venvs.meta import REQUIREMENTS_FILE, last_used, read_meta, touch
from par.venvs.naming import venv_dirs, venv_name
from par.venvs.pyc import prune_bytecode_store
from par.venvs.python import BasePython, PythonInfo
from par.venvs.results import PrewarmResult, VenvInfo, VenvResult
from par.venvs.sizes import Inodes, inodes
from par.venvs.validate import Validator


class VenvManager:
    """Owns the venvs folder: `ensure` (reuse or build), `entries`, `remove`, `prune`,
    `prewarm`."""

    def __init__(self, cfg: Config, logger: logging.Logger,
                 installer: Installer | None = None,
                 evict_grace_s: float = EVICT_GRACE_S) -> None:
        self.cfg = cfg
        self.logger = logger
        self.root = layout.venvs(cfg)
        self.layers = layout.layers(cfg)
        self.counters = VenvCounters()
        self._given_installer = installer
        self._installer = installer
        self._installer_lock = threading.Lock()
        # kind auto on a host without uv: pard fetches it (start_uv_bootstrap)
        self.uv_bootstrap = UvBootstrap(cfg, logger, on_ready=self.reset_installer)
        self._python = BasePython(cfg)
        self._validator = Validator(cfg, self._python)
        self._shared = Layers(cfg, logger, self._python, self._validator)
        self._budget = Budget(cfg, logger, self._shared, self.counters, evict_grace_s)

    @property
    def evict_grace_s(self) -> float:
        """Seconds after its last use during which a venv is never evicted."""
        return self._budget.grace_s

    @evict_grace_s.setter
    def evict_grace_s(self, seconds: float) -> None:
        self._budget.grace_s = seconds

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

    def start_uv_bootstrap(self) -> bool:
        """With `installer.kind: auto` and no uv anywhere, fetch uv in the background (and
        again at a later build when it failed); builds use pip meanwhile.  pard calls it
        at start.  Returns whether a fetch started."""
        if self.cfg.installer.kind != "auto" or self._given_installer is not None \
                or find_uv(self.cfg) is not None:
            return False
        self.uv_bootstrap.enable()
        return self.uv_bootstrap.kick()

    def _build_installer(self) -> Installer:
        """The installer for a build; a failed uv fetch is tried again (rate-limited).

        A fetch in progress (the first build after a fresh install) is waited for, up
        to `installer.uv_wait_s`: uv arrives in a few seconds, and builds it then
        makes are several times faster than pip's."""
        installer = self.installer
        if installer.name == "pip" and self.cfg.installer.kind == "auto":
            self.uv_bootstrap.kick()
            if self.uv_bootstrap.status().state == "fetching":
                self.uv_bootstrap.wait(self.cfg.installer.uv_wait_s)
                installer = self.installer  # uv, if it arrived
        return installer

    def fallback_reason(self) -> str | None:
        """Why builds use pip although `installer.kind` is auto (one line), else None."""
        if self.cfg.installer.kind != "auto" or self.installer.name != "pip":
            return None
        st = self.uv_bootstrap.status()
        if st.state == "failed":
            return f"uv {st.version} could not be fetched: {st.reason}"
        if st.state == "fetching":
            return f"uv {st.version} is being fetched; builds use pip until it is in place"
        return ("no uv binary (installer.uv_path, state_dir/tools/uv, PATH): "
                "run `parctl installer install-uv`")

    def installer_status(self) -> dict:
        """What `/health` says of the installer: the one builds use now, and why."""
        installer = self.installer
        out: dict = {"name": installer.name, "version": installer.version(),
                     "configured": self.cfg.installer.kind}
        if isinstance(installer, UvInstaller):
            out["path"] = str(installer.uv)
        st = self.uv_bootstrap.status()
        if st.state != "idle":
            out["bootstrap"] = st.to_dict()
        reason = self.fallback_reason()
        if reason:
            out["reason"] = reason
        return out

    def base_python(self) -> PythonInfo:
        """The configured interpreter and its exact version (probed again after it
        changes, so venvs of the old version stop validating)."""
        return self._python.info()

    def validate(self, path: Path, requirements_sha: str) -> str | None:
        """Why the venv (or layer) at `path` must not be reused, or None when it is good."""
        return self._validator.check(path, requirements_sha)

    def layer_path(self, venv: Path) -> Path | None:
        """The layer a venv links (what its unit must see besides the venv), or None."""
        meta = read_meta(venv)
        return self._shared.path_of(meta.layer) if meta is not None and meta.layer else None

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
        final = layout.venv(self.cfg, name)
        fields = {"venv": name, "package_id": package_id}
        self.root.mkdir(parents=True, exist_ok=True)
        with venv_lock(self.root, name):
            if final.exists() or final.is_symlink():
                problem = self.validate(final, requirements_sha)
                if problem is None:
                    return self._reuse(final, start, fields)
                event(self.logger, "Invalid venv found, rebuilding", logging.WARNING,
                      **fields, reason=problem)
                try:
                    discard(final, self.logger)
                except OSError as exc:
                    self.counters.add("failures")
                    raise os_error(exc, name) from exc
            self.counters.add("misses")
            protect = set(in_use) | {name}
            self._budget.evict(protect, incoming=1)
            installer = self._build_installer()
            try:
                with self._shared.acquire(installer, package_id, requirements_text,
                                          requirements_sha) as layer:
                    try:
                        build_seconds = self._shared.build_venv(
                            name, agent_app_id, package_id, requirements_text,
                            requirements_sha, layer)
                    except BaseException:
                        if not layer.reused:  # nothing links the layer just built: no leftover
                            remove_quietly(layer.path, self.logger)
                        raise
            except ParError as exc:
                self.counters.add("failures")
                event(self.logger, "Venv build failed", logging.ERROR, **fields,
                      code=exc.code, seconds=round(time.monotonic() - start, 3))
                raise
            self.counters.add("builds")
            self.counters.add("build_seconds", build_seconds)
            self._budget.evict(protect, incoming=0)  # the byte budget, now that the size is known
        return VenvResult(final, name, False, layer.meta.installer,
                          round(time.monotonic() - start, 3), layer.path)

    def _reuse(self, path: Path, start: float, fields: Mapping[str, str]) -> VenvResult:
        """The result of reusing the valid venv at `path` (under its lock), recorded."""
        meta = touch(path, self.logger)
        self.counters.add("hits")
        seconds = round(time.monotonic() - start, 3)
        event(self.logger, "Reusing existing venv", logging.INFO, **fields, seconds=seconds)
        layer = self._shared.path_of(meta.layer) if meta and meta.layer else None
        return VenvResult(path, path.name, True, meta.installer if meta else "?", seconds, layer)

    # -- removal and eviction -------------------------------------------------------

    def remove(self, name: str) -> bool:
        """Delete venv `name` (under its lock) and the layer it leaves unlinked; False
        when there was no such venv."""
        path = layout.venv(self.cfg, name)
        with venv_lock(self.root, name):
            if not (path.exists() or path.is_symlink()):
                return False
            discard(path, self.logger)
        self._shared.drop_unlinked()
        return True

    def prune(self, in_use: set[str], *, all_unused: bool = False) -> list[str]:
        """Evict until the budget holds (or, with `all_unused`, every venv not in
        `in_use`), drop layers no venv links and shared bytecode no venv links any
        more; return the evicted names."""
        evicted = self._budget.evict(set(in_use), incoming=0, all_unused=all_unused)
        self._shared.drop_unlinked()
        prune_bytecode_store(self.cfg)
        return evicted

    # -- listing and prewarm ----------------------------------------------------------

    def entries(self, in_use_by: Mapping[str, Iterable[str]] | None = None) -> list[VenvInfo]:
        """Every venv with its size (with its layer; hardlinks counted once), last use,
        users, and the layer it shares.

        `in_use_by` maps a venv name to the deployments using it.
        """
        in_use_by = in_use_by or {}
        venvs = venv_dirs(self.root)
        layers = {p: linked_layer(p) for p in venvs}
        users: dict[Path, int] = {}
        for layer in layers.values():
            if layer is not None:
                users[layer] = users.get(layer, 0) + 1
        walked: dict[Path, Inodes] = {}  # each tree walked once

        def tree(path: Path) -> Inodes:
            if path not in walked:
                walked[path] = inodes(path)
            return walked[path]

        out = []
        for path in venvs:
            meta = read_meta(path)
            layer = layers[path]
            size = {**tree(path), **(tree(layer) if layer is not None else {})}
            out.append(VenvInfo(
                name=path.name, path=path, size_bytes=sum(size.values()),
                last_used=meta.last_used if meta else last_used(path),
                in_use_by=tuple(sorted(in_use_by.get(path.name, ()))),
                package_id=meta.package_id if meta else None,
                agent_app_id=meta.agent_app_id if meta else None,
                python_version=meta.python_version if meta else None,
                installer=meta.installer if meta else None,
                layer=layer.name if layer is not None else None,
                layer_users=users.get(layer, 0) if layer is not None else 0,
            ))
        return out

    def prewarm(self, requirements: str | Path) -> PrewarmResult:
        """Install `requirements` (checked text, or a file of it) into a throwaway venv
        so the shared cache holds everything it needs (the next build of it needs no
        network).  The install runs in the build sandbox like any other."""
        text = requirements.read_text("utf-8") if isinstance(requirements, Path) else requirements
        installer = self._build_installer()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(self.root, "prewarm")
        try:
            tmp.chmod(0o755)
            with Timer() as t:
                event(self.logger, "Prewarming cache", installer=installer.name)
                installer.create_venv(path=tmp, python=self.base_python().path)
                # inside the venv: the only folder of PAR's the build sees
                req_file = tmp / REQUIREMENTS_FILE
                atomic_write_text(req_file, text)
                installer.install(venv_path=tmp, requirements_file=req_file,
                                  timeout=self.cfg.installer.timeout_s)
            return PrewarmResult(installer.name, t.seconds)
        finally:
            remove_quietly(tmp, self.logger)
