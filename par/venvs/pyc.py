"""Pruning of the shared bytecode store (`layout.pyc_cache`), whose .pyc files
par.installers hardlinks into each venv."""

from __future__ import annotations

import os

from par import layout
from par.config import Config


def prune_bytecode_store(cfg: Config) -> int:
    """Delete .pyc files of the shared store that no venv links (link count 1);
    return how many."""
    removed = 0
    for dirpath, _, filenames in os.walk(layout.pyc_cache(cfg)):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                if os.lstat(path).st_nlink == 1:
                    os.unlink(path)  # a build racing this compiles in place instead
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
