"""Safe unzip of an agent package into its folder below `extracted/` (par.layout).

Every entry is checked before anything is written: names (absolute, `..`,
not UTF-8, duplicates), types (symlink, hard link, device, fifo), and the
declared sizes against the limits.  Headers can lie, so while writing the real
bytes are counted again and the extraction stops at the same limits.

Files land in a temporary sibling folder that is renamed into place only when
complete; on any failure it is removed, so `extracted/` never holds a partial
package.  Modes are normalized (files 0644, or 0755 when marked executable;
folders 0755): agents run as other users and must read them, and no
setuid/setgid/sticky bit survives.
"""

from __future__ import annotations

import compileall
import lzma
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from par import ids, layout
from par.config import Config
from par.errors import ParError
from par.file_caps import caps, check_size
from par.fsutil import fsync_dir, remove_tree

# Entries smaller than this are not held to the compression ratio: tiny, very
# compressible files (empty JSON, padding) are common and cannot be a bomb.
RATIO_MIN_BYTES = 1024 * 1024
_CHUNK = 64 * 1024
_UTF8_FLAG = 0x800
_ENCRYPTED_FLAG = 0x1
_UNIX = 3
# PKWARE "UNIX" extra field: its variable part holds the target of a hard or symbolic link.
_PKWARE_UNIX_EXTRA = 0x000D


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    name: str  # the checked name, '/'-separated, relative
    parts: tuple[str, ...]
    is_dir: bool
    executable: bool


def _fail(code: str, message: str, entry: str | None = None) -> ParError:
    return ParError(code, message, entry, 400)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The entry name's bytes as stored (zipfile decoded them as UTF-8 or cp437)."""
    if info.flag_bits & _UTF8_FLAG:
        return info.orig_filename.encode("utf-8", "surrogateescape")
    return info.orig_filename.encode("cp437")


def _decode_name(info: zipfile.ZipInfo) -> str:
    """The entry name as UTF-8, or an error naming it.

    Without the UTF-8 flag the name is in an unknown code page; many tools
    write UTF-8 without setting the flag, so valid UTF-8 is accepted and
    anything else refused (guessing a code page would write the wrong name).
    """
    raw = _raw_name(info)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("archive_bad_name", f"entry name {raw!r} is not valid UTF-8",
                    raw.decode("utf-8", "backslashreplace")) from None


def _link_target_in_extra(extra: bytes) -> bool:
    """True when a PKWARE UNIX extra field carries link data (a hard or symbolic link)."""
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        # fixed part: atime, mtime (4 bytes each), uid, gid (2 bytes each)
        if tag == _PKWARE_UNIX_EXTRA and size > 12:
            return True
        i += 4 + size
    return False


