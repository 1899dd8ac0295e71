"""What PAR records about a venv or layer it built: `par-venv.json`, and the
requirements file kept beside it."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from par.fsutil import atomic_write_text
from par.log import event
from par.venvs.naming import LAYER_KEY_RE

# 2: venvs link a shared layer (`layer`); schema-1 venvs are rebuilt once.
SCHEMA_VERSION = 2
METADATA_FILE = "par-venv.json"
# The effective requirements the venv was built from, kept for inspection.
REQUIREMENTS_FILE = "par-requirements.txt"
# last_used is rewritten at most this often (LRU needs no finer grain; each write
# is two fsyncs on every redeploy)
TOUCH_EVERY_S = 60.0


@dataclass(frozen=True)
class VenvMeta:
    """What PAR records about a venv or layer it built: `par-venv.json` holds these
    fields as a JSON object (schema 2)."""

    package_id: str
    agent_app_id: str | None
    requirements_sha256: str
    # The base interpreter's path and exact version ("3.11.2") at build time.
    python: str
    python_version: str
    installer: str
    installer_version: str
    created_at: float
    build_seconds: float
    last_used: float
    # The layer (key) whose packages the venv links; None for a layer itself.
    layer: str | None = None
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, object]:
        """The JSON object `par-venv.json` holds."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object) -> VenvMeta:
        """Parse `raw`; ValueError when it is not metadata of this schema."""
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"not schema-{SCHEMA_VERSION} venv metadata")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(raw) != names:
            raise ValueError(f"metadata keys differ: {sorted(set(raw) ^ names)}")
        meta = cls(**raw)
        for key in ("package_id", "requirements_sha256", "python", "python_version", "installer"):
            if not isinstance(getattr(meta, key), str):
                raise ValueError(f"metadata {key} is not a string")
        if meta.layer is not None and not LAYER_KEY_RE.fullmatch(str(meta.layer)):
            raise ValueError("metadata layer is not a layer key")
        return meta


def read_meta(venv: Path) -> VenvMeta | None:
    """The venv's metadata, or None when it is missing or unreadable."""
    try:
        return VenvMeta.from_dict(json.loads((venv / METADATA_FILE).read_text("utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def write_meta(venv: Path, meta: VenvMeta) -> None:
    """Write the venv's metadata atomically."""
    atomic_write_text(venv / METADATA_FILE, json.dumps(meta.to_dict(), indent=2) + "\n")


def last_used(path: Path) -> float:
    """When the venv at `path` was last used: its metadata's, else its folder's mtime."""
    meta = read_meta(path)
    if meta is not None:
        return meta.last_used
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def touch(path: Path, logger: logging.Logger) -> VenvMeta | None:
    """Record a use of the venv at `path` (at most every TOUCH_EVERY_S); return its
    metadata as read before."""
    meta = read_meta(path)
    if meta is None or time.time() - meta.last_used < TOUCH_EVERY_S:
        return meta
    try:
        write_meta(path, dataclasses.replace(meta, last_used=round(time.time(), 3)))
    except OSError as exc:
        # Reuse must not fail because last_used could not be recorded.
        event(logger, "Could not record venv use", logging.WARNING,
              venv=path.name, error=str(exc))
    return meta
