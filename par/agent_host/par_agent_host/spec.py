"""What the host is told: the agent spec file written by PAR and the unit's environment.

The spec is JSON rather than `agent.yaml` so the host needs no YAML parser (the
agent's venv holds only the agent's requirements).  Its format is documented in
the package docstring (`par_agent_host.__doc__`).
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from collections.abc import Mapping
from pathlib import Path

from .exitcodes import EXIT_BAD_SPEC, HostError

SPEC_ENV = "PAR_AGENT_SPEC"
SPEC_FILENAME = "par-agent.json"
DEFAULT_ENTRYPOINT = "main:handler"
DEFAULT_BIND_ADDRESS = "127.0.0.1"
# Below systemd's default TimeoutStopSec (30 s), so the host finishes before SIGKILL.
DEFAULT_STOP_TIMEOUT_S = 25.0
# Below the unit's default TimeoutStartSec (120 s), so a surface that never answers
# ends with EXIT_SURFACE_FAILED and a message instead of a start timeout.
DEFAULT_READY_TIMEOUT_S = 90.0
_TRUE = ("1", "true", "yes", "on")


def _bad(message: str) -> HostError:
    return HostError(EXIT_BAD_SPEC, message)


# The host's records are namedtuples, not dataclasses: importing `dataclasses` (and
# the `inspect` it pulls in) would cost every agent's start about 20 ms.
_AgentSpec = namedtuple(
    "_AgentSpec",
    "name version package_root entrypoint rest_entry a2a_service ui_path",
    defaults=(DEFAULT_ENTRYPOINT, None, None, None),
)


class AgentSpec(_AgentSpec):
    """The manifest fields the host needs (read from the spec JSON).

    name, version: str; package_root: Path; entrypoint: str ("module:function");
    rest_entry, a2a_service, ui_path: str or None.
    """

    __slots__ = ()

    @classmethod
    def from_dict(cls, raw: Mapping, *, base_dir: Path, fallback_root: str | None) -> AgentSpec:
        """Check types; `package_root` falls back to AGENT_PACKAGE_PATH, then the spec's folder."""
        if not isinstance(raw, Mapping):
            raise _bad("spec must be a JSON object")

        def text(key: str, default: str | None = None, required: bool = False) -> str | None:
            value = raw.get(key, default)
            if value is None or value == "":
                if required:
                    raise _bad(f"spec field {key!r} is required")
                return default
            if not isinstance(value, str):
                raise _bad(f"spec field {key!r} must be a string, got {type(value).__name__}")
            return value

        root = Path(text("package_root") or fallback_root or base_dir)
        if not root.is_absolute():
            root = base_dir / root
        return cls(
            name=text("name", required=True),
            version=text("version", "0.0.0"),
            package_root=root,
            entrypoint=text("entrypoint", DEFAULT_ENTRYPOINT),
            rest_entry=text("rest_entry"),
            a2a_service=text("a2a_service"),
            ui_path=text("ui_path"),
        )

    @property
    def surfaces(self) -> tuple[str, ...]:
        """Declared surfaces in a fixed order; REST is always served (for /health)."""
        declared = {"rest": True, "a2a": bool(self.a2a_service), "ui": bool(self.ui_path)}
        return tuple(name for name, on in declared.items() if on)


Ports = namedtuple("Ports", "rest a2a ui", defaults=(None, None))
Ports.__doc__ = "The agent's ports: rest (int), a2a and ui (int or None)."

_HostEnv = namedtuple(
    "_HostEnv",
    "ports spec_path agent_app_id deployment_id org_id package_path bind_address base_path "
    "multiplexed stop_timeout ready_timeout",
    defaults=("", "", "", None, DEFAULT_BIND_ADDRESS, "", False, DEFAULT_STOP_TIMEOUT_S,
              DEFAULT_READY_TIMEOUT_S),
)


class HostEnv(_HostEnv):
    """The unit's environment, parsed once (design.md, "Environment an agent sees").

    ports: Ports; spec_path: Path; agent_app_id, deployment_id, org_id,
    bind_address, base_path: str; package_path: str or None; multiplexed: bool;
    stop_timeout, ready_timeout: seconds.
    """

    __slots__ = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> HostEnv:
        package_path = environ.get("AGENT_PACKAGE_PATH") or None
        spec = environ.get(SPEC_ENV)
        if not spec:
            if not package_path:
                raise _bad(f"neither {SPEC_ENV} nor AGENT_PACKAGE_PATH is set")
            spec = str(Path(package_path) / SPEC_FILENAME)
        base_path = environ.get("BASE_PATH", "").rstrip("/")
        if base_path and not base_path.startswith("/"):
            base_path = "/" + base_path
        return cls(
            ports=Ports(
                rest=_port(environ, "REST_PORT", required=True),
                a2a=_port(environ, "A2A_PORT"),
                ui=_port(environ, "UI_PORT"),
            ),
            spec_path=Path(spec),
            agent_app_id=environ.get("AGENT_APP_ID", ""),
            deployment_id=environ.get("DEPLOYMENT_ID", ""),
            org_id=environ.get("ORG_ID", ""),
            package_path=package_path,
            bind_address=environ.get("PAR_BIND_ADDRESS") or DEFAULT_BIND_ADDRESS,
            base_path=base_path,
            multiplexed=environ.get("MULTIPLEXED", "").strip().lower() in _TRUE,
            stop_timeout=_seconds(environ, "PAR_STOP_TIMEOUT", DEFAULT_STOP_TIMEOUT_S),
            ready_timeout=_seconds(environ, "PAR_READY_TIMEOUT", DEFAULT_READY_TIMEOUT_S),
        )


def _port(environ: Mapping[str, str], key: str, required: bool = False) -> int | None:
    raw = environ.get(key, "").strip()
    if not raw:
        if required:
            raise _bad(f"{key} is not set")
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise _bad(f"{key}={raw!r} is not a TCP port")
    return int(raw)


def _seconds(environ: Mapping[str, str], key: str, default: float) -> float:
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad(f"{key}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise _bad(f"{key}={raw!r} must be positive")
    return value


def load(environ: Mapping[str, str] | None = None) -> tuple[AgentSpec, HostEnv]:
    """Read the environment and the spec file; every problem is a HostError(EXIT_BAD_SPEC)."""
    env = HostEnv.from_environ(os.environ if environ is None else environ)
    try:
        raw = json.loads(env.spec_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _bad(f"cannot read spec {env.spec_path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise _bad(f"spec {env.spec_path} is not valid JSON: {exc}") from None
    spec = AgentSpec.from_dict(raw, base_dir=env.spec_path.parent, fallback_root=env.package_path)
    if not spec.package_root.is_dir():
        raise _bad(f"package_root {spec.package_root} is not a directory")
    if spec.a2a_service and env.ports.a2a is None:
        raise _bad("the agent declares an a2a service but A2A_PORT is not set")
    if spec.ui_path and env.ports.ui is None:
        raise _bad("the agent declares a ui path but UI_PORT is not set")
    return spec, env
