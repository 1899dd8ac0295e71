"""The routes table: which port serves an agent or a deployment, and in what state.

pard writes it (`build_table`, `par.front_door.RoutesPublisher`) as a small JSON
file, atomically, whenever the store changes; the front door reads it
(`RoutesFile`) again when the file changed.  It holds no secret: ids,
statuses and loopback ports only, so the front door's sandbox may read it.

    {"schema": 1,
     "agents": {"hello": {"deploymentId": "d-2", "current": true, "status": "healthy",
                          "desiredState": "running", "ports": {"rest": 8100}}},
     "deployments": {"d-2": {"agentAppId": "hello", "current": true, "status": "healthy"},
                     "d-3": {"agentAppId": "hello", "current": false, "status": "loading"}}}
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from par.deployment import Deployment

SCHEMA = 1
# A deployment on its way to serving: a request for it waits (up to front.hold_s).
IN_FLIGHT = frozenset({"pending", "downloading", "loading", "starting"})
# A current deployment in one of these serves no request until someone acts.
DOWN = frozenset({"failed", "stopped", "removed"})


def build_table(currents: Iterable[Deployment], others: Iterable[Deployment]) -> dict[str, Any]:
    """The table for the agents' current deployments and `others` (in flight, or the newest
    of an agent with no current one); an agent's current deployment wins over the others."""
    agents: dict[str, dict[str, Any]] = {}
    deployments: dict[str, dict[str, Any]] = {}
    for d in currents:
        agents[d.agent_app_id] = {"deploymentId": d.deployment_id, "current": True,
                                  "status": d.status, "desiredState": d.desired_state,
                                  "ports": dict(d.ports)}
        deployments[d.deployment_id] = {"agentAppId": d.agent_app_id, "current": True,
                                        "status": d.status}
    for d in others:
        if d.deployment_id in deployments:
            continue
        deployments[d.deployment_id] = {"agentAppId": d.agent_app_id, "current": False,
                                        "status": d.status}
        agents.setdefault(d.agent_app_id, {"deploymentId": d.deployment_id, "current": False,
                                           "status": d.status,
                                           "desiredState": d.desired_state, "ports": {}})
    return {"schema": SCHEMA, "agents": agents, "deployments": deployments}


def render(table: dict[str, Any]) -> bytes:
    """The file's bytes (stable: an unchanged table gives the same bytes)."""
    return json.dumps(table, sort_keys=True, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class Resolution:
    """What to do with a request for an id.

    kind: `forward` (to `ports`), `hold` (it is on its way: wait and ask again),
    `down` (a 503 naming `status`) or `unknown` (404)."""

    kind: str
    agent: str | None = None
    deployment_id: str | None = None
    status: str | None = None
    ports: dict[str, int] | None = None


def resolve(table: dict[str, Any], ident: str) -> Resolution:
    """How to serve a request for `ident`, an agentAppId or a deploymentId."""
    agents = table.get("agents", {})
    entry = agents.get(ident)
    if entry is None:
        dep = table.get("deployments", {}).get(ident)
        if dep is None:
            return Resolution("unknown")
        if not dep.get("current"):
            # on its way to serving, or replaced / failed: its process is gone for good
            status = dep.get("status")
            return Resolution("hold" if status in IN_FLIGHT else "down", dep.get("agentAppId"),
                              ident, status)
        entry = agents.get(dep.get("agentAppId"), {})
        ident = dep.get("agentAppId", ident)
    status = entry.get("status")
    did = entry.get("deploymentId")
    if not entry.get("current"):
        return Resolution("hold" if status in IN_FLIGHT else "down", ident, did, status)
    if entry.get("desiredState") != "running" or status in DOWN:
        return Resolution("down", ident, did, status)
    # healthy, or (re)starting / stopping on the way back: forward, and hold if refused
    return Resolution("forward", ident, did, status, dict(entry.get("ports", {})))


class RoutesFile:
    """The routes file as the front door reads it: parsed again only when it changed
    (pard replaces it by rename, so its inode changes), looked at most every `check_s`."""

    def __init__(self, path: Path, check_s: float = 0.01) -> None:
        self.path = path
        self.check_s = check_s
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._table: dict[str, Any] = {}

    def table(self) -> dict[str, Any]:
        """The current table (empty while the file does not exist)."""
        now = time.monotonic()
        if now - self._checked >= self.check_s:
            self._checked = now
            self._reload()
        return self._table

    def resolve(self, ident: str) -> Resolution:
        """`resolve` against the current table."""
        return resolve(self.table(), ident)

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._table = None, {}
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            table = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return  # keep the last good table; the next check reads it again
        if isinstance(table, dict) and table.get("schema") == SCHEMA:
            self._stamp, self._table = stamp, table
