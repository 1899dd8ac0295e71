"""What VenvManager's methods return."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VenvResult:
    """What `VenvManager.ensure` returns."""

    path: Path
    name: str
    reused: bool
    installer: str
    seconds: float
    # The shared layer it links (bind it into the agent's sandbox too), or None.
    layer: Path | None = None


@dataclass(frozen=True)
class VenvInfo:
    """One row of `VenvManager.entries`."""

    name: str
    path: Path
    # Bytes on disk of the venv and its layer, each hardlinked file counted once.
    size_bytes: int
    last_used: float
    in_use_by: tuple[str, ...]
    package_id: str | None
    agent_app_id: str | None
    python_version: str | None
    installer: str | None
    # The layer it shares, and how many venvs link it (this one included).
    layer: str | None = None
    layer_users: int = 0


@dataclass(frozen=True)
class PrewarmResult:
    """What `VenvManager.prewarm` returns."""

    installer: str
    seconds: float
