"""Where a deployment's files live below `state_dir`: one place names them.

Packages and extractions are keyed by what identifies their bytes, not only
by agent@version: two packages published under one version (a control plane
that republishes, a hot fix) never overwrite each other, so a deployment that
could run again always finds the exact files it was started from.

    packages/{agentAppId}@{version}@{sha256[:12]}.apkg
    extracted/{agentAppId}@{version}@{sha256[:12]}/

'@' cannot occur in ids or versions (par.ids), so a name splits one way only.
Deployments recorded before the package digest was stored (PAR 0.1) keep the
flat `extracted/{agentAppId}@{version}/` they were started from.
"""

from __future__ import annotations

from pathlib import Path

from par.config import Config

DIGEST_CHARS = 12


def package_key(agent_id: str, version: str, sha256: str | None) -> str:
    """The name shared by a package file and its extraction."""
    if sha256 is None:
        return f"{agent_id}@{version}"  # PAR 0.1's flat layout
    return f"{agent_id}@{version}@{sha256[:DIGEST_CHARS]}"


def package_file(cfg: Config, agent_id: str, version: str, sha256: str | None) -> Path:
    """The kept package whose bytes hash to `sha256` (None: PAR 0.1's flat name)."""
    return cfg.paths.packages / f"{package_key(agent_id, version, sha256)}.apkg"


def extraction(cfg: Config, agent_id: str, version: str, sha256: str | None) -> Path:
    """The extracted package a deployment runs (`sha256`: its package's digest)."""
    return cfg.paths.extracted / package_key(agent_id, version, sha256)


def deployment_files(cfg: Config, agent_id: str, version: str,
                     sha256: str | None) -> tuple[Path, Path]:
    """(package file, extraction) of a deployment whose package hashed to `sha256`."""
    return (package_file(cfg, agent_id, version, sha256),
            extraction(cfg, agent_id, version, sha256))


def package_sources(cfg: Config) -> Path:
    """Per agent@version: the URL last fetched and its HTTP validators (par.fetch)."""
    return cfg.paths.packages / ".sources"
