"""The venvs' budget (`cfg.venvs`: how many, how many bytes, free space to keep)
and least-recently-used eviction to hold it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from par import layout
from par.config import Config
from par.log import event
from par.venvs.atomic import discard
from par.venvs.counters import VenvCounters
from par.venvs.layers import Layers
from par.venvs.locks import venv_lock
from par.venvs.meta import last_used
from par.venvs.naming import venv_dirs
from par.venvs.sizes import Inodes, free_bytes, inodes, total

# A venv used this recently is never evicted: a deploy that was just handed it
# may not be among the caller's in-use deployments yet.
EVICT_GRACE_S = 600.0


class Budget:
    """Evicts least-recently-used venvs until the budget holds; layers are counted in
    the bytes and deleted with the last venv linking them."""

    def __init__(self, cfg: Config, logger: logging.Logger, layers: Layers,
                 counters: VenvCounters, grace_s: float = EVICT_GRACE_S) -> None:
        self.cfg = cfg
        self.logger = logger
        self.layers = layers
        self.root = layout.venvs(cfg)
        self.grace_s = grace_s
        self.counters = counters

    def evict(self, protect: set[str], incoming: int, *, all_unused: bool = False) -> list[str]:
        """Delete least-recently-used venvs not in `protect` (nor used within `grace_s`)
        until the budget holds with `incoming` more venvs, or, with `all_unused`, all
        of them; return the evicted names."""
        budget = self.cfg.venvs
        present = {p.name: p for p in venv_dirs(self.root)}
        used = {n: last_used(p) for n, p in present.items()}
        recent = time.time() - self.grace_s
        candidates = sorted((n for n in present if n not in protect and used[n] < recent),
                            key=lambda n: used[n])
        sizes: dict[Path, Inodes] | None = None

        def reason() -> str | None:
            nonlocal sizes
            if all_unused:
                return "prune"
            if len(present) + incoming > budget.max_venvs:
                return "max_venvs"
            if free_bytes(self.root) < budget.min_free_bytes:
                return "min_free_bytes"
            if sizes is None:  # walked once, only when the cheap checks pass
                sizes = {p: inodes(p) for p in [*present.values(), *venv_dirs(self.layers.root)]}
            if total(sizes.values()) > budget.max_bytes:
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
                    discard(present.pop(name), self.logger)
                except FileNotFoundError:
                    continue  # already gone
            evicted.append(name)
            self.counters.add("evictions")
            event(self.logger, "Evicted venv", venv=name, reason=why, last_used=used[name])
            for layer in self.layers.drop_unlinked():
                if sizes is not None:
                    sizes.pop(layer, None)
            if sizes is not None:
                sizes.pop(layout.venv(self.cfg, name), None)
        return evicted