def _check_name(name: str) -> tuple[str, ...]:
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in name):
        raise _fail("archive_bad_name", f"entry {name!r} has control characters in its name", name)
    # Backslashes are separators in archives made on Windows: check them as such.
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise _fail("archive_absolute_path", f"entry {name!r} has an absolute path", name)
    parts = tuple(p for p in unified.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _fail("archive_path_traversal", f"entry {name!r} points outside the package", name)
    if not parts:
        raise _fail("archive_bad_name", f"entry {name!r} has an empty name", name)
    return parts


def _check_type(info: zipfile.ZipInfo, name: str) -> tuple[bool, bool]:
    """(is_dir, executable) of an entry; refuse anything but files and folders."""
    is_dir = info.filename.endswith(("/", "\\"))
    executable = False
    if info.create_system == _UNIX:
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise _fail("archive_symlink", f"entry {name!r} is a symbolic link", name)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise _fail("archive_device", f"entry {name!r} is a device file", name)
        if kind == stat.S_IFIFO:
            raise _fail("archive_fifo", f"entry {name!r} is a fifo", name)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _fail("archive_special_file", f"entry {name!r} is not a regular file", name)
        is_dir = is_dir or kind == stat.S_IFDIR
        executable = bool(mode & stat.S_IXUSR)
    if _link_target_in_extra(info.extra):
        raise _fail("archive_hardlink", f"entry {name!r} is a link to another file", name)
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise _fail("archive_encrypted", f"entry {name!r} is encrypted", name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                  zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        raise _fail("archive_unsupported",
                    f"entry {name!r} uses an unsupported compression method "
                    f"({info.compress_type})", name)
    return is_dir, executable


def _ratio_exceeded(size: int, compressed: int, max_ratio: int) -> bool:
    return size > RATIO_MIN_BYTES and size > max_ratio * max(compressed, 1)


def plan_entries(zf: zipfile.ZipFile, cfg: Config) -> list[_Entry]:
    """Check every entry of an open archive and the declared sizes; write nothing."""
    limits = cfg.limits
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise _fail("archive_too_many_entries",
                    f"the package has {len(infos)} entries, more than the limit "
                    f"of {limits.max_entries}")
    entries: list[_Entry] = []
    seen: dict[tuple[str, ...], bool] = {}  # parts -> is_dir
    capped = caps(limits)  # the files pard parses, by their top-level name
    folders: set[tuple[str, ...]] = set()  # every parent path some entry needs
    total = 0
    for info in infos:
        name = _decode_name(info)
        parts = _check_name(name)
        is_dir, executable = _check_type(info, name)
        shown = "/".join(parts)
        if parts in seen:
            also = "" if shown == name else f" (as {shown!r})"
            raise _fail("archive_duplicate", f"entry {name!r}{also} appears more than once", name)
        # A file must not also be used as a folder, in either order.
        for i in range(1, len(parts)):
            if seen.get(parts[:i]) is False:
                raise _fail("archive_duplicate",
                            f"entry {name!r} is inside {'/'.join(parts[:i])!r}, "
                            "which is a file", name)
            folders.add(parts[:i])
        if not is_dir and parts in folders:
            raise _fail("archive_duplicate", f"entry {name!r} is also used as a folder", name)
        seen[parts] = is_dir
        if not is_dir:
            if len(parts) == 1 and parts[0] in capped:
                # the declared size: _copy_entry stops at it when the header lies
                check_size(capped[parts[0]], info.file_size)
            total += info.file_size
            if total > limits.max_unpacked_bytes:
                raise _fail("archive_too_large",
                            f"the package unpacks to more than the limit of "
                            f"{limits.max_unpacked_bytes} bytes (at entry {name!r})", name)
            if _ratio_exceeded(info.file_size, info.compress_size, limits.max_ratio):
                raise _fail("archive_ratio",
                            f"entry {name!r} expands {info.file_size} bytes from "
                            f"{info.compress_size}, more than the limit ratio of "
                            f"{limits.max_ratio}", name)
        entries.append(_Entry(info, shown, parts, is_dir, executable))
    return entries


def _copy_entry(zf: zipfile.ZipFile, entry: _Entry, out, limits, written_before: int) -> int:
    """Stream one entry into `out`, counting real bytes; return how many were written."""
    written = 0
    try:
        with zf.open(entry.info) as src:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                # Headers can lie: hold the real bytes to the declared size and the budget.
                if written > entry.info.file_size:
                    raise _fail("archive_corrupt",
                                f"entry {entry.name!r} holds more data than its header says",
                                entry.name)
                if written_before + written > limits.max_unpacked_bytes:
                    raise _fail("archive_too_large",
                                f"the package unpacks to more than the limit of "
                                f"{limits.max_unpacked_bytes} bytes (at entry {entry.name!r})",
                                entry.name)
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, struct.error,
            NotImplementedError, RuntimeError) as exc:
        raise _fail("archive_corrupt",
                    f"entry {entry.name!r} cannot be read: {exc}", entry.name) from exc
    if written != entry.info.file_size:
        raise _fail("archive_corrupt",
                    f"entry {entry.name!r} holds {written} bytes, its header says "
                    f"{entry.info.file_size}", entry.name)
    return written


def _write_file(zf: zipfile.ZipFile, entry: _Entry, dest: Path, cfg: Config,
                written_before: int) -> int:
    """Write one file with a normalized mode; return the bytes written."""
    mode = 0o755 if entry.executable else 0o644
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        written = _copy_entry(zf, entry, out, cfg.limits, written_before)
        out.flush()
        # umask may have narrowed the mode; agents need to read the file.
        os.fchmod(out.fileno(), mode)
        os.fsync(out.fileno())
    return written


def _open_zip(apkg: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(apkg)
    except FileNotFoundError:
        raise _fail("package_missing", f"package file {apkg} does not exist") from None
    except UnicodeDecodeError:
        # zipfile decodes flagged-UTF-8 names itself and fails on bad bytes.
        raise _fail("archive_bad_name", "an entry name is marked UTF-8 but is not valid UTF-8") \
            from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, struct.error) as exc:
        with open(apkg, "rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            raise _fail("archive_truncated",
                        f"the package is an incomplete zip archive ({exc})") from None
        raise _fail("archive_invalid", "the package is not a zip archive") from None
    except OSError as exc:
        raise _fail("package_unreadable", f"cannot read package file {apkg}: {exc.strerror}") \
            from None


def _extract_into(zf: zipfile.ZipFile, entries: list[_Entry], root: Path, cfg: Config) -> None:
    total = 0
    for entry in entries:
        target = root.joinpath(*entry.parts)
        # Parents first; exist_ok because several entries share folders.
        for parent in reversed(target.relative_to(root).parents):
            folder = root / parent
            if parent != Path(".") and not folder.is_dir():
                folder.mkdir(mode=0o755)
                os.chmod(folder, 0o755)
        if entry.is_dir:
            if not target.is_dir():
                target.mkdir(mode=0o755)
                os.chmod(target, 0o755)
            continue
        total += _write_file(zf, entry, target, cfg, total)


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temp folders an interrupted extraction of the same package left behind."""
    # '~' cannot occur in an agent id or a version, so no other package matches.
    for stale in parent.glob(f".{name}~*"):
        remove_tree(stale)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, replacing an existing `final` (restored if that fails)."""
    old_dir = None
    if final.exists() or final.is_symlink():
        old_dir = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}~", suffix=".old"))
        os.rename(final, old_dir / "x")
    try:
        os.rename(tmp, final)
    except BaseException:
        if old_dir is not None:
            os.rename(old_dir / "x", final)
            remove_tree(old_dir)
        raise
    fsync_dir(final.parent)
    if old_dir is not None:
        remove_tree(old_dir)


