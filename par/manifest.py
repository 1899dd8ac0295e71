"""`agent.yaml` → a frozen `Manifest`, and the `.env` parser.

The manifest is read in two steps, like any input PAR trusts nothing about:
YAML → a raw mapping, then field by field into `Manifest`.  Every error is a
`ParError` whose `field` is the manifest key (`rest.entry`, `environment.FOO`)
and whose message says why.  Unknown keys are kept in `Manifest.extra` and
logged as a warning: newer SDKs add fields, and an old PAR must still run them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from par import ids
from par.agent_host.par_agent_host import dotenv as host_dotenv
from par.config import Limits
from par.errors import ParError
from par.file_caps import caps, read_capped
from par.log import event

MANIFEST_NAME = "agent.yaml"
DOTENV_NAME = ".env"
DEFAULT_ENTRYPOINT = "main:handler"

# The package name as the SDK defines it.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
# `module:function`: a dotted module path and a function name, both identifiers.
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
ENTRY_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}$")
# `a2a.service` may also name the module alone: it then exports create_grpc_server.
MODULE_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")

_KNOWN = {
    "name", "display_name", "description", "author", "license", "version",
    "entrypoint", "runtime", "environment", "dependencies", "rest", "a2a", "ui",
    "metadata",
}
# Each surface is a mapping; its known key is the one PAR acts on.
_SURFACES = {"rest": "entry", "a2a": "service", "ui": "path"}


@dataclass(frozen=True)
class Manifest:
    """A validated `agent.yaml`.

    `version` is the top-level `version`, or `metadata.version` when the
    top-level one is missing (the SDK writes the agent's own version there).
    `rest_entry` is a `module:function` string, `a2a_service` too (or a bare
    module, which then exports `create_grpc_server`); `ui_path` is
    relative to the package root and holds an `index.html`.
    """

    name: str
    version: str
    display_name: str | None = None
    description: str | None = None
    author: str | None = None
    license: str | None = None
    entrypoint: str = DEFAULT_ENTRYPOINT
    runtime: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    dependencies: tuple[str, ...] = ()
    rest_entry: str | None = None
    a2a_service: str | None = None
    ui_path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Unknown keys, as found ("ui.basePath" for unknown keys inside a surface).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def package_id(self) -> str:
        """`name@version`, the id used when a deploy has no agentAppId."""
        return f"{self.name}@{self.version}"

    @property
    def surfaces(self) -> tuple[str, ...]:
        """The declared surfaces, in a fixed order: rest, a2a, ui."""
        declared = {"rest": self.rest_entry, "a2a": self.a2a_service, "ui": self.ui_path}
        return tuple(name for name, value in declared.items() if value)

    @property
    def served(self) -> tuple[str, ...]:
        """The surfaces the agent serves, each of which needs a port: REST always
        (the host answers /health there), A2A and UI when declared."""
        return ("rest", *(s for s in self.surfaces if s != "rest"))


def _invalid(key: str, why: str) -> ParError:
    return ParError("manifest_invalid", f"agent.yaml: {key}: {why}", key)


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def _opt_str(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _invalid(key, f"expected a string, got {_kind(value)}")


def manifest_version(raw: dict) -> str | None:
    """Top-level `version`, else `metadata.version`; None when neither is set.

    Public so that parctl reads a package's version by the same rule as pard.
    """
    metadata = raw.get("metadata")
    meta_version = metadata.get("version") if isinstance(metadata, dict) else None
    for key, value in (("version", raw.get("version")), ("metadata.version", meta_version)):
        if value is None:
            continue
        if isinstance(value, bool) or isinstance(value, float):
            # YAML reads `1.10` as the number 1.1: refuse rather than guess.
            raise _invalid(key, f"expected a quoted string, got {_kind(value)} {value!r}")
        if isinstance(value, int):
            return str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise _invalid(key, f"expected a non-empty string, got {_kind(value)}")
    return None


def _version(raw: dict) -> str:
    """`manifest_version`, which is required."""
    version = manifest_version(raw)
    if version is None:
        raise _invalid("version", "missing (set version, or metadata.version)")
    return version


def _entry(value: object, key: str, module_alone: bool = False) -> str:
    if not isinstance(value, str):
        raise _invalid(key, f"expected a 'module:function' string, got {_kind(value)}")
    if module_alone and MODULE_RE.fullmatch(value):
        return value
    if not ENTRY_RE.fullmatch(value):
        raise _invalid(key, f"{value!r} is not of the form 'module:function' "
                            "(e.g. 'main:handler' or 'pkg.api:mount')")
    return value


def _environment(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("environment", f"expected a mapping, got {_kind(value)}")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not ids.ENV_KEY_RE.fullmatch(key):
            raise _invalid(f"environment.{key}", "not a valid variable name "
                                                 f"(use {ids.ENV_KEY_RE.pattern})")
        if isinstance(item, bool):
            env[key] = "true" if item else "false"
        elif isinstance(item, str | int | float):
            env[key] = str(item)
        else:
            raise _invalid(f"environment.{key}", f"expected a string, got {_kind(item)}")
    return env


def _dependencies(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _invalid("dependencies", f"expected a list of strings, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _invalid(f"dependencies[{i}]", f"expected a string, got {_kind(item)}")
    return tuple(value)


def _ui_path(root: Path, value: object) -> str:
    key = "ui.path"
    if not isinstance(value, str) or not value.strip():
        raise _invalid(key, f"expected a folder path, got {_kind(value)}")
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        raise _invalid(key, f"{value!r} must be a folder inside the package")
    real_root = root.resolve()
    folder = (root / rel).resolve()
    # resolve() follows symlinks: a link pointing outside the package is refused too.
    if folder != real_root and real_root not in folder.parents:
        raise _invalid(key, f"{value!r} must be a folder inside the package")
    if folder == real_root:
        # it would serve agent.yaml, .env and the sources over HTTP
        raise _invalid(key, f"{value!r} is the package root; put the UI in a subfolder (ui/)")
    if not folder.is_dir():
        raise _invalid(key, f"{value!r} is not a folder in the package")
    if not (folder / "index.html").is_file():
        raise _invalid(key, f"{value!r} has no index.html")
    return rel.as_posix()


def _surfaces(root: Path, raw: dict, extra: dict) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for surface, known in _SURFACES.items():
        section = raw.get(surface)
        if section is None:
            out[surface] = None
            continue
        if not isinstance(section, dict):
            raise _invalid(surface, f"expected a mapping with '{known}', got {_kind(section)}")
        for key, value in section.items():
            if key != known:
                extra[f"{surface}.{key}"] = value
        value = section.get(known)
        if value is None:
            out[surface] = None
        elif surface == "ui":
            out[surface] = _ui_path(root, value)
        else:
            out[surface] = _entry(value, f"{surface}.{known}", module_alone=surface == "a2a")
    return out


def parse_manifest(root: Path, raw: object, logger: logging.Logger | None = None) -> Manifest:
    """Validate an already-parsed `agent.yaml` mapping of the package at `root`."""
    if not isinstance(raw, dict):
        raise ParError("manifest_invalid",
                       f"agent.yaml: expected a mapping at the top level, got {_kind(raw)}",
                       MANIFEST_NAME)
    name = raw.get("name")
    if name is None:
        raise _invalid("name", "missing")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _invalid("name", f"{name!r} is not a valid name (use {NAME_RE.pattern})")
    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", f"expected a mapping, got {_kind(metadata)}")
    extra = {k: v for k, v in raw.items() if k not in _KNOWN}
    surfaces = _surfaces(root, raw, extra)
    entrypoint = raw.get("entrypoint")
    manifest = Manifest(
        name=name,
        version=_version(raw),
        display_name=_opt_str(raw, "display_name"),
        description=_opt_str(raw, "description"),
        author=_opt_str(raw, "author"),
        license=_opt_str(raw, "license"),
        entrypoint=DEFAULT_ENTRYPOINT if entrypoint is None else _entry(entrypoint, "entrypoint"),
        runtime=_opt_str(raw, "runtime"),
        environment=_environment(raw.get("environment")),
        dependencies=_dependencies(raw.get("dependencies")),
        rest_entry=surfaces["rest"],
        a2a_service=surfaces["a2a"],
        ui_path=surfaces["ui"],
        metadata=dict(metadata or {}),
        extra=extra,
    )
    if extra and logger is not None:
        event(logger, "Unknown manifest fields", logging.WARNING,
              package_id=manifest.package_id, fields=sorted(str(k) for k in extra))
    return manifest


def load_manifest(root: Path, logger: logging.Logger | None = None,
                  limits: Limits | None = None) -> Manifest:
    """Read and validate `root/agent.yaml`; raise ParError naming the field on any problem.

    A file over `limits.max_manifest_bytes` (default: par.yaml's default) is
    refused before it is read (`file_too_large`)."""
    path = root / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise ParError("manifest_missing", "the package has no agent.yaml at its top level",
                       MANIFEST_NAME)
    try:
        text = read_capped(path, caps(limits or Limits())[MANIFEST_NAME]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParError("manifest_yaml", f"agent.yaml is not UTF-8 text: {exc.reason}",
                       MANIFEST_NAME) from exc
    return parse_manifest(root, manifest_yaml(text), logger)


def manifest_yaml(text: str) -> object:
    """`agent.yaml`'s text → the raw YAML value, for `parse_manifest` to validate.

    Public so that parctl reads the agent.yaml inside an .apkg as pard does.
    """
    try:
        # libyaml's loader when Debian's python3-yaml has it (it does): same safe
        # subset, several times faster, and every deploy reads a manifest
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ParError("manifest_yaml", f"agent.yaml is not valid YAML{at}: {problem}",
                       MANIFEST_NAME) from exc


# --- .env -------------------------------------------------------------------


def parse_dotenv(text: str) -> dict[str, str]:
    """Parse `.env` text: `KEY=value` lines, `#` comments, optional `export`, quotes.

    The agent host's parser (stdlib, `par_agent_host.dotenv`), so pard and the
    host read a package's `.env` alike: single quotes are literal; double quotes
    understand `\\n`, `\\t`, `\\"` and `\\\\`; an unquoted value ends at ` #` and is
    stripped.  No variable expansion.  Later keys override earlier ones.
    """
    try:
        return host_dotenv.parse(text)
    except host_dotenv.DotenvError as exc:
        raise ParError("dotenv_invalid", f".env {exc}", DOTENV_NAME) from exc


def read_dotenv(root: Path, limits: Limits | None = None) -> dict[str, str]:
    """Parse `root/.env` if the package has one (else an empty mapping).

    A file over `limits.max_dotenv_bytes` is refused before it is read."""
    path = root / DOTENV_NAME
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        text = read_capped(path, caps(limits or Limits())[DOTENV_NAME]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParError("dotenv_invalid", f".env is not UTF-8 text: {exc.reason}",
                       DOTENV_NAME) from exc
    return parse_dotenv(text)
