"""`parctl deploy PATH|URL` → the `POST /deploy` body pard gets.

A folder is packed into an .apkg (par.pack), an .apkg is used in place, and
both are handed to pard as file:// URLs: pard runs as root on this host, so it
reads the file parctl points it at.  Packed folders are kept in parctl's cache
(`$XDG_CACHE_HOME/parctl/packages`, the newest few per agent), named by their
bytes, so a deployment record's packageUrl names a file that still exists.
An http(s) URL is passed on unread.
agent.yaml is read with par.manifest, by the rules pard applies to it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from par import ids
from par.config import Limits
from par.errors import ParError
from par.file_caps import caps, too_large
from par.manifest import (
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    manifest_version,
    manifest_yaml,
)

# agent.yaml is a few hundred bytes; refuse to inflate a huge entry from an archive.
# pard's default cap (limits.max_manifest_bytes): parctl refuses what pard would.
MANIFEST_CAP = caps(Limits())[MANIFEST_NAME]


@dataclass(frozen=True)
class PackageSource:
    """Where pard fetches the package from, and what parctl learned about it locally."""

    url: str
    local: bool = False  # a folder or an .apkg on this host (its agent.yaml was read)
    name: str | None = None  # agent.yaml's name and version, when local
    version: str | None = None
    sha256: str | None = None

# Packed folders kept per agent name in parctl's cache (older ones are deleted).
KEEP_PACKED = 5


def packed_cache() -> Path:
    """Where parctl keeps the packages it packs: $XDG_CACHE_HOME/parctl/packages."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parctl" / "packages"


def pack_into_cache(folder: Path, manifest: Manifest, cache: Path) -> Path:
    """Pack `folder` as `{name}-{version}-{sha12}.apkg` in `cache`; keep the newest
    KEEP_PACKED of that name."""
    from par.pack import pack_folder  # lazily: only a folder deploy needs the packer

    cache.mkdir(parents=True, exist_ok=True)
    tmp = pack_folder(folder, cache / f".{manifest.name}-{secrets.token_hex(4)}.tmp")
    final = cache / f"{manifest.name}-{manifest.version}-{sha256_file(tmp)[:12]}.apkg"
    os.replace(tmp, final)
    final.touch()  # the newest, also when the same bytes were packed before
    mine = sorted(cache.glob(f"{manifest.name}-*.apkg"), key=lambda p: p.stat().st_mtime,
                  reverse=True)
    for old in mine[KEEP_PACKED:]:
        old.unlink(missing_ok=True)
    return final


def folder_manifest(folder: Path) -> Manifest:
    """agent.yaml of an agent folder, validated as pard validates it."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise ParError("manifest_missing",
                       f"{folder} has no {MANIFEST_NAME}: is it an agent folder?", MANIFEST_NAME)
    try:
        return load_manifest(folder)
    except OSError as exc:
        raise ParError("manifest_unreadable", f"cannot read {path}: {exc.strerror}",
                       MANIFEST_NAME) from None


def apkg_name_version(package: Path) -> tuple[str | None, str | None]:
    """`name` and version of the agent.yaml inside an .apkg (a zip archive).

    Only these two are checked here: the rest of agent.yaml (a `ui.path`, say)
    refers to files pard checks once it has extracted the package.
    """
    try:
        with zipfile.ZipFile(package) as zf:
            try:
                info = zf.getinfo(MANIFEST_NAME)
            except KeyError:
                raise ParError("manifest_missing",
                               f"{package} has no {MANIFEST_NAME} at its top level",
                               MANIFEST_NAME) from None
            if info.file_size > MANIFEST_CAP.limit:
                err = too_large(MANIFEST_CAP, info.file_size)
                raise ParError(err.code, f"{package}: {err.message}", err.field, err.status)
            data = zf.read(info)
    except zipfile.BadZipFile:
        raise ParError("package_invalid", f"{package} is not an .apkg (zip) archive") from None
    except OSError as exc:
        raise ParError("package_unreadable", f"cannot read {package}: {exc.strerror}") from None
    try:
        raw = manifest_yaml(data.decode("utf-8"))
        if not isinstance(raw, dict):
            raise ParError("manifest_invalid",
                           f"{MANIFEST_NAME}: expected a mapping at the top level", MANIFEST_NAME)
        version = manifest_version(raw)
    except UnicodeDecodeError as exc:
        raise ParError("manifest_yaml", f"{package}: {MANIFEST_NAME} is not UTF-8 text: "
                       f"{exc.reason}", MANIFEST_NAME) from None
    except ParError as err:
        # say which package: the messages name agent.yaml only
        raise ParError(err.code, f"{package}: {err.message}", err.field, err.status) from None
    name = raw.get("name")
    return (name if isinstance(name, str) else None), version


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(source: str, cache: Path | None = None) -> PackageSource:
    """An http(s) URL as is; an .apkg or a folder (packed into `cache`, by default
    parctl's cache) as a file:// URL."""
    if source.startswith(("http://", "https://")):
        return PackageSource(url=source)
    path = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    if path.is_dir():
        manifest = folder_manifest(path)
        package = pack_into_cache(path, manifest, cache or packed_cache())
        return PackageSource(package.resolve().as_uri(), True, manifest.name, manifest.version,
                             sha256_file(package))
    if path.is_file():
        name, version = apkg_name_version(path)
        return PackageSource(path.resolve().as_uri(), True, name, version, sha256_file(path))
    raise click.BadParameter(f"{source!r} is not a folder, an .apkg file or an http(s) URL",
                             param_hint="PATH|URL")


def agent_and_version(src: PackageSource, agent_opt: str | None,
                      version_opt: str | None) -> tuple[str, str]:
    """The options win; else the manifest's name and version (checked like pard checks them)."""
    # A URL's package is not read locally: its id and version must be given.
    if not agent_opt and not src.name:
        raise click.UsageError("agent.yaml has no name: pass --id" if src.local
                               else "--id is required for a URL")
    if not version_opt and not src.version:
        raise click.UsageError("agent.yaml has no version: pass --version" if src.local
                               else "--version is required for a URL")
    return (agent_opt or ids.agent_id(src.name, "agent.yaml name"),
            version_opt or ids.version(src.version, "agent.yaml version"))


def new_deployment_id(agent: str, now: float | None = None) -> str:
    """`{agent}-{UTC timestamp}-{4 hex}`: sortable, readable, unique enough for one host."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return f"{agent}-{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def deploy_body(src: PackageSource, agent: str, version: str, *, org: str = "",
                sha256: str | None = None, memory: int | None = None, cpu: int | None = None,
                stop_timeout: int | None = None, env: dict[str, str] | None = None) -> dict:
    """The POST /deploy request (docs/api.md); options left out are pard's defaults."""
    body: dict[str, Any] = {
        "deploymentId": new_deployment_id(agent),
        "agentAppId": agent,
        "orgId": org,
        "version": version,
        "packageUrl": src.url,
    }
    optional = {"packageSha256": sha256 or src.sha256, "memoryMB": memory, "cpuUnits": cpu,
                "stopTimeoutSec": stop_timeout, "env": env or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body
