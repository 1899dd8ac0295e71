"""A small `.env` reader (stdlib only).

Supported, one assignment a line: blank lines and `#` comments, an optional
`export ` prefix, `KEY=value` with an unquoted value (a ` #` starts a comment),
a single-quoted value (taken literally) or a double-quoted value (escapes
`\\n \\t \\r \\\\ \\" \\$`).  No variable expansion and no multi-line values.
pard parses `.env` with this same module into the unit's environment, so the
host only fills in keys that are not already set.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "$": "$"}


class DotenvError(ValueError):
    """A line that is not an assignment; carries its 1-based line number."""

    def __init__(self, lineno: int, message: str) -> None:
        super().__init__(f"line {lineno}: {message}")
        self.lineno = lineno


def _double_quoted(body: str, lineno: int) -> tuple[str, str]:
    """Value of a double-quoted string and whatever follows the closing quote."""
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        if ch == '"':
            return "".join(out), body[i + 1 :]
        out.append(ch)
        i += 1
    raise DotenvError(lineno, "unterminated double quote")


def _value(raw: str, lineno: int) -> str:
    raw = raw.strip()
    if raw.startswith("'"):
        end = raw.find("'", 1)
        if end < 0:
            raise DotenvError(lineno, "unterminated single quote")
        value, rest = raw[1:end], raw[end + 1 :]
    elif raw.startswith('"'):
        value, rest = _double_quoted(raw[1:], lineno)
    else:
        # An unquoted '#' only starts a comment after whitespace (URLs keep their fragments).
        match = re.search(r"\s#", raw)
        return (raw[: match.start()] if match else raw).strip()
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise DotenvError(lineno, f"unexpected text after the quoted value: {rest!r}")
    return value


def parse(text: str) -> dict[str, str]:
    """Assignments of a .env file in order; a later key wins. Raises DotenvError."""
    result: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith(("export ", "export\t")):
            stripped = stripped[len("export") :].lstrip()
        key, sep, raw = stripped.partition("=")
        key = key.strip()
        if not sep:
            raise DotenvError(lineno, f"expected KEY=value, got {stripped!r}")
        if not _KEY.match(key):
            raise DotenvError(lineno, f"{key!r} is not a valid variable name")
        result[key] = _value(raw, lineno)
    return result


def load(path: Path, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set the keys of `path` that `environ` lacks; return them. A missing file sets nothing."""
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    added = []
    for key, value in parse(text).items():
        if key not in environ:
            environ[key] = value
            added.append(key)
    return added
