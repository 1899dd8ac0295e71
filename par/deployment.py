"""A deployment as PAR records it: the `Deployment` record and its statuses.

The store (par.store) keeps these records; the API answers with `to_api()`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

STATUSES = (
    "pending", "downloading", "loading", "starting", "healthy",
    "failed", "stopping", "stopped", "removed",
)
# A deploy or stop is under way: reconcile finishes or fails these after a restart.
IN_FLIGHT = ("pending", "downloading", "loading", "starting", "stopping")
DESIRED_STATES = ("running", "stopped", "removed")
# What the phases of a deploy are called where people read them (parctl, the API's
# `phases[].label`); the statuses keep their names (docs/api.md).
PHASE_LABELS = {"downloading": "downloading", "loading": "building venv",
                "starting": "starting"}
REDACTED = "***"


@dataclass(frozen=True)
class Deployment:
    """One deployment as stored: a row of `deployments` with Python names.

    `request` is the deploy request as sent with its env values replaced by
    "***"; `env` holds the real values (the daemon needs them to re-create the
    unit after a reboot) and is never part of `to_api()`.  Whatever values
    `request["env"]` is given with, the record keeps only its keys there.
    """

    deployment_id: str
    agent_app_id: str
    version: str
    package_url: str
    org_id: str = ""
    package_sha256: str | None = None  # as requested (packageSha256)
    request: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    status: str = "pending"
    desired_state: str = "running"
    current: bool = False
    error_code: str | None = None
    error_message: str | None = None
    error_field: str | None = None
    unit: str | None = None
    venv: str | None = None
    venv_reused: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, float | None]] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    package_digest: str | None = None  # SHA-256 of the package bytes fetched

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if self.desired_state not in DESIRED_STATES:
            raise ValueError(f"unknown desired_state {self.desired_state!r}")
        # Copies: the caller's dicts may change later, a frozen record must not.
        request = copy.deepcopy(dict(self.request))
        env = dict(self.env)
        # the request as stored never holds a value: those live in `env` alone
        if "env" in request or env:
            request["env"] = {k: REDACTED for k in env}
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "env", env)
        object.__setattr__(self, "ports", dict(self.ports))
        object.__setattr__(self, "phases", copy.deepcopy(dict(self.phases)))

    @property
    def error(self) -> dict[str, str | None] | None:
        """`{code, message, field}` when the deployment failed, else None."""
        if self.error_code is None:
            return None
        return {"code": self.error_code, "message": self.error_message or "",
                "field": self.error_field}

    def full_request(self) -> dict[str, Any]:
        """The request as sent, real env values included (never return it to a caller)."""
        request = copy.deepcopy(self.request)
        if "env" in request:
            request["env"] = dict(self.env)
        return request

    def to_api(self) -> dict[str, Any]:
        """The deployment record of docs/api.md (camelCase; env values redacted)."""
        return {
            "deploymentId": self.deployment_id,
            "agentAppId": self.agent_app_id,
            "orgId": self.org_id,
            "version": self.version,
            "status": self.status,
            "current": self.current,
            "desiredState": self.desired_state,
            "error": self.error,
            "unit": self.unit,
            "venv": self.venv,
            "venvReused": self.venv_reused,
            "packageDigest": self.package_digest,
            "ports": dict(self.ports),
            # each phase with the words parctl shows for it (one name everywhere)
            "phases": {name: {**phase, "label": PHASE_LABELS.get(name, name)}
                       for name, phase in copy.deepcopy(self.phases).items()},
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "request": copy.deepcopy(self.request),
        }
