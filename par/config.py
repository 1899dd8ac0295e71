"""PAR's configuration: `/etc/par/par.yaml` read into frozen dataclasses.

Each section is a dataclass; each field has a type and a default, and the
one-line comment above it is its documentation (the shipped
`docs/par.yaml` repeats them).  Loading is strict: an unknown key or a
value of the wrong type is a `ConfigError` naming the key and the expected
type, and `pard` refuses to start with it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
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


def setting(default: object = dataclasses.MISSING, doc: str = "", *, factory=None):
    """A config field with its one-line documentation (rendered into par.yaml)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Paths:
    state_dir: Path = setting(
        Path("/var/lib/pixell-runtime"),
        "Agents' packages, extracted files, venvs and the store live below this.")
    cache_dir: Path = setting(
        Path("/var/cache/pixell-runtime"),
        "Shared pip/uv caches; keep it on the same filesystem as state_dir (hardlinks).")
    # every path below these two roots is named by par.layout


@dataclass(frozen=True)
class Listen:
    socket: Path = setting(Path("/run/par/par.sock"),
                           "The local API socket (root only); parctl talks to it.")
    tcp: str | None = setting(
        None, "Optional TCP address \"HOST:PORT\" for a control plane; null = no TCP listener.")
    token_file: Path = setting(
        Path("/etc/par/token"),
        "File holding the bearer token TCP clients must send; required when tcp is set.")
    max_body_bytes: int = setting(1024 * 1024, "Largest request body accepted, in bytes.")
    max_tcp_connections: int = setting(
        256, "Most TCP connections served at once; more are closed at once.")
    max_tcp_connections_per_ip: int = setting(
        16, "Most TCP connections one client address may hold at once.")
    max_unix_connections: int = setting(
        64, "Most unix-socket connections served at once (a budget of its own: TCP clients "
        "cannot use it up).")
    request_deadline_s: float = setting(
        15.0, "Seconds a connection has to send a whole request (line, headers, body), "
        "idle wait included; slower ones are dropped.")
    max_long_polls: int = setting(
        32, "Most GET ...?wait= requests held at once; beyond it they answer at once.")
    max_request_line_bytes: int = setting(
        8192, "Longest request line (method, path, query, version) accepted (414 beyond).")
    max_header_bytes: int = setting(
        32768, "Largest total size of a request's headers (431 beyond).")
    max_json_depth: int = setting(
        32, "Deepest nesting of objects and arrays accepted in a JSON body (400 beyond).")


@dataclass(frozen=True)
class Installer:
    kind: str = setting(
        "auto", "auto (uv when found, else pip while pard fetches uv_version), uv or pip.")
    uv_path: Path | None = setting(None, "uv binary; null = state_dir/tools/uv, then PATH.")
    uv_version: str = setting(
        "0.13.9", "The uv pard fetches into state_dir/tools (kind auto, once, in the "
                  "background) and `parctl installer install-uv` installs by default.")
    uv_wait_s: float = setting(
        30.0, "Seconds a build waits for a uv fetch in progress (a fresh install's first "
              "build) before it uses pip instead.")
    python: Path = setting(Path("/usr/bin/python3"), "Interpreter every venv is built from.")
    index_url: str | None = setting(None, "Package index; null = pip's/uv's default.")
    extra_index_urls: list[str] = setting(factory=list, doc="Extra package indexes.")
    find_links: list[str] = setting(factory=list, doc="Local wheelhouses or find-links pages.")
    offline: bool = setting(
        False, "Never touch the network: install only from the cache and find_links.")
    timeout_s: int = setting(300, "Seconds before a dependency install is killed.")
    allow_index_options: bool = setting(
        False, "Allow --index-url/--extra-index-url/--find-links/--trusted-host "
               "inside requirements.txt.")
    compile_bytecode: bool = setting(
        True, "Compile bytecode at build time (agents run with a read-only venv).")
    only_binary: bool = setting(
        False, "Install wheels only: refuse sdists, so no package code runs at build time "
               "(docs/security.md).")
    sandbox: bool = setting(
        True, "Run uv/pip as build_user in a sandboxed transient unit; false runs them as "
              "root, unsandboxed (only for hosts without systemd; unsafe).")
    build_user: str = setting(
        "par-build", "The system user builds run as (the package creates it with sysusers).")


