"""Which files a deployment owns, and deleting those no deployment needs any more.

A package, an extraction or a venv is deleted only when no deployment that
could run again (a current one, or one in flight) refers to it.  Callers hold
the agent's lock: no deploy of that agent can take a new reference meanwhile,
and the names of packages, extractions and venvs start with the agent's id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from par import layout
from par.config import Config
from par.fetch import forget_sources
from par.fsutil import remove_tree
from par.store import Deployment, Store
from par.venvs import VenvManager


def keepers(store: Store, exclude: str) -> list[Deployment]:
    """Deployments that could run again, but `exclude`."""
    return [x for x in store.currents() + store.in_flight() if x.deployment_id != exclude]


def remove_unused(cfg: Config, store: Store, venvs: VenvManager, logger: logging.Logger,
                  paths: list[Path], exclude: str) -> list[str]:
    """Delete those of `paths` (packages, extractions, venvs) that no deployment but
    `exclude` that could run again refers to; return what was deleted."""
    kept = keepers(store, exclude)
    files_in_use = {f for x in kept if x.package_digest is not None or x.venv
                    for f in layout.deployment_files(cfg, x.agent_app_id, x.version,
                                                     x.package_digest)}
    venvs_in_use = {x.venv for x in kept if x.venv}
    venvs_dir = layout.venvs(cfg)
    removed: list[str] = []
    for path in paths:
        is_venv = path.parent == venvs_dir
        if (path.name in venvs_in_use) if is_venv else (path in files_in_use):
            continue
        try:
            if is_venv:
                if venvs.remove(path.name):  # with its layer, once unlinked
                    removed.append(str(path))
            elif path.exists():
                remove_tree(path)
                removed.append(str(path))
        except OSError as exc:
            logger.warning("cleanup failed", extra={"fields": {"path": str(path),
                                                                 "error": str(exc)}})
    return removed


def purge(cfg: Config, store: Store, venvs: VenvManager, logger: logging.Logger,
          d: Deployment) -> list[str]:
    """Delete the deployment's package, extraction and venv unless another deployment
    that could run again uses them; forget its package's source when none does."""
    paths = list(layout.deployment_files(cfg, d.agent_app_id, d.version, d.package_digest))
    if d.venv:
        paths.append(layout.venv(cfg, d.venv))
    removed = remove_unused(cfg, store, venvs, logger, paths, exclude=d.deployment_id)
    if not any(x.version == d.version and x.agent_app_id == d.agent_app_id
               for x in keepers(store, d.deployment_id)):
        forget_sources(cfg, d.agent_app_id, d.version)
    return removed
