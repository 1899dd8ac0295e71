"""Bytes on disk of venvs and their layers, each hardlinked file counted once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from par import layout
from par.config import Config
from par.venvs.links import linked_layer

# (device, inode) -> bytes on disk: a file hardlinked into several trees is one key.
Inodes = dict[tuple[int, int], int]


def inodes(path: Path) -> Inodes:
    """(device, inode) -> bytes on disk of every file and folder under `path`."""
    out: Inodes = {}
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


def total(trees: Iterable[Inodes]) -> int:
    """Bytes on disk of `trees` together, each inode counted once."""
    union: Inodes = {}
    for tree in trees:
        union.update(tree)
    return sum(union.values())


def disk_usage(paths: Iterable[Path]) -> int:
    """Bytes on disk used by `paths` together with the layers their venvs link, each
    hardlinked file and each shared layer counted once."""
    trees: dict[Path, None] = {}
    for path in paths:
        trees[path] = None
        layer = linked_layer(path)
        if layer is not None:
            trees[layer] = None
    return total(inodes(tree) for tree in trees)


def free_bytes(path: Path) -> int:
    """Bytes available to unprivileged users on the filesystem of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def cache_on_same_filesystem(cfg: Config) -> bool:
    """True when the shared cache and the venvs share a filesystem (so uv can
    hardlink instead of copying); worth a warning at start when it is False."""
    def device(path: Path) -> int:
        while not path.exists():
            path = path.parent
        return path.stat().st_dev

    return device(cfg.paths.cache_dir) == device(layout.venvs(cfg))
