"""Atomic builds and deletions of venvs and layers.

A build happens in a temporary sibling `.tmp-{name}-{random}` and is renamed
into place only after it validates (par.venvs.validate), so a crash, kill -9
or timeout never leaves a folder a later deploy could take for a good venv;
`cleanup_stale` removes the leftovers at start.  Deletion works the same way
in reverse: rename to a `.tmp-del-` name, then delete.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import tempfile
from pathlib import Path

from par import layout
from par.config import Config
from par.errors import ParError
from par.fsutil import fsync_dir, remove_tree
from par.log import event
from par.venvs.naming import TMP_PREFIX, TRASH_PREFIX


def cleanup_stale(cfg: Config) -> list[str]:
    """Remove temporary build and deletion folders left by a crash; return their names.

    Call once at daemon start, before any build (a running build's temporary
    folder looks the same).
    """
    removed = []
    for root in (layout.venvs(cfg), layout.layers(cfg)):
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


def temp_dir(parent: Path, label: str) -> Path:
    """A new, empty (mode 0700) temporary folder in `parent` for building `label`."""
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{label}-", dir=parent))


def remove_quietly(path: Path, logger: logging.Logger) -> None:
    """Delete `path` if it exists; a failure is logged, not raised."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        remove_tree(path)
    except OSError as exc:
        # A leftover .tmp- folder is harmless (never reused) and cleanup_stale removes it.
        event(logger, "Could not remove temporary venv", logging.WARNING,
              path=str(path), error=str(exc))


def discard(path: Path, logger: logging.Logger) -> None:
    """Delete a venv or layer: rename it out of the way first, so a crash halfway
    through the deletion never leaves a half-deleted venv under its name."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    fsync_dir(path.parent)
    remove_quietly(trash, logger)


def os_error(exc: OSError, name: str) -> ParError:
    """A file-system failure during a build, as the ParError callers act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ParError("disk_full", f"No space left on device while building venv {name}",
                        None, 507)
    return ParError("venv_build_failed", f"Building venv {name} failed: {exc}", None, 500)
