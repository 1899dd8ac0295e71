"""Size caps on the files pard parses from a package, checked before they are read.

pard parses three files of a package: `agent.yaml`, `.env` and
`requirements.txt`.  Each has a cap in par.yaml (`limits.max_*_bytes`).  The
extraction plan (par.extract) checks an entry's declared size against it, so an
oversized file is refused before one byte is written; extraction already stops
at an entry's declared size when its header lies.  The readers check again on
disk (`read_capped`), so a file placed there another way (an extraction made by
an older pard) is never read whole either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from par.config import Limits
from par.errors import ParError

CODE = "file_too_large"
MANIFEST_NAME = "agent.yaml"
DOTENV_NAME = ".env"
REQUIREMENTS_NAME = "requirements.txt"


@dataclass(frozen=True)
class Cap:
    """The cap of one package file: its name at the package's top, bytes, config key."""

    name: str
    limit: int
    key: str


def caps(limits: Limits) -> dict[str, Cap]:
    """The capped files of a package, by their name at the package's top level."""
    return {cap.name: cap for cap in (
        Cap(MANIFEST_NAME, limits.max_manifest_bytes, "limits.max_manifest_bytes"),
        Cap(DOTENV_NAME, limits.max_dotenv_bytes, "limits.max_dotenv_bytes"),
        Cap(REQUIREMENTS_NAME, limits.max_requirements_bytes, "limits.max_requirements_bytes"),
    )}


def too_large(cap: Cap, size: int) -> ParError:
    """The error for `cap.name` of `size` bytes: names the file, its size and the limit."""
    return ParError(CODE, f"{cap.name} is {size} bytes, more than the limit of {cap.limit} "
                          f"bytes ({cap.key})", cap.name, 400)


def check_size(cap: Cap, size: int) -> None:
    """Raise `file_too_large` when `size` is over the cap."""
    if size > cap.limit:
        raise too_large(cap, size)


def read_capped(path: os.PathLike[str] | str, cap: Cap) -> bytes:
    """The bytes of `path`, refused (`file_too_large`) when over the cap.

    The size is taken from the open file (no symlink followed) before reading,
    and at most `limit + 1` bytes are read: a file that grows meanwhile is
    refused too, never read whole.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        check_size(cap, os.fstat(fh.fileno()).st_size)
        data = fh.read(cap.limit + 1)
    check_size(cap, len(data))
    return data


def check_on_disk(path: os.PathLike[str] | str, cap: Cap) -> None:
    """Raise `file_too_large` when the file at `path` (not followed) is over the cap;
    for readers that open the file themselves.  A missing file passes."""
    try:
        size = os.lstat(path).st_size
    except FileNotFoundError:
        return
    check_size(cap, size)
