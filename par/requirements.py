"""The package's requirements.txt, checked, plus what its surfaces need.

The effective requirements are the file's text followed by the packages a
declared surface needs and the file does not name (REST: fastapi, uvicorn;
A2A: grpcio, protobuf).  The agent's own lines always win: PAR only appends,
never rewrites.  Their SHA-256 names the venv, so two agents with the same
effective text share one.

Refused, with the line quoted: editable installs (`-e`), local paths and
`file:` URLs (they point outside the package, so the hash would not cover
what gets installed), other requirement files (`-r`, `-c`), index options
unless config allows them, per-requirement options other than `--hash`, and,
with `installer.only_binary`, anything that would build from source.  Lines
are split exactly as pip splits them (backslash continuations joined, then
comments cut); the cases where pip and uv could read a line differently (a
comment ending in a backslash, line breaks other than LF/CRLF) are refused, so
what is checked here is what the installer reads.
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


# Line breaks Python's str.splitlines (pip's) knows beyond "\n" and "\r\n"; uv does not
# split on them, so a line hidden behind one would reach uv unchecked.
_ODD_BREAKS_RE = re.compile(r"\r(?!\n)|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")
# pip's COMMENT_RE: a comment starts at '#' at the line start or after whitespace.
_COMMENT_RE = re.compile(r"(^|\s+)#.*$")
# The only per-requirement option allowed after a requirement (pip-compile writes them).
_PER_REQUIREMENT_OPTION_RE = re.compile(r"\s(-{1,2}[A-Za-z][A-Za-z0-9_-]*)")


def _logical_lines(text: str, label: str = REQUIREMENTS_NAME) -> list[tuple[int, str]]:
    """(first line number, content) of each logical line, split exactly as pip does.

    pip joins a line ending in a backslash with the next one unless it is a comment
    line, then cuts comments.  A comment ending in a backslash is where pip and uv
    could disagree (a line one sees as a comment, the other as a requirement or
    option), so it is refused, as are line breaks other than LF and CRLF.
    """
    odd = _ODD_BREAKS_RE.search(text)
    if odd is not None:
        lineno = text.count("\n", 0, odd.start()) + 1
        raise ParError("requirements_invalid",
                       f"{label} line {lineno}: control character {odd.group()!r} "
                       "(only LF or CRLF line ends are allowed)", label)
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not buf:
            start = lineno
        if line.rstrip().endswith("\\"):
            if _COMMENT_RE.search(line):
                raise ParError(
                    "requirements_continuation",
                    f"{label} line {lineno}: {line!r}: a comment ending in a backslash "
                    "(pip and uv disagree on whether it continues; remove the backslash)",
                    label)
            if not line.endswith("\\"):
                raise ParError(
                    "requirements_continuation",
                    f"{label} line {lineno}: {line!r}: whitespace after a line-continuation "
                    "backslash (pip and uv disagree on it; remove the whitespace)", label)
            buf.append(line.strip("\\"))  # pip's join_lines strips backslashes this way
            continue
        if buf and _COMMENT_RE.match(line):
            line = " " + line  # pip: a comment line ends the continuation, as a comment
        buf.append(line)
        joined = _COMMENT_RE.sub("", "".join(buf)).strip()
        buf = []
        if joined:
            out.append((start, joined))
    if buf:
        joined = _COMMENT_RE.sub("", "".join(buf)).strip()
        if joined:
            out.append((start, joined))
    return out


@dataclass(frozen=True)
class Policy:
    """What a requirements text may contain beyond plain requirements.

    label: how errors name the text (and the ParError's field).
    allow_index_options: index options inside the text (installer.allow_index_options).
    allow_urls: direct URL requirements (`name @ https://...`); prewarm refuses them.
    only_binary: installer.only_binary; sdist URLs and `--no-binary` are refused.
    """

    label: str = REQUIREMENTS_NAME
    allow_index_options: bool = False
    allow_urls: bool = True
    only_binary: bool = False


def _refuse(code: str, lineno: int, line: str, why: str, label: str = REQUIREMENTS_NAME
            ) -> ParError:
    return ParError(code, f"{label} line {lineno}: {line!r}: {why}", label)


def _option_name(line: str) -> str:
    return re.split(r"[\s=]", line, maxsplit=1)[0]


def _url_of(line: str) -> str | None:
    """The URL a requirement line installs from (bare or `name @ url`), or None."""
    spec = line.split(";", 1)[0].strip()
    if _URL_RE.match(spec):
        return spec.split()[0]
    if "@" in spec:
        after = spec.split("@", 1)[1].strip()
        if _URL_RE.match(after):
            return after.split()[0]
    return None


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


def _check_option(lineno: int, line: str, policy: Policy) -> None:
    """Refuse an option line unless the policy allows it."""
    label = policy.label
    option = _option_name(line)
    if option in ("-e", "--editable") or line.startswith("-e"):
        raise _refuse("requirements_editable", lineno, line,
                      "editable installs are not allowed; name a released version", label)
    if option in _INDEX_OPTIONS or line.startswith(("-i", "-f")):
        if policy.allow_index_options:
            return
        raise _refuse("requirements_index_option", lineno, line,
                      f"index options are not allowed in {label} "
                      "(set installer.index_url in the PAR config, or "
                      "installer.allow_index_options)", label)
    if option == "--no-binary" and policy.only_binary:
        raise _refuse("requirements_sdist", lineno, line,
                      "source builds are refused on this host (installer.only_binary)", label)
    if option in _HARMLESS_OPTIONS:
        return
    if option in ("-r", "--requirement", "-c", "--constraint") or line.startswith(("-r", "-c")):
        raise _refuse("requirements_option", lineno, line,
                      "other requirement files are not allowed; list the packages here", label)
    raise _refuse("requirements_option", lineno, line, f"option {option} is not allowed", label)


def check_line(lineno: int, line: str, policy: Policy) -> str | None:
    """Check one logical line; return its normalized project name (None for options/URLs)."""
    label = policy.label
    if line.startswith("-"):
        _check_option(lineno, line, policy)
        return None
    for option in _PER_REQUIREMENT_OPTION_RE.findall(line):
        if option != "--hash":
            raise _refuse("requirements_option", lineno, line,
                          f"option {option} is not allowed after a requirement "
                          "(only --hash is)", label)
    if _looks_local(line):
        raise _refuse("requirements_local", lineno, line,
                      "local paths and file: URLs are not allowed; name a released version",
                      label)
    url = _url_of(line)
    if url is not None:
        if not policy.allow_urls:
            raise _refuse("requirements_url", lineno, line,
                          "direct URLs are not allowed here; name a released version", label)
        if policy.only_binary and not url.split("#", 1)[0].split("?", 1)[0].endswith(".whl"):
            raise _refuse("requirements_sdist", lineno, line,
                          "only wheels are installed on this host (installer.only_binary); "
                          "this URL is not a .whl", label)
    match = _NAME_RE.match(line)
    if match is None:
        if url is not None:
            return None  # a bare URL: pip works out the name when it downloads it
        raise _refuse("requirements_invalid", lineno, line, "not a requirement", label)
    return normalize_name(match.group(1))


def parse_requirements(text: str, policy: Policy | bool = False
                       ) -> tuple[tuple[str, ...], set[str]]:
    """Check every line of `text`; return (logical lines, normalized project names).

    `policy` says what is allowed (a bool: only allow_index_options, for a deploy's
    requirements.txt).  Raises ParError naming `policy.label` and quoting the line.
    """
    if isinstance(policy, bool):
        policy = Policy(allow_index_options=policy)
    lines: list[str] = []
    names: set[str] = set()
    for lineno, line in _logical_lines(text, policy.label):
        name = check_line(lineno, line, policy)
        if name:
            names.add(name)
        lines.append(line)
    return tuple(lines), names


def effective_requirements(root: Path, manifest: Manifest,
                           allow_index_options: bool | Policy) -> Requirements:
    """The requirements PAR installs for the package at `root`, and their hash.

    `allow_index_options`: a bool, or the whole `Policy` (installer.only_binary).

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
