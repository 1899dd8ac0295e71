"""Sealing a finished build: what the unprivileged build wrote becomes root's.

The build unit runs as the build user and may have written anything into the
venv it was given.  Once it has exited, pard (root) walks the tree without
following a symlink: every entry becomes root:root, files lose their write
bits, folders their group/other write and set-id bits.  Only then does pard
read the tree (validation, bytecode, relocation), so nothing the build left
can be changed by a later build, an agent or another local user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from par.errors import ParError

# Folders of the venv skeleton pard reads or walks as root: a symlink in their
# place could lead pard's walks anywhere on the host.
_SKELETON_DIRS = ("bin", "lib")


def _refuse(what: str, why: str) -> ParError:
    return ParError("venv_invalid", f"the new {what} is refused: {why}", None, 500)


def check_skeleton(top: Path, what: str) -> None:
    """Refuse a build whose skeleton folders (bin, lib, lib/pythonX.Y, its
    site-packages) are no longer real folders."""
    dirs = [top / name for name in _SKELETON_DIRS]
    try:
        dirs += [p for p in (top / "lib").iterdir() if p.name.startswith("python")]
    except OSError:
        pass  # lstat below says why
    dirs += [p / "site-packages" for p in dirs if p.parent.name == "lib"]
    for path in dirs:
        try:
            st = path.lstat()
        except FileNotFoundError:
            if path.name == "site-packages":
                continue
            raise _refuse(what, f"{path.relative_to(top)} is missing") from None
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(what, f"{path.relative_to(top)} is not a folder")


def seal(top: Path, build_uid: int | None, what: str) -> None:
    """Make the tree at `top` root's and read-only to everyone but root (see module).

    `build_uid`: the user the build ran as (None: it ran as pard).  Raises ParError
    (`venv_invalid`) for a device, fifo or socket, or a file the build linked from
    elsewhere (owned by neither root nor the build user).
    """
    check_skeleton(top, what)
    as_root = os.geteuid() == 0
    owners = {0, os.geteuid()} | ({build_uid} if build_uid is not None else set())

    def seal_one(path: str) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if as_root:
                os.lchown(path, 0, 0)
            return
        where = os.path.relpath(path, top)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise _refuse(what, f"{where} is not a file or folder")
        if st.st_uid not in owners:
            raise _refuse(what, f"{where} belongs to uid {st.st_uid}, not to the build")
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and st.st_uid == 0:
            return  # sealed before: a cache file an earlier layer links
        if as_root and (st.st_uid, st.st_gid) != (0, 0):
            os.lchown(path, 0, 0)
        mode = stat.S_IMODE(st.st_mode)
        keep = 0o755 if stat.S_ISDIR(st.st_mode) else 0o555
        if mode & ~keep:
            os.chmod(path, mode & keep)

    seal_one(str(top))
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (*dirnames, *filenames):
            seal_one(os.path.join(dirpath, name))