def extract_package(cfg: Config, agent_id: str, version: str, apkg: Path,
                    check: Callable[[Path], object] | None = None,
                    sha256: str | None = None) -> Path:
    """Extract `apkg` into its folder below `extracted/` and return that path.

    The folder is `par.layout.extraction(agent_id, version, sha256)`: `sha256`
    is the digest of `apkg`'s bytes (None: the flat name of PAR 0.1).  It is
    built beside its final path and renamed into place; an existing one is
    replaced.  `check(root)`, when given, runs on the complete temporary folder
    before the rename (e.g. reading agent.yaml and the requirements), so a
    package it refuses never replaces a good one.  Raises ParError (field: the
    offending entry) when the archive is refused; nothing is left behind then.
    """
    ids.agent_id(agent_id)
    ids.version(version)
    final = layout.extraction(cfg, agent_id, version, sha256)
    parent, name = final.parent, final.name
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(parent, name)
    with _open_zip(apkg) as zf:
        entries = plan_entries(zf, cfg)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}~", suffix=".tmp"))
        try:
            _extract_into(zf, entries, tmp, cfg)
            os.chmod(tmp, 0o755)
            if check is not None:
                check(tmp)
            _swap_into_place(tmp, final)
        except BaseException:
            remove_tree(tmp)
            raise
    return final


def compile_sources(root: Path) -> None:
    """Compile the package's Python files into `__pycache__` beside them, readable by all.

    The agent sees its package read-only and runs with PYTHONDONTWRITEBYTECODE,
    so without this every start would compile the agent's own modules again.
    Compiling runs none of the package's code; a file that does not compile is
    left alone (importing it reports the error, naming the file, at start).
    """
    compileall.compile_dir(str(root), quiet=2, legacy=False)
    for cache in root.rglob("__pycache__"):
        os.chmod(cache, 0o755)  # pard's umask may be narrower; agents run as other users
        for pyc in cache.iterdir():
            os.chmod(pyc, 0o644)


def cleanup_stale(cfg: Config) -> list[str]:
    """Remove half-extracted and swapped-out folders a killed pard left behind (at start)."""
    removed = []
    folder = layout.extracted(cfg)
    if folder.is_dir():
        for path in list(folder.glob(".*~*.tmp")) + list(folder.glob(".*~*.old")):
            remove_tree(path)
            removed.append(str(path))
    return removed
