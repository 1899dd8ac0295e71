"""Build locks: one lock file per venv (or layer) name, in par.layout's locks folder.

The lock files live outside the venvs, so deleting a venv never deletes its
lock.  They serialize threads and processes working on the same venv; different
venvs build in parallel.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from par import layout


@contextmanager
def venv_lock(venvs_dir: Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock of venv `name` (below `venvs_dir`, i.e. `layout.venvs(cfg)`);
    yields False (without waiting) when `blocking` is False and someone else holds it.

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