@dataclass(frozen=True)
class Limits:
    max_package_bytes: int = setting(100 * 1024 * 1024, "Largest package download, in bytes.")
    max_entries: int = setting(10_000, "Most entries in one package archive.")
    max_unpacked_bytes: int = setting(
        500 * 1024 * 1024, "Largest total uncompressed size of one package, in bytes.")
    max_ratio: int = setting(
        200, "Largest compression ratio of one archive entry (uncompressed / compressed).")
    download_connect_timeout_s: float = setting(
        10.0, "Seconds to wait for a package server to accept the connection.")
    download_timeout_s: float = setting(300.0, "Seconds a whole package download may take.")
    # Files pard parses, capped by their size in the archive (and on disk) before
    # being read: a valid manifest followed by 20 MiB of comments must not be parsed.
    max_manifest_bytes: int = setting(1024 * 1024, "Largest agent.yaml pard reads, in bytes.")
    max_dotenv_bytes: int = setting(256 * 1024, "Largest package .env pard reads, in bytes.")
    max_requirements_bytes: int = setting(
        1024 * 1024, "Largest requirements.txt pard reads, in bytes.")


@dataclass(frozen=True)
class Ports:
    bind_address: str = setting("127.0.0.1", "Address agents' surfaces listen on.")
    rest: list[int] = setting(factory=lambda: [8100, 8999],
                              doc="Inclusive range REST ports are allocated from.")
    a2a: list[int] = setting(factory=lambda: [50100, 50999],
                             doc="Inclusive range A2A (gRPC) ports are allocated from.")
    ui: list[int] = setting(factory=lambda: [3100, 3999],
                            doc="Inclusive range UI ports are allocated from.")


@dataclass(frozen=True)
class Agents:
    boot_timeout_s: int = setting(120, "Seconds an agent may take from start to READY.")
    stop_timeout_s: int = setting(
        30, "Seconds between SIGTERM and SIGKILL when an agent stops (per-deploy override).")
    restart_sec: float = setting(1.0, "Seconds systemd waits before restarting a crashed agent.")
    start_limit_burst: int = setting(
        5, "Starts allowed within start_limit_interval_s before the unit stays failed.")
    start_limit_interval_s: int = setting(60, "Window, in seconds, for start_limit_burst.")
    memory_max_mb: int | None = setting(
        2048, "MemoryMax= of an agent whose deploy gives no memoryMB; null = no limit.")
    cpu_quota_percent: int | None = setting(
        200, "CPUQuota= (100 = one CPU) of an agent whose deploy gives no cpuUnits; null = none.")
    tasks_max: int = setting(512, "Most processes and threads one agent may have (TasksMax=).")
    shm_size_mb: int = setting(64, "Size of each agent's private /dev/shm, in MiB.")
    log_rate_limit_interval_s: int = setting(
        30, "Window of an agent's journal rate limit (LogRateLimitIntervalSec=).")
    log_rate_limit_burst: int = setting(
        5000, "Lines an agent may log per window; journald drops the rest and says how many.")
    ip_address_deny: list[str] = setting(
        factory=lambda: ["169.254.169.254/32", "fd00:ec2::254/128"],
        doc="Addresses agents may not reach (IPAddressDeny=), nor pard's package downloads; "
            "default: cloud metadata services.")
    isolate_loopback: bool = setting(
        False, "Agents reach no other agent, nor pard's TCP API, nor anything else on "
               "127.0.0.0/8 and ::1, except through the front door: each listens on a "
               "loopback address of its own (127.A.B.1, A.B its REST port); "
               "docs/security.md, attack 8.")
    loopback_allow: list[str] = setting(
        factory=list,
        doc="With isolate_loopback: loopback addresses or networks agents may still reach "
            "(IPAddressAllow=), e.g. a local cache; loopback resolvers in /etc/resolv.conf "
            "other than 127.0.0.1 and ::1 are allowed without being listed.")


@dataclass(frozen=True)
class Venvs:
    max_venvs: int = setting(
        100, "Most venvs kept; least recently used unused ones are evicted beyond it.")
    max_bytes: int = setting(
        20 * 1024**3, "Most bytes all venvs may use (hardlinked files counted once).")
    min_free_bytes: int = setting(
        1024**3, "Free disk space to keep on the venvs' filesystem, in bytes.")


@dataclass(frozen=True)
class Retention:
    events_per_deployment: int = setting(
        500, "Most events kept per deployment; older ones are pruned.")
    history_deployments: int = setting(
        1000, "Most past deployments (neither current nor in flight: replaced, failed, "
              "removed) kept as history; the oldest are pruned with their events.")
    history_days: int = setting(
        90, "Past deployments not updated for this many days are pruned, with their events.")
    packages_per_agent: int = setting(
        2, "Packages (and their extractions) kept per agent beyond those a deployment "
           "that could run again uses; the least recently fetched are deleted.")


