"""What pard keeps of the past, bounded by par.yaml's `retention` section.

- Events: each deployment keeps its newest `events_per_deployment` (the store
  trims as it writes; `prune_events` trims a store that grew before).
- Past deployments (replaced, failed, removed: neither current nor in flight)
  are history, shown by `parctl deployments`: the newest `history_deployments`
  are kept, none older than `history_days`; their events go with them.
- Packages: an agent's kept packages and their extractions are deleted unless a
  deployment that could run again uses them or they are among the agent's
  newest `packages_per_agent` others (a redeploy of a recent version reuses
  them).  Venvs have their own budget (par.venvs).

`after_deploy` runs at the end of every deploy under the agent's lock;
`at_start` once when pard starts, before it serves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from par import layout
from par.config import Config
from par.fetch import forget_sources
from par.fsutil import remove_tree
from par.log import event
from par.ownership import keepers
from par.store import Store

DAY_S = 86400.0


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted."""

    events: int = 0
    deployments: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.events or self.deployments or self.paths)


def _key_of(path: Path) -> str:
    """The package key (`agent@version[@sha12]`) of a package file or an extraction."""
    return path.name.removesuffix(".apkg") if path.suffix == ".apkg" else path.name


def _agent_of(key: str) -> str:
    return key.split("@", 1)[0]  # '@' cannot occur in an agent id


def package_paths(cfg: Config) -> dict[str, list[Path]]:
    """Every kept package file and extraction, by package key (temporary ones left out)."""
    out: dict[str, list[Path]] = {}
    for folder, pattern in ((layout.packages(cfg), "*@*.apkg"), (layout.extracted(cfg), "*@*")):
        if folder.is_dir():
            for path in folder.glob(pattern):
                if not path.name.startswith("."):
                    out.setdefault(_key_of(path), []).append(path)
    return out


def _newest_mtime(paths: list[Path]) -> float:
    times = []
    for path in paths:
        try:
            times.append(path.lstat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times, default=0.0)


def prune_packages(cfg: Config, store: Store, agent: str, keep: int,
                   logger: logging.Logger) -> list[str]:
    """Delete `agent`'s packages and extractions that no deployment that could run again
    uses, but the newest `keep` of them; return what was deleted.  The caller holds the
    agent's lock (a deploy of the agent may be about to record a package it fetched)."""
    in_use = {_key_of(p) for x in keepers(store, exclude="") if x.agent_app_id == agent
              for p in layout.deployment_files(cfg, x.agent_app_id, x.version,
                                                x.package_digest)}
    mine = {key: paths for key, paths in package_paths(cfg).items() if _agent_of(key) == agent}
    spare = sorted((key for key in mine if key not in in_use),
                   key=lambda k: _newest_mtime(mine[k]), reverse=True)
    removed: list[str] = []
    for key in spare[keep:]:
        for path in mine[key]:
            try:
                remove_tree(path) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(str(path))
            except OSError as exc:
                logger.warning("cleanup failed", extra={"fields": {"path": str(path),
                                                                     "error": str(exc)}})
    left = {key.split("@")[1] for key in mine if key not in spare[keep:]}
    for version in {key.split("@")[1] for key in spare[keep:]} - left:
        forget_sources(cfg, agent, version)  # its validators name a package no longer kept
    return removed


def prune_store(cfg: Config, store: Store, now: float) -> Pruned:
    """Past deployments beyond the history bounds, and events beyond the per-deployment one."""
    r = cfg.retention
    gone = store.prune_history(r.history_deployments, now - r.history_days * DAY_S)
    return Pruned(events=store.prune_events(r.events_per_deployment), deployments=tuple(gone))


def after_deploy(cfg: Config, store: Store, agent: str, logger: logging.Logger,
                 now: float) -> Pruned:
    """At the end of a deploy of `agent` (its lock held): the history, and its packages."""
    r = cfg.retention
    gone = store.prune_history(r.history_deployments, now - r.history_days * DAY_S)
    paths = prune_packages(cfg, store, agent, r.packages_per_agent, logger)
    pruned = Pruned(deployments=tuple(gone), paths=tuple(paths))
    if pruned:
        event(logger, "Pruned", deployments=len(gone), paths=paths)
    return pruned


def at_start(cfg: Config, store: Store, lock_of: Callable[[str], threading.Lock],
             logger: logging.Logger, now: float) -> Pruned:
    """Once at start: the store's history and events, and every agent's packages."""
    pruned = prune_store(cfg, store, now)
    paths: list[str] = []
    for agent in sorted({_agent_of(key) for key in package_paths(cfg)}):
        with lock_of(agent):
            paths += prune_packages(cfg, store, agent, cfg.retention.packages_per_agent, logger)
    pruned = Pruned(pruned.events, pruned.deployments, tuple(paths))
    if pruned:
        event(logger, "Pruned", events=pruned.events, deployments=len(pruned.deployments),
              paths=paths)
    return pruned
