"""Every path PAR keeps on disk, named in one place.

par.yaml configures two roots, `paths.state_dir` and `paths.cache_dir`; all
else is derived here:

    state_dir/
      packages/{agentAppId}@{version}@{sha256[:12]}.apkg   kept packages
      packages/.sources/{agentAppId}@{version}.json       URL + HTTP validators (par.fetch)
      extracted/{agentAppId}@{version}@{sha256[:12]}/     extracted packages
      venvs/{agentAppId}_{sha[:7]}/                       per-agent venvs (par.venvs)
      venvs/.layers/{key}/                                installed packages, shared
      venvs/.locks/                                       build locks
      state/par.db                                        the store
      env/{agentAppId}.env                                agents' EnvironmentFile=s
      host/{digest}/                                      the compiled agent host
      tools/                                              uv fetched by pard
      builds/                                             root-only files of running builds
      front/routes.json                                   the front door's routes (no secret)
    cache_dir/
      uv/  pip/                                           installer caches
      pyc/                                                bytecode, compiled once per host

Packages and extractions are keyed by what identifies their bytes, not only
by agent@version: two packages published under one version (a control plane
that republishes, a hot fix) never overwrite each other, so a deployment that
could run again always finds the exact files it was started from.  '@' cannot
occur in ids or versions (par.ids), so a name splits one way only.
Deployments recorded before the package digest was stored (PAR 0.1) keep the
flat `extracted/{agentAppId}@{version}/` they were started from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from par.config import Config

DIGEST_CHARS = 12
LAYER_DIR = ".layers"  # below venvs/
LOCK_DIR = ".locks"  # below venvs/


def packages(cfg: Config) -> Path:
    """Kept packages (root only)."""
    return cfg.paths.state_dir / "packages"


def extracted(cfg: Config) -> Path:
    """Extracted packages (root only: they hold `.env` files)."""
    return cfg.paths.state_dir / "extracted"


def venvs(cfg: Config) -> Path:
    """Per-agent venvs, and the layers and locks they share."""
    return cfg.paths.state_dir / "venvs"


def venv(cfg: Config, name: str) -> Path:
    """The venv called `name` (par.venvs names them)."""
    return venvs(cfg) / name


def layers(cfg: Config) -> Path:
    """The shared layers of installed packages."""
    return venvs(cfg) / LAYER_DIR


def locks(cfg: Config) -> Path:
    """Lock files of venv and layer builds."""
    return venvs(cfg) / LOCK_DIR


def store(cfg: Config) -> Path:
    """The SQLite store."""
    return cfg.paths.state_dir / "state" / "par.db"


def tools(cfg: Config) -> Path:
    """Where pard and `parctl installer install-uv` put the uv binary."""
    return cfg.paths.state_dir / "tools"


def env_dir(cfg: Config) -> Path:
    """The agents' root-only EnvironmentFile=s."""
    return cfg.paths.state_dir / "env"


def env_file(cfg: Config, agent_id: str) -> Path:
    """The root-only file holding one agent's own variables (`EnvironmentFile=`)."""
    return env_dir(cfg) / f"{agent_id}.env"


def builds(cfg: Config) -> Path:
    """Root-only files of running builds (their units' EnvironmentFile=)."""
    return cfg.paths.state_dir / "builds"


def host_root(cfg: Config) -> Path:
    """The compiled copies of the agent host, one folder per digest."""
    return cfg.paths.state_dir / "host"


def front_routes(cfg: Config) -> Path:
    """The routes table pard publishes for the front door (its folder is all it may read)."""
    return cfg.paths.state_dir / "front" / "routes.json"


def installer_cache(cfg: Config, installer: str) -> Path:
    """The download and build cache of one installer ("uv" or "pip")."""
    return cfg.paths.cache_dir / installer


def pyc_cache(cfg: Config) -> Path:
    """Bytecode compiled once per host and hardlinked into each venv."""
    return cfg.paths.cache_dir / "pyc"


def package_key(agent_id: str, version: str, sha256: str | None) -> str:
    """The name shared by a package file and its extraction."""
    if sha256 is None:
        return f"{agent_id}@{version}"  # PAR 0.1's flat layout
    return f"{agent_id}@{version}@{sha256[:DIGEST_CHARS]}"


def package_file(cfg: Config, agent_id: str, version: str, sha256: str | None) -> Path:
    """The kept package whose bytes hash to `sha256` (None: PAR 0.1's flat name)."""
    return packages(cfg) / f"{package_key(agent_id, version, sha256)}.apkg"


def extraction(cfg: Config, agent_id: str, version: str, sha256: str | None) -> Path:
    """The extracted package a deployment runs (`sha256`: its package's digest)."""
    return extracted(cfg) / package_key(agent_id, version, sha256)


def deployment_files(cfg: Config, agent_id: str, version: str,
                     sha256: str | None) -> tuple[Path, Path]:
    """(package file, extraction) of a deployment whose package hashed to `sha256`."""
    return (package_file(cfg, agent_id, version, sha256),
            extraction(cfg, agent_id, version, sha256))


def package_sources(cfg: Config) -> Path:
    """Per agent@version: the URL last fetched and its HTTP validators (par.fetch)."""
    return packages(cfg) / ".sources"