@dataclass(frozen=True)
class Front:
    listen: str | None = setting(
        "127.0.0.1:8080",
        "Front door \"HOST:PORT\", every agent at /agents/{id}/ (null = none; public only "
        "on purpose).")
    hold_s: float = setting(
        30.0, "Seconds a request waits for an agent that is (re)starting before a 503.")
    max_body_bytes: int = setting(
        10 * 1024 * 1024, "Largest request body the front door passes on, in bytes (413).")
    max_connections: int = setting(
        1024, "Most client connections the front door keeps open; beyond it, 503.")
    header_timeout_s: float = setting(
        10.0, "Seconds a new connection has to send its request headers (slow clients).")
    body_timeout_s: float = setting(
        30.0, "Seconds the front door waits for the next piece of a request body (408).")
    idle_timeout_s: float = setting(
        75.0, "Seconds an idle keep-alive connection stays open.")
    source_address: str = setting(
        "127.0.0.2",
        "With agents.isolate_loopback: the loopback address the front door and pard's "
        "health check connect to agents from, the one besides their own agents accept "
        "(in 127.0.0.0/14, not 127.0.0.1).")


@dataclass(frozen=True)
class Config:
    paths: Paths = field(default_factory=Paths)
    listen: Listen = field(default_factory=Listen)
    installer: Installer = field(default_factory=Installer)
    limits: Limits = field(default_factory=Limits)
    ports: Ports = field(default_factory=Ports)
    agents: Agents = field(default_factory=Agents)
    venvs: Venvs = field(default_factory=Venvs)
    retention: Retention = field(default_factory=Retention)
    front: Front = field(default_factory=Front)
    workers: int = setting(4, "Deploys run in parallel (different agents) by this many workers.")


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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", cfg.installer.build_user) \
            or cfg.installer.build_user == "root":
        raise ConfigError("installer.build_user: expected a system user name other than root",
                          "installer.build_user")
    if cfg.installer.kind not in ("auto", "uv", "pip"):
        raise ConfigError("installer.kind: expected one of auto, uv, pip", "installer.kind")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+){1,3}", cfg.installer.uv_version):
        raise ConfigError("installer.uv_version: expected a release like 0.13.9",
                          "installer.uv_version")
    for name in ("rest", "a2a", "ui"):
        rng = getattr(cfg.ports, name)
        if len(rng) != 2 or not (1024 <= rng[0] <= rng[1] <= 65535):
            raise ConfigError(
                f"ports.{name}: expected [low, high] with 1024 <= low <= high <= 65535",
                f"ports.{name}",
            )
    positive = {
        "installer.timeout_s": cfg.installer.timeout_s,
        "installer.uv_wait_s": cfg.installer.uv_wait_s,
        "agents.boot_timeout_s": cfg.agents.boot_timeout_s,
        "agents.stop_timeout_s": cfg.agents.stop_timeout_s,
        "workers": cfg.workers,
        "limits.max_package_bytes": cfg.limits.max_package_bytes,
        "limits.max_entries": cfg.limits.max_entries,
        "limits.max_unpacked_bytes": cfg.limits.max_unpacked_bytes,
        "limits.max_ratio": cfg.limits.max_ratio,
        "listen.max_body_bytes": cfg.listen.max_body_bytes,
        "listen.max_tcp_connections": cfg.listen.max_tcp_connections,
        "listen.max_tcp_connections_per_ip": cfg.listen.max_tcp_connections_per_ip,
        "listen.max_unix_connections": cfg.listen.max_unix_connections,
        "listen.request_deadline_s": cfg.listen.request_deadline_s,
        "listen.max_long_polls": cfg.listen.max_long_polls,
        "listen.max_request_line_bytes": cfg.listen.max_request_line_bytes,
        "listen.max_header_bytes": cfg.listen.max_header_bytes,
        "listen.max_json_depth": cfg.listen.max_json_depth,
        "agents.tasks_max": cfg.agents.tasks_max,
        "agents.shm_size_mb": cfg.agents.shm_size_mb,
        "agents.log_rate_limit_interval_s": cfg.agents.log_rate_limit_interval_s,
        "agents.log_rate_limit_burst": cfg.agents.log_rate_limit_burst,
        # None (no limit) is allowed; 0 or less is not
        "agents.memory_max_mb": 1 if cfg.agents.memory_max_mb is None else cfg.agents.memory_max_mb,
        "agents.cpu_quota_percent":
            1 if cfg.agents.cpu_quota_percent is None else cfg.agents.cpu_quota_percent,
        "limits.max_manifest_bytes": cfg.limits.max_manifest_bytes,
        "limits.max_dotenv_bytes": cfg.limits.max_dotenv_bytes,
        "limits.max_requirements_bytes": cfg.limits.max_requirements_bytes,
        "retention.events_per_deployment": cfg.retention.events_per_deployment,
        "retention.history_days": cfg.retention.history_days,
        "front.hold_s": cfg.front.hold_s,
        "front.max_body_bytes": cfg.front.max_body_bytes,
        "front.max_connections": cfg.front.max_connections,
        "front.header_timeout_s": cfg.front.header_timeout_s,
        "front.body_timeout_s": cfg.front.body_timeout_s,
        "front.idle_timeout_s": cfg.front.idle_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {value!r}", key)
    for i, net in enumerate(cfg.agents.ip_address_deny):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            key = f"agents.ip_address_deny[{i}]"
            raise ConfigError(f"{key}: expected an address or CIDR network, got {net!r}",
                              key) from None
    for i, net in enumerate(cfg.agents.loopback_allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            key = f"agents.loopback_allow[{i}]"
            raise ConfigError(f"{key}: expected an address or CIDR network, got {net!r}",
                              key) from None
    _check_loopback(cfg)
    for key, value in {"retention.history_deployments": cfg.retention.history_deployments,
                       "retention.packages_per_agent": cfg.retention.packages_per_agent}.items():
        if value < 0:
            raise ConfigError(f"{key}: expected zero or more, got {value!r}", key)
    if cfg.front.listen is not None:
        host, sep, port = cfg.front.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError("front.listen: expected \"HOST:PORT\" or null", "front.listen")


def _check_loopback(cfg: Config) -> None:
    """front.source_address is a 127.0.0.0/14 address other than 127.0.0.1 (agents' own
    addresses are 127.4.0.1 and up, par.loopback); isolation keeps ports.bind_address."""
    key = "front.source_address"
    try:
        source = ipaddress.ip_address(cfg.front.source_address)
    except ValueError:
        source = None
    if source is None or source not in ipaddress.ip_network("127.0.0.0/14") \
            or str(source) == "127.0.0.1":
        raise ConfigError(f"{key}: expected an address in 127.0.0.0/14 other than 127.0.0.1, "
                          f"got {cfg.front.source_address!r}", key)
    if cfg.agents.isolate_loopback and cfg.ports.bind_address != "127.0.0.1":
        raise ConfigError("agents.isolate_loopback: agents then listen on loopback addresses "
                          "of their own; leave ports.bind_address at 127.0.0.1 (got "
                          f"{cfg.ports.bind_address!r})", "agents.isolate_loopback")


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


SECTION_DOCS = {
    "paths": "Where PAR keeps its files.",
    "listen": "Where the API listens.",
    "installer": "How venvs are built.",
    "limits": "Limits on packages and downloads.",
    "ports": "Ports agents' surfaces get.",
    "agents": "How agents' units run.",
    "venvs": "The venv budget (least recently used unused venvs are evicted beyond it).",
    "retention": "What pard keeps of the past: events, removed deployments, old packages.",
    "front": "The front door: one port for every agent's REST and UI surfaces.",
}


def _yaml_value(value: object) -> str:
    if isinstance(value, Path):
        value = str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...")


def render_yaml(cfg: Config | None = None) -> str:
    """The configuration as commented YAML (docs/par.yaml, the reference, is this for the
    defaults)."""
    cfg = cfg or Config()
    out = [
        "# PAR configuration (/etc/par/par.yaml). Every key is optional; shown are the defaults.",
        "# pard refuses to start on an unknown key or a value of the wrong type, and its",
        "# journal names the key: journalctl -u par",
    ]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.append("")
        if dataclasses.is_dataclass(value):
            out.append(f"# {SECTION_DOCS.get(f.name, f.name)}")
            out.append(f"{f.name}:")
            for sub in dataclasses.fields(value):
                out.append(f"  # {sub.metadata.get('doc', '')}")
                out.append(f"  {sub.name}: {_yaml_value(getattr(value, sub.name))}")
        else:
            out.append(f"# {f.metadata.get('doc', '')}")
            out.append(f"{f.name}: {_yaml_value(value)}")
    return "\n".join(out) + "\n"
