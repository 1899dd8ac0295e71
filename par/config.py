"""PAR's configuration: `/etc/par/par.yaml` read into frozen dataclasses.

Each section is a dataclass; each field has a type and a default, and the
one-line comment above it is its documentation (the shipped
`etc/par/par.yaml` repeats them).  Loading is strict: an unknown key or a
value of the wrong type is a `ConfigError` naming the key and the expected
type, and `pard` refuses to start with it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from par.errors import ParError

DEFAULT_CONFIG_PATH = Path("/etc/par/par.yaml")


class ConfigError(ParError):
    """The configuration file is unreadable, has an unknown key or a wrong type."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__("config_invalid", message, key, 400)


@dataclass(frozen=True)
class Paths:
    # Agents' packages, extracted files, venvs and the store live below this.
    state_dir: Path = Path("/var/lib/pixell-runtime")
    # Shared pip/uv caches; keep it on the same filesystem as state_dir (hardlinks).
    cache_dir: Path = Path("/var/cache/pixell-runtime")

    @property
    def packages(self) -> Path:
        return self.state_dir / "packages"

    @property
    def extracted(self) -> Path:
        return self.state_dir / "extracted"

    @property
    def venvs(self) -> Path:
        return self.state_dir / "venvs"

    @property
    def store(self) -> Path:
        return self.state_dir / "state" / "par.db"

    @property
    def tools(self) -> Path:
        """Where `parctl installer install-uv` puts the uv binary."""
        return self.state_dir / "tools"


@dataclass(frozen=True)
class Listen:
    # The local API socket (root only); parctl talks to it.
    socket: Path = Path("/run/par/par.sock")
    # Optional TCP address "HOST:PORT" for a control plane; null = no TCP listener.
    tcp: str | None = None
    # File holding the bearer token TCP clients must send; required when tcp is set.
    token_file: Path = Path("/etc/par/token")
    # Largest request body accepted, in bytes.
    max_body_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class Installer:
    # auto (uv when found, else pip), uv or pip.
    kind: str = "auto"
    # uv binary; null = state_dir/tools/uv, then PATH.
    uv_path: Path | None = None
    # Interpreter every venv is built from.
    python: Path = Path("/usr/bin/python3")
    # Package index; null = pip's/uv's default.
    index_url: str | None = None
    # Extra package indexes.
    extra_index_urls: list[str] = field(default_factory=list)
    # Local wheelhouses or find-links pages.
    find_links: list[str] = field(default_factory=list)
    # Never touch the network: install only from the cache and find_links.
    offline: bool = False
    # Seconds before a dependency install is killed.
    timeout_s: int = 300
    # Allow --index-url/--extra-index-url/--find-links/--trusted-host inside requirements.txt.
    allow_index_options: bool = False
    # Compile bytecode at build time (agents run with a read-only venv).
    compile_bytecode: bool = True


@dataclass(frozen=True)
class Limits:
    # Largest package download, in bytes.
    max_package_bytes: int = 100 * 1024 * 1024
    # Most entries in one package archive.
    max_entries: int = 10_000
    # Largest total uncompressed size of one package, in bytes.
    max_unpacked_bytes: int = 500 * 1024 * 1024
    # Largest compression ratio of one archive entry (uncompressed / compressed).
    max_ratio: int = 200
    # Seconds to wait for a package server to accept the connection.
    download_connect_timeout_s: float = 10.0
    # Seconds a whole package download may take.
    download_timeout_s: float = 300.0


@dataclass(frozen=True)
class Ports:
    # Address agents' surfaces listen on.
    bind_address: str = "127.0.0.1"
    # Inclusive range REST ports are allocated from.
    rest: list[int] = field(default_factory=lambda: [8100, 8999])
    # Inclusive range A2A (gRPC) ports are allocated from.
    a2a: list[int] = field(default_factory=lambda: [50100, 50999])
    # Inclusive range UI ports are allocated from.
    ui: list[int] = field(default_factory=lambda: [3100, 3999])


