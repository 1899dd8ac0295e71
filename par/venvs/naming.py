"""Names: of venvs, of layers, of their locks, and which folders below venvs/ are venvs.

A venv is named `{agentAppId}_{sha[:7]}` (or `{name@version}_{sha[:7]}` without an
agentAppId), `sha` being the SHA-256 of the effective requirements.  A layer is
named by a key over the requirements' hash and the interpreter.  Folders whose
name starts with `.` are never venvs: the layers and locks folders (par.layout)
and builds or deletions in progress (`.tmp-...`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from par import ids, layout
from par.errors import ParError

if TYPE_CHECKING:
    from par.venvs.python import PythonInfo

PACKAGE_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}@[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
LAYER_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
# A build in progress: `.tmp-{name}-{random}` beside where it will be renamed to.
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = f"{TMP_PREFIX}del-"  # a venv or layer being deleted


def venv_name(agent_app_id: str | None, package_id: str, requirements_sha: str) -> str:
    """`{agentAppId}_{sha[:7]}`, or `{name@version}_{sha[:7]}` without an agentAppId."""
    if not ids.SHA256_RE.fullmatch(requirements_sha):
        raise ParError("invalid_sha", "requirements sha must be 64 lowercase hex digits",
                       "requirements_sha", 400)
    if agent_app_id is not None:
        owner = ids.agent_id(agent_app_id)
    elif PACKAGE_ID_RE.fullmatch(package_id):
        owner = package_id
    else:
        raise ParError("invalid_id", f"package id {package_id!r} is not name@version",
                       "package_id", 400)
    return f"{owner}_{requirements_sha[:7]}"


def layer_key(requirements_sha: str, python: PythonInfo) -> str:
    """The layer for these requirements and this interpreter (path and exact version)."""
    raw = f"{requirements_sha}\0{python.path}\0{python.version}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def layer_lock_name(key: str) -> str:
    """The lock (par.venvs.locks) of layer `key`: venv names end in `_{sha[:7]}`, layer
    keys hold no `_`, so no venv shares it."""
    return f"layer-{key}"


def venv_dirs(root: Path) -> list[Path]:
    """The venv (or layer) folders in `root`, sorted; temporary and lock folders excluded."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if not p.name.startswith(".") and p.is_dir())


def linking_dirs(root: Path) -> list[Path]:
    """Every folder in venvs/ `root` that may link a layer: venvs and builds in progress
    (not venvs being deleted: they are renamed to `.tmp-del-...` first)."""
    try:
        return [p for p in root.iterdir()
                if p.name not in (layout.LAYER_DIR, layout.LOCK_DIR)
                and not p.name.startswith(TRASH_PREFIX)
                and p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []
