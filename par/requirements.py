"""The package's requirements.txt, checked, plus what its surfaces need.

The effective requirements are the file's text followed by the packages a
declared surface needs and the file does not name (REST: fastapi, uvicorn;
A2A: grpcio, protobuf).  The agent's own lines always win: PAR only appends,
never rewrites.  Their SHA-256 names the venv, so two agents with the same
effective text share one.

Refused, with the line quoted: editable installs (`-e`), local paths and
`file:` URLs (they point outside the package, so the hash would not cover
what gets installed), other requirement files (`-r`, `-c`), and index options
unless config allows them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from par.errors import ParError
from par.manifest import Manifest

REQUIREMENTS_NAME = "requirements.txt"

# What each surface's host code imports in the agent's venv.
SURFACE_NEEDS: dict[str, tuple[str, ...]] = {
    "rest": ("fastapi", "uvicorn"),
    "a2a": ("grpcio", "protobuf"),
}

_INDEX_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links",
                  "--trusted-host", "--no-index")
# Global options that change how, not what, is installed.
_HARMLESS_OPTIONS = ("--pre", "--prefer-binary", "--only-binary", "--no-binary",
                     "--require-hashes")
# A PEP 508 project name, followed by extras, a version, a URL, a marker or the end.
_NAME_RE = re.compile(r"^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])"
                      r"(?=\s*(\[|@|;|$|[<>=!~(\s]))")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".tar")


@dataclass(frozen=True)
class Requirements:
    """The effective requirements of one package.

    text: what the installer gets (the file's text, then PAR's additions).
    sha256: hex SHA-256 of `text` encoded as UTF-8.
    lines: the requirement lines of `text`, comments and continuations resolved.
    added: the lines PAR appended for the declared surfaces.
    """

    text: str
    sha256: str
    lines: tuple[str, ...]
    added: tuple[str, ...] = ()

    @property
    def short(self) -> str:
        """The first 7 hex digits, as used in venv names."""
        return self.sha256[:7]


def normalize_name(name: str) -> str:
    """PEP 503 normalized project name (`Foo_Bar.baz` → `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, content) of each logical line: continuations joined, comments cut."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not buf:
            start = lineno
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        joined = "".join(buf)
        buf = []
        # pip: a comment starts at '#' at the line start or after whitespace.
        joined = re.split(r"(^|\s)#", joined, maxsplit=1)[0].strip()
        if joined:
            out.append((start, joined))
    if buf:
        joined = re.split(r"(^|\s)#", "".join(buf), maxsplit=1)[0].strip()
        if joined:
            out.append((start, joined))
    return out


def _refuse(code: str, lineno: int, line: str, why: str) -> ParError:
    return ParError(code, f"requirements.txt line {lineno}: {line!r}: {why}", REQUIREMENTS_NAME)


def _option_name(line: str) -> str:
    return re.split(r"[\s=]", line, maxsplit=1)[0]


def _looks_local(line: str) -> bool:
    """A path or file: URL instead of a project name."""
    spec = line.split(";", 1)[0].strip()
    if "@" in spec and not _URL_RE.match(spec):
        spec = spec.split("@", 1)[1].strip()  # `name @ url`: judge the url
    low = spec.lower()
    if low.startswith("file:"):
        return True
    if _URL_RE.match(spec):
        return False
    return (spec.startswith((".", "/", "~", "\\")) or "/" in spec or "\\" in spec
            or low.endswith(_ARCHIVE_SUFFIXES))


def check_line(lineno: int, line: str, allow_index_options: bool) -> str | None:
    """Check one logical line; return its normalized project name (None for options/URLs)."""
    if line.startswith("-"):
        option = _option_name(line)
        if option in ("-e", "--editable") or line.startswith("-e"):
            raise _refuse("requirements_editable", lineno, line,
                          "editable installs are not allowed; name a released version")
        if option in _INDEX_OPTIONS or line.startswith(("-i", "-f")):
            if allow_index_options:
                return None
            raise _refuse("requirements_index_option", lineno, line,
                          "index options are not allowed in requirements.txt "
                          "(set installer.index_url in the PAR config, or "
                          "installer.allow_index_options)")
        if option in _HARMLESS_OPTIONS:
            return None
        if option in ("-r", "--requirement", "-c", "--constraint") or line.startswith(("-r", "-c")):
            raise _refuse("requirements_option", lineno, line,
                          "other requirement files are not allowed; list the packages here")
        raise _refuse("requirements_option", lineno, line, f"option {option} is not allowed")
    if _looks_local(line):
        raise _refuse("requirements_local", lineno, line,
                      "local paths and file: URLs are not allowed; name a released version")
    match = _NAME_RE.match(line)
    if match is None:
        if _URL_RE.match(line):
            return None  # a bare URL: pip works out the name when it downloads it
        raise _refuse("requirements_invalid", lineno, line, "not a requirement")
    return normalize_name(match.group(1))


def parse_requirements(text: str, allow_index_options: bool) -> tuple[tuple[str, ...], set[str]]:
    """Check every line of `text`; return (logical lines, normalized project names)."""
    lines: list[str] = []
    names: set[str] = set()
    for lineno, line in _logical_lines(text):
        name = check_line(lineno, line, allow_index_options)
        if name:
            names.add(name)
        lines.append(line)
    return tuple(lines), names


def effective_requirements(root: Path, manifest: Manifest,
                           allow_index_options: bool) -> Requirements:
    """The requirements PAR installs for the package at `root`, and their hash.

    Raises ParError (field "requirements.txt") quoting the first refused line.
    """
    path = root / REQUIREMENTS_NAME
    text = ""
    if path.is_symlink():
        raise ParError("requirements_invalid", "requirements.txt must be a regular file",
                       REQUIREMENTS_NAME)
    if path.is_file():
        try:
            # utf-8-sig: editors on Windows prepend a BOM pip ignores too.
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ParError("requirements_invalid",
                           f"requirements.txt is not UTF-8 text: {exc.reason}",
                           REQUIREMENTS_NAME) from exc
    lines, names = parse_requirements(text, allow_index_options)
    added: list[str] = []
    for surface in manifest.surfaces:
        for need in SURFACE_NEEDS.get(surface, ()):
            if normalize_name(need) not in names and need not in added:
                added.append(need)
    if added:
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(f"{need}\n" for need in added)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Requirements(text=text, sha256=digest, lines=lines + tuple(added), added=tuple(added))
