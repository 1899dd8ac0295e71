"""A folder → an .apkg (what `parctl pack` runs).

The archive is deterministic: the same folder gives the same bytes (sorted
entries, fixed timestamps, normalized modes), so its SHA-256 can be compared
and cached.  The manifest is validated first, and nothing PAR's extraction
would refuse (symlinks, special files) is packed.

What is not the agent stays out: local virtual environments, node_modules,
VCS folders, caches, and whatever the folder's `.parignore` names (gitignore
syntax, matched by pathspec, the library made for it).  PAR builds the venv
from requirements.txt; a packed `.venv` would only be refused (it holds links)
or shipped as dead weight.
"""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from par.errors import ParError
from par.fsutil import fsync_dir
from par.manifest import load_manifest

# Folders never packed, wherever they are: local venvs, dependencies of other
# toolchains, VCS data and caches of tools.
SKIP_DIRS = frozenset({
    "__pycache__", ".git", ".hg", ".svn", ".venv", "venv", ".tox", ".nox", "node_modules",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".cache", ".idea", ".vscode",
})
SKIP_SUFFIXES = (".pyc", ".pyo")
IGNORE_FILE = ".parignore"
# The earliest time a zip can store: no build-time clock leaks into the bytes.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _ignored(src: Path) -> Callable[[str], bool]:
    """Whether a path relative to `src` (posix, folders ending in '/') is ignored by
    the folder's `.parignore`."""
    path = src / IGNORE_FILE
    if not path.is_file():
        return lambda rel: False
    import pathspec  # python3-pathspec: only packs with a .parignore need it

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParError("pack_invalid", f"cannot read {IGNORE_FILE}: {exc}", IGNORE_FILE) from exc
    spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    return lambda rel: bool(spec.match_file(rel))


def _files(src: Path, skip: Path | None) -> list[Path]:
    """Every file to pack, relative to `src`, sorted; refuse links and special files."""
    ignored = _ignored(src)
    found: list[Path] = []
    for folder, dirs, files in os.walk(src):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS
                         and not ignored((here / d).relative_to(src).as_posix() + "/"))
        for name in dirs:
            if (here / name).is_symlink():
                raise ParError("pack_symlink", f"{(here / name).relative_to(src)} is a "
                               "symbolic link; packages cannot contain links",
                               str((here / name).relative_to(src)))
        for name in files:
            path = here / name
            rel = path.relative_to(src)
            if name.endswith(SKIP_SUFFIXES) or (skip is not None and path == skip) \
                    or name == IGNORE_FILE or ignored(rel.as_posix()):
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ParError("pack_symlink", f"{rel} is a symbolic link; packages cannot "
                               "contain links", str(rel))
            if not stat.S_ISREG(mode):
                raise ParError("pack_special_file", f"{rel} is not a regular file", str(rel))
            found.append(rel)
    return sorted(found, key=lambda p: p.as_posix())


def pack_folder(src: Path, out: Path) -> Path:
    """Write the package folder `src` as a zip to `out` (atomically) and return `out`.

    Skips SKIP_DIRS, `*.pyc` and what `.parignore` names.  Raises ParError when the
    manifest is invalid or the folder holds a link or a special file.
    """
    if not src.is_dir():
        raise ParError("pack_invalid", f"{src} is not a folder", str(src))
    load_manifest(src)
    out = out.absolute()
    files = _files(src, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                for rel in files:
                    path = src / rel
                    info = zipfile.ZipInfo(rel.as_posix(), _EPOCH)
                    info.create_system = 3  # Unix: the mode below is meaningful
                    executable = path.stat().st_mode & stat.S_IXUSR
                    info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with open(path, "rb") as data, zf.open(info, "w") as entry:
                        while chunk := data.read(1024 * 1024):
                            entry.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return out
