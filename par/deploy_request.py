"""`POST /deploy` bodies → a validated, normalized `DeployRequest`.

Every rule of docs/api.md "Deploy request rules" lives here, checked in a fixed
order; the first broken rule is raised as a `ParError` naming the field:

| status | code | when |
|---|---|---|
| 400 | `not_object` | the body is not a JSON object |
| 400 | `missing_field` | a required field is absent or null |
| 400 | `invalid_id` | deploymentId, agentAppId or version breaks its `par.ids` pattern |
| 400 | `invalid_field` | any other wrong type, range or format |
| 403 | `local_only` | a `file://` URL or absolute path arrived over TCP |
| 400 | `idempotency_mismatch` | the `Idempotency-Key` header differs from deploymentId |

Every validation error is a 400 (422 is not used): the `code` tells a caller
what kind of mistake it made, one status says "fix the request, do not retry".

Optional fields sent as JSON null count as absent (control planes serialize
unset fields that way).  Unknown top-level fields are ignored.  Env values are
kept for the deployment but never appear in a message, a `repr` or `redacted()`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from par import agent_env, ids
from par.errors import ParError

PORT_NAMES = ("rest", "a2a", "ui")
PORT_RANGE = (1024, 65535)
CPU_UNITS_RANGE = (1, 65536)
MEMORY_MB_RANGE = (16, 1048576)
STOP_TIMEOUT_RANGE = (1, 3600)
# Signed URLs carry long query strings; anything longer is not a URL we fetch.
MAX_URL_CHARS = 8192
MAX_ORG_ID_CHARS = 256
MAX_ENV_VARS = 512
REDACTED = "***"


@dataclass(frozen=True)
class DeployRequest:
    """A deploy request that passed every rule; field names are PAR's, values normalized.

    `ports` holds only the ports the request fixed (the rest are allocated).
    `raw` is the request in its wire shape minus unknown fields (nulls dropped,
    packageSha256 lower-cased): what the store keeps and what
    `parse_deploy_request(raw, local=True, idempotency_key=None)` reads back.
    """

    deployment_id: str
    agent_app_id: str
    org_id: str
    version: str
    package_url: str
    package_url_signed: bool
    package_sha256: str | None = None
    force_refresh: bool = False
    cpu_units: int | None = None
    memory_mb: int | None = None
    stop_timeout_s: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    # repr=False: a logged or printed request must not show env values.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def package_is_local(self) -> bool:
        """True for a `file://` URL or an absolute path (only accepted on the unix socket)."""
        return self.package_url.startswith("/") or _scheme(self.package_url) == "file"

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the normalized request.

        Equal fingerprints mean "the same request again" (idempotent retry);
        a different one under the same deploymentId is a conflict.  Defaults
        and their absence compare equal (forceRefresh false == not sent).  A
        signed URL counts without its query string: that is the signature and
        expiry, which a control plane renews on every retry.
        """
        url = self.package_url
        if self.package_url_signed:
            parts = urlsplit(url)
            url = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, "", ""))
        canonical = {
            "deploymentId": self.deployment_id,
            "agentAppId": self.agent_app_id,
            "orgId": self.org_id,
            "version": self.version,
            "packageUrl": url,
            "signed": self.package_url_signed,
            "packageSha256": self.package_sha256,
            "forceRefresh": self.force_refresh,
            "cpuUnits": self.cpu_units,
            "memoryMB": self.memory_mb,
            "stopTimeoutSec": self.stop_timeout_s,
            "ports": self.ports,
            "env": self.env,
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def redacted(self) -> dict:
        """`raw` with every env value replaced by "***": safe to return and to log."""
        out = dict(self.raw)
        if "env" in out:
            out["env"] = {key: REDACTED for key in out["env"]}
        return out


def parse_deploy_request(
    body: object, *, local: bool, idempotency_key: str | None
) -> DeployRequest:
    """Validate a decoded `POST /deploy` body; raise ParError naming the first bad field.

    local: the request came over the unix socket (`file://` URLs and absolute
    paths allowed).  idempotency_key: the `Idempotency-Key` header, None when absent.
    """
    if not isinstance(body, dict):
        raise ParError("not_object", "the deploy request must be a JSON object")

    deployment_id = ids.deployment_id(_required(body, "deploymentId"))
    if idempotency_key is not None and idempotency_key != deployment_id:
        raise ParError(
            "idempotency_mismatch",
            "the Idempotency-Key header must equal deploymentId",
            "Idempotency-Key",
        )
    agent_app_id = ids.agent_id(_required(body, "agentAppId"))
    org_id = _org_id(_required(body, "orgId"))
    version = ids.version(_required(body, "version"))
    package_url, signed = _package_url(_required(body, "packageUrl"), local)
    sha = _optional(body, "packageSha256")
    if sha is not None and not (isinstance(sha, str) and ids.SHA256_RE.fullmatch(sha.lower())):
        raise _invalid("packageSha256", "packageSha256 must be 64 hexadecimal characters")
    force = _optional(body, "forceRefresh")
    if force is not None and not isinstance(force, bool):
        raise _invalid("forceRefresh", "forceRefresh must be true or false")
    cpu_units = _int_in(body, "cpuUnits", CPU_UNITS_RANGE)
    memory_mb = _int_in(body, "memoryMB", MEMORY_MB_RANGE)
    stop_timeout = _int_in(body, "stopTimeoutSec", STOP_TIMEOUT_RANGE)
    ports = _ports(_optional(body, "surfaces"))
    env = _env(_optional(body, "env"))

    raw: dict = {
        "deploymentId": deployment_id,
        "agentAppId": agent_app_id,
        "orgId": org_id,
        "version": version,
        "packageUrl": {"signedUrl": package_url} if signed else package_url,
    }
    optional = {
        "packageSha256": sha.lower() if sha is not None else None,
        "forceRefresh": force,
        "cpuUnits": cpu_units,
        "memoryMB": memory_mb,
        "stopTimeoutSec": stop_timeout,
        "surfaces": {"ports": dict(ports)} if ports else None,
        "env": dict(env) if body.get("env") is not None else None,
    }
    raw.update({key: value for key, value in optional.items() if value is not None})
    package_sha256 = sha.lower() if isinstance(sha, str) else None
    return DeployRequest(
        deployment_id=deployment_id,
        agent_app_id=agent_app_id,
        org_id=org_id,
        version=version,
        package_url=package_url,
        package_url_signed=signed,
        package_sha256=package_sha256,
        force_refresh=bool(force),
        cpu_units=cpu_units,
        memory_mb=memory_mb,
        stop_timeout_s=stop_timeout,
        ports=ports,
        env=env,
        raw=raw,
    )


def from_stored(raw: dict) -> DeployRequest:
    """The request a deployment was stored with (`Deployment.full_request()`), typed again.

    A stored request passed these rules when it arrived; local URLs in it came
    over the unix socket (the only place they are accepted)."""
    return parse_deploy_request(raw, local=True, idempotency_key=None)


def _invalid(name: str, message: str) -> ParError:
    return ParError("invalid_field", message, name, 400)


def _required(body: dict, name: str) -> object:
    value = body.get(name)
    if value is None:
        raise ParError("missing_field", f"{name} is required", name, 400)
    return value


def _optional(body: dict, name: str) -> object:
    return body.get(name)


def _has_control_chars(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _org_id(value: object) -> str:
    # orgId ends up in the agent's environment and in logs: plain text only.
    if not isinstance(value, str):
        raise _invalid("orgId", "orgId must be a string")
    if len(value) > MAX_ORG_ID_CHARS or _has_control_chars(value):
        raise _invalid(
            "orgId",
            f"orgId must be at most {MAX_ORG_ID_CHARS} characters, without control characters",
        )
    return value


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def _package_url(value: object, local: bool) -> tuple[str, bool]:
    """The URL to fetch and whether it came as `{"signedUrl": ...}`."""
    name, signed = "packageUrl", False
    if isinstance(value, dict):
        name, signed = "packageUrl.signedUrl", True
        value = value.get("signedUrl")
        if value is None:
            raise ParError("missing_field", "packageUrl.signedUrl is required", name, 400)
    if not isinstance(value, str):
        raise _invalid(name, f'{name} must be a URL string or {{"signedUrl": URL}}')
    if not value or len(value) > MAX_URL_CHARS:
        raise _invalid(name, f"{name} must be 1 to {MAX_URL_CHARS} characters")
    # Whitespace or control characters could make the URL parse differently here and in requests.
    if _has_control_chars(value) or any(c.isspace() for c in value):
        raise _invalid(name, f"{name} must not contain whitespace or control characters")
    if value.startswith("/"):
        if not local:
            raise _local_only(name)
        return value, signed
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise _invalid(name, f"{name} is not a valid URL") from exc
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not local:
            raise _local_only(name)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise _invalid(name, f"{name} must be file:///absolute/path")
        return value, signed
    if scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(name, f"{name} must be an http:// or https:// URL")
    return value, signed


def _local_only(name: str) -> ParError:
    return ParError(
        "local_only",
        f"{name}: file:// URLs and paths are accepted on the local socket only",
        name,
        403,
    )


def _int_in(body: dict, name: str, bounds: tuple[int, int]) -> int | None:
    value = _optional(body, name)
    if value is None:
        return None
    return _checked_int(name, value, bounds)


def _checked_int(name: str, value: object, bounds: tuple[int, int]) -> int:
    low, high = bounds
    # bool is an int subclass in Python; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _invalid(name, f"{name} must be an integer from {low} to {high}")
    return value


def _ports(surfaces: object) -> dict[str, int]:
    if surfaces is None:
        return {}
    if not isinstance(surfaces, dict):
        raise _invalid("surfaces", "surfaces must be an object")
    ports = surfaces.get("ports")
    if ports is None:
        return {}
    if not isinstance(ports, dict):
        raise _invalid("surfaces.ports", "surfaces.ports must be an object")
    out: dict[str, int] = {}
    for key, value in ports.items():
        name = f"surfaces.ports.{key}"
        # An unknown port name is most likely a typo; ignoring it would allocate silently.
        if key not in PORT_NAMES:
            raise _invalid(name, f"{name}: unknown surface (known: {', '.join(PORT_NAMES)})")
        if value is None:
            continue
        out[key] = _checked_int(name, value, PORT_RANGE)
    if len(set(out.values())) != len(out):
        raise _invalid("surfaces.ports", "surfaces.ports must not repeat a port")
    return out


def _env(env: object) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise _invalid("env", "env must be an object of string to string")
    if len(env) > MAX_ENV_VARS:
        raise _invalid("env", f"env holds more than {MAX_ENV_VARS} variables")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not ids.ENV_KEY_RE.fullmatch(key):
            shown = key if len(key) <= 80 else key[:77] + "..."
            raise _invalid("env", f"env key {shown!r} must match {ids.ENV_KEY_RE.pattern}")
        # Messages name the key only: env values are secrets.
        if not isinstance(value, str):
            raise _invalid(f"env.{key}", f"env.{key} must be a string")
        if "\x00" in value:
            raise _invalid(f"env.{key}", f"env.{key} must not contain a NUL character")
        out[key] = value
    # the loader's, the interpreter's, systemd's and PAR's reserved keys (par.agent_env)
    agent_env.check(out, agent_env.SOURCE_REQUEST)
    return out