@dataclass(frozen=True)
class Agents:
    # Seconds an agent may take from start to READY.
    boot_timeout_s: int = 120
    # Seconds between SIGTERM and SIGKILL when an agent stops (per-deploy override).
    stop_timeout_s: int = 30
    # Seconds systemd waits before restarting a crashed agent.
    restart_sec: float = 1.0
    # Starts allowed within start_limit_interval_s before the unit stays failed.
    start_limit_burst: int = 5
    # Window, in seconds, for start_limit_burst.
    start_limit_interval_s: int = 60


@dataclass(frozen=True)
class Venvs:
    # Most venvs kept; least recently used unused ones are evicted beyond it.
    max_venvs: int = 100
    # Most bytes all venvs may use (hardlinked files counted once).
    max_bytes: int = 20 * 1024**3
    # Free disk space to keep on the venvs' filesystem, in bytes.
    min_free_bytes: int = 1024**3


@dataclass(frozen=True)
class Config:
    paths: Paths = field(default_factory=Paths)
    listen: Listen = field(default_factory=Listen)
    installer: Installer = field(default_factory=Installer)
    limits: Limits = field(default_factory=Limits)
    ports: Ports = field(default_factory=Ports)
    agents: Agents = field(default_factory=Agents)
    venvs: Venvs = field(default_factory=Venvs)
    # Deploys run in parallel (different agents) by this many workers.
    workers: int = 4


def _type_name(tp: object) -> str:
    if isinstance(tp, type):
        return {"Path": "path", "str": "string", "int": "integer", "float": "number",
                "bool": "boolean"}.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    return str(tp)


def _convert(value: object, tp: object, key: str) -> object:
    """Check `value` against the annotation `tp`, converting paths; raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _section(value, tp, key)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        Path: lambda v: isinstance(v, str) and v.startswith("/"),
    }[tp](value)  # type: ignore[index]
    if not ok:
        expected = "absolute path" if tp is Path else _type_name(tp)
        raise ConfigError(f"{key}: expected {expected}, got {value!r}", key)
    if tp is Path:
        return Path(value)  # type: ignore[arg-type]
    if tp is float:
        return float(value)  # type: ignore[arg-type]
    return value


def _section(raw: object, cls: type, prefix: str) -> object:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}", prefix or None)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(names))})", full)
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Cross-field rules the types alone do not express."""
    if cfg.installer.kind not in ("auto", "uv", "pip"):
        raise ConfigError("installer.kind: expected one of auto, uv, pip", "installer.kind")
    for name in ("rest", "a2a", "ui"):
        rng = getattr(cfg.ports, name)
        if len(rng) != 2 or not (1024 <= rng[0] <= rng[1] <= 65535):
            raise ConfigError(
                f"ports.{name}: expected [low, high] with 1024 <= low <= high <= 65535",
                f"ports.{name}",
            )
    positive = {
        "installer.timeout_s": cfg.installer.timeout_s,
        "agents.boot_timeout_s": cfg.agents.boot_timeout_s,
        "agents.stop_timeout_s": cfg.agents.stop_timeout_s,
        "workers": cfg.workers,
        "limits.max_package_bytes": cfg.limits.max_package_bytes,
        "limits.max_entries": cfg.limits.max_entries,
        "limits.max_unpacked_bytes": cfg.limits.max_unpacked_bytes,
        "limits.max_ratio": cfg.limits.max_ratio,
        "listen.max_body_bytes": cfg.listen.max_body_bytes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {value!r}", key)


def from_dict(raw: object) -> Config:
    """Build a validated Config from parsed YAML (None means all defaults)."""
    cfg = _section(raw, Config, "")
    assert isinstance(cfg, Config)
    _check(cfg)
    return cfg


def load(path: Path = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate the config file; a missing file means all defaults."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return from_dict(None)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return from_dict(raw)


def with_state_dir(cfg: Config, state_dir: Path, cache_dir: Path | None = None) -> Config:
    """A copy of `cfg` rooted elsewhere (tests, benchmarks)."""
    paths = Paths(state_dir=state_dir, cache_dir=cache_dir or state_dir / "cache")
    return dataclasses.replace(cfg, paths=paths)
