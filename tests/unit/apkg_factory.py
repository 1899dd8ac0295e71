"""Builds agent packages for tests, good and bad, byte by byte where needed.

`zipfile` only writes well-formed archives, so the hostile ones (non-UTF-8
names, lying sizes) are written well-formed with a placeholder and then
patched in place.
"""

from __future__ import annotations

import dataclasses
import stat
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from par.config import Config, Limits, with_state_dir

GOOD_MANIFEST = "name: demo-agent\nversion: 1.0.0\nentrypoint: main:handler\n"
GOOD_MAIN = "def handler(context):\n    return {'ok': True}\n"


@dataclass(frozen=True)
class Entry:
    """One archive entry; `mode` includes the file type bits (e.g. stat.S_IFLNK | 0o777)."""

    name: str
    data: bytes = b""
    mode: int | None = stat.S_IFREG | 0o644
    create_system: int = 3
    extra: bytes = b""
    compress: int = zipfile.ZIP_DEFLATED
    flag_bits: int = 0  # set after writing (zipfile computes its own)


def make_cfg(tmp_path: Path, **limits: int | float) -> Config:
    """A Config rooted in `tmp_path/state`, with `limits` overridden."""
    cfg = with_state_dir(Config(), tmp_path / "state")
    return dataclasses.replace(cfg, limits=dataclasses.replace(Limits(), **limits))


def write_zip(path: Path, entries: list[Entry]) -> Path:
    """Write `entries` to a zip at `path` (duplicates allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        with zipfile.ZipFile(path, "w") as zf:
            for e in entries:
                info = zipfile.ZipInfo(e.name, (2024, 1, 1, 0, 0, 0))
                info.create_system = e.create_system
                if e.mode is not None:
                    info.external_attr = e.mode << 16
                if e.name.endswith("/"):
                    info.external_attr |= 0x10  # MS-DOS directory bit
                info.compress_type = e.compress
                info.extra = e.extra
                zf.writestr(info, e.data)
    for e in entries:
        if e.flag_bits:
            patch_header(path, e.name, "flag_bits", 0x800 * (not e.name.isascii()) | e.flag_bits)
    return path


def package(path: Path, files: dict[str, str | bytes], manifest: str | None = GOOD_MANIFEST,
            main: str | None = GOOD_MAIN) -> Path:
    """A package zip: agent.yaml, src/main.py and `files` (name -> content)."""
    entries = []
    if manifest is not None:
        entries.append(Entry("agent.yaml", manifest.encode()))
    if main is not None:
        entries.append(Entry("src/main.py", main.encode()))
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        entries.append(Entry(name, data, stat.S_IFDIR | 0o755 if name.endswith("/") else
                             stat.S_IFREG | 0o644))
    return write_zip(path, entries)


def replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Replace every `old` with `new` (same length) in the file: names in both headers."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


# (local header offset, central header offset, struct format) of patchable fields
_HEADER_FIELDS = {"flag_bits": (6, 8, "<H"), "file_size": (22, 24, "<I")}


def patch_header(path: Path, name: str, field: str, value: int) -> None:
    """Set `field` of entry `name` to `value` in both its local and central headers."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    local_at, central_at, fmt = _HEADER_FIELDS[field]
    for sig, field_at, name_len_at, name_at in ((b"PK\x03\x04", local_at, 26, 30),
                                                 (b"PK\x01\x02", central_at, 28, 46)):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            (name_len,) = struct.unpack_from("<H", data, i + name_len_at)
            if bytes(data[i + name_at:i + name_at + name_len]) == raw:
                struct.pack_into(fmt, data, i + field_at, value)
            start = i + 4
    path.write_bytes(bytes(data))


def pkware_unix_extra(link_target: bytes) -> bytes:
    """A PKWARE UNIX extra field (0x000d) whose variable part names a link target."""
    body = struct.pack("<IIHH", 0, 0, 0, 0) + link_target
    return struct.pack("<HH", 0x000D, len(body)) + body


def tree(root: Path) -> list[str]:
    """Every path below `root`, relative, sorted (empty list if `root` is missing)."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
