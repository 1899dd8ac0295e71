"""Validation of the ids that become unit names, paths and log fields.

Ids are checked by a strict pattern at every boundary and never cleaned up:
`../x` is refused, not turned into `x` (a silently altered id would address
another agent's unit or files).
"""

from __future__ import annotations

import re

from par.errors import ParError

# Lowercase start, then lowercase letters, digits, '-' and '_'; at most 64 chars.
# No '.', '/', '@' or '\\': such ids cannot escape a folder, name another unit
# type ("x.service") or be split by systemd's instance syntax.
AGENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# deploymentIds come from a control plane (often UUIDs); allow upper case too.
DEPLOYMENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# An environment variable name an agent may be given (request env, manifest, parctl -e).
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A SHA-256 hex digest as PAR writes it (hashlib's hexdigest: lower case).  Where a
# person or a control plane may send upper case, match `value.lower()`.
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _check(value: object, pattern: re.Pattern[str], field: str, what: str) -> str:
    if not isinstance(value, str):
        raise ParError("invalid_id", f"{field} must be a string", field)
    if not pattern.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise ParError(
            "invalid_id",
            f"{field} {shown!r} is not a valid {what}: use {pattern.pattern}",
            field,
        )
    return value


def agent_id(value: object, field: str = "agentAppId") -> str:
    """Return `value` if it is a valid agentAppId, else raise ParError naming `field`."""
    return _check(value, AGENT_ID_RE, field, "agent id")


def deployment_id(value: object, field: str = "deploymentId") -> str:
    """Return `value` if it is a valid deploymentId, else raise ParError naming `field`."""
    return _check(value, DEPLOYMENT_ID_RE, field, "deployment id")


def version(value: object, field: str = "version") -> str:
    """Return `value` if it is a valid version string, else raise ParError naming `field`."""
    return _check(value, VERSION_RE, field, "version")
