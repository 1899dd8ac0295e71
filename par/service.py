"""What the API serves: `ParService` implements `par.api.Service` over the deploy
runner, the actions, the store, the venvs and systemd.  Handlers return plain
dicts (docs/api.md)."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time

from par import __version__, loopback
from par.actions import Actions, resolve
from par.deploy_request import DeployRequest
from par.deployer import Deployer
from par.errors import ParError
from par.front_door import front_url
from par.pipeline import Core, venvs_in_use
from par.requirements import Policy, parse_requirements
from par.store import Deployment
from par.units import UnitStatus, unit_name
from par.uv_bootstrap import install_uv


class ParService:
    """The daemon's answers to API calls."""

    def __init__(self, core: Core, deployer: Deployer, actions: Actions,
                 started_at: float | None = None) -> None:
        self.core = core
        self.cfg = core.cfg
        self.store = core.store
        self.systemd = core.systemd
        self.venv_manager = core.venvs
        self.deployer = deployer
        self.actions = actions
        self.started_at = started_at or time.time()
        # long polls hold a thread each: beyond the cap they answer at once
        self._long_polls = threading.BoundedSemaphore(core.cfg.listen.max_long_polls)

    # deployments
    def deploy(self, req: DeployRequest) -> tuple[int, dict]:
        return self.deployer.submit(req)

    def list_deployments(self, agent_app_id: str | None = None,
                         status: str | None = None) -> list[dict]:
        """Deployments, newest first, of one agent and/or in one status."""
        return [d.to_api() for d in self.store.deployments(agent_app_id=agent_app_id,
                                                           status=status)]

    def get_deployment(self, ident: str, wait: float | None = None,
                       since: float | None = None) -> dict:
        """The deployment; with `wait`, once its `updatedAt` differs from `since` (by
        default: from what it is now), or after `wait` seconds."""
        d = resolve(self.store, ident)
        if wait and self._long_polls.acquire(blocking=False):
            try:
                d = self.store.wait_for_change(d.deployment_id,
                                               d.updated_at if since is None else since, wait)
            finally:
                self._long_polls.release()
        # address: where this host reaches the agent's ports (its own loopback address
        # with agents.isolate_loopback), for `parctl status`'s health URL
        return {**d.to_api(), "frontUrl": front_url(self.cfg, d.agent_app_id),
                "address": loopback.connect_host(self.cfg, d.ports)}

    def deployment_health(self, ident: str) -> dict:
        d = resolve(self.store, ident)
        st = self.systemd.status(unit_name(d.agent_app_id)) if d.current else None
        status = live_status(d, st)
        surfaces: dict = {}
        healthy = False
        message = d.error_message or status
        if st is not None and status == "healthy" and d.ports.get("rest"):
            # from the front door's source address with agents.isolate_loopback: the one
            # address besides its own the agent's unit accepts (par.loopback)
            code, body = _get_json(loopback.connect_host(self.cfg, d.ports), d.ports["rest"],
                                   "/health", source=loopback.source_address(self.cfg))
            healthy = code == 200 and bool(body.get("ok"))
            surfaces = body.get("surfaces", {}) if isinstance(body, dict) else {}
            message = "healthy" if healthy else f"agent /health answered {code}"
        elif st is not None and status == "restarting":
            message = (f"crashed; systemd restarts it (restarts so far: {st.n_restarts}, "
                       f"unit {st.active_state} ({st.sub_state}))")
        elif st is not None and not d.error_message:
            message = f"unit is {st.active_state} ({st.sub_state})"
        return {
            "deploymentId": d.deployment_id,
            "agentAppId": d.agent_app_id,
            "status": status,
            "healthy": healthy,
            "message": message,
            "details": st.to_dict() if st is not None else None,
            "surfaces": surfaces,
            "ports": d.ports,
        }

    def deployment_events(self, ident: str, limit: int | None = None) -> list[dict]:
        d = resolve(self.store, ident)
        return self.store.events(d.deployment_id, limit=limit)

    def action(self, ident: str, name: str) -> dict:
        return self.actions.act(ident, name).to_api()

    def set_env(self, ident: str, values: dict[str, str], unset: list[str],
                restart: bool) -> tuple[int, dict]:
        return self.actions.set_env(ident, values, unset, restart)

    def env_names(self, ident: str) -> dict:
        d = resolve(self.store, ident)
        return {"deploymentId": d.deployment_id, "agentAppId": d.agent_app_id,
                "names": sorted(d.env)}

    def delete(self, ident: str, purge: bool) -> dict:
        return self.actions.remove(ident, purge)

    def agents(self, include_all: bool = False) -> list[dict]:
        """Every agent's current deployment with its live status, unit and resources;
        `include_all`: agents with no current deployment too (a failed first deploy,
        say), each with its newest deployment and no unit."""
        currents = sorted(self.store.currents(), key=lambda x: x.agent_app_id)
        live = self.systemd.statuses([unit_name(d.agent_app_id) for d in currents])
        out = []
        for d in currents:
            st, res = live[unit_name(d.agent_app_id)]
            out.append({
                "agentAppId": d.agent_app_id,
                "frontUrl": front_url(self.cfg, d.agent_app_id),
                "status": live_status(d, st),
                "deployment": d.to_api(),
                "unit": st.to_dict(),
                "resources": {"rssBytes": res.rss_bytes, "cpuSeconds": res.cpu_seconds,
                              "pids": list(res.pids)} if res else None,
            })
        if include_all:
            have = {d.agent_app_id for d in currents}
            for d in self.store.latest_per_agent():
                if d.agent_app_id not in have:
                    out.append({"agentAppId": d.agent_app_id,
                                "frontUrl": front_url(self.cfg, d.agent_app_id),
                                "status": d.status,
                                "deployment": d.to_api(), "unit": None, "resources": None})
            out.sort(key=lambda a: str(a["agentAppId"]))
        return out

    # daemon
    def daemon_health(self) -> dict:
        disk = shutil.disk_usage(self.cfg.paths.state_dir)
        return {
            "ok": True,
            "version": __version__,
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "agents": self.store.counts_by_status(),
            "disk": {"path": str(self.cfg.paths.state_dir), "freeBytes": disk.free,
                     "totalBytes": disk.total},
            "capacity": {"workers": self.cfg.workers, "maxVenvs": self.cfg.venvs.max_venvs},
            "installer": self.venv_manager.installer_status(),
        }

    def metrics(self) -> str:
        lines = ["# HELP par_deployments Deployments by status.", "# TYPE par_deployments gauge"]
        for status, n in sorted(self.store.counts_by_status().items()):
            lines.append(f'par_deployments{{status="{status}"}} {n}')
        v = self.venv_manager.counters.snapshot()
        for key in ("hits", "misses", "builds", "failures", "evictions"):
            lines += [f"# TYPE par_venv_{key}_total counter",
                      f"par_venv_{key}_total {int(v.get(key, 0))}"]
        lines += ["# TYPE par_venv_build_seconds_total counter",
                  f"par_venv_build_seconds_total {v.get('build_seconds', 0.0):.3f}"]
        c = self.deployer.counters
        lines += [
            "# TYPE par_deploys_total counter",
            f'par_deploys_total{{result="healthy"}} {c.deploys_ok}',
            f'par_deploys_total{{result="failed"}} {c.deploys_failed}',
            "# TYPE par_deploy_seconds_total counter",
            f"par_deploy_seconds_total {c.deploy_seconds:.3f}",
        ]
        return "\n".join(lines) + "\n"

    # venvs and installer
    def venvs(self) -> list[dict]:
        users: dict[str, list[str]] = {}
        for d in self.store.currents():
            if d.venv:
                users.setdefault(d.venv, []).append(d.agent_app_id)
        return [{"name": v.name, "sizeBytes": v.size_bytes, "lastUsed": v.last_used,
                 "inUseBy": list(v.in_use_by), "packageId": v.package_id,
                 "pythonVersion": v.python_version, "installer": v.installer,
                 "layer": v.layer, "layerShared": v.layer_users}
                for v in self.venv_manager.entries(users)]

    def prune_venvs(self) -> dict:
        return {"evicted": self.venv_manager.prune(venvs_in_use(self.store), all_unused=True)}

    def prewarm(self, requirements: str) -> dict:
        """Fill the installer cache from `requirements`, checked like a package's
        requirements.txt, and stricter: no direct URLs (the cache is filled from the
        configured index only)."""
        if not isinstance(requirements, str) or not requirements.strip():
            raise ParError("invalid_field", "requirements must be a non-empty string",
                           "requirements")
        ic = self.cfg.installer
        parse_requirements(requirements, Policy(
            label="requirements", allow_index_options=ic.allow_index_options,
            allow_urls=False, only_binary=ic.only_binary))
        res = self.venv_manager.prewarm(requirements)
        return {"installer": res.installer, "seconds": res.seconds}

    def install_uv(self, version: str | None = None) -> dict:
        path = install_uv(self.cfg, version)
        # a new installer choice applies to the next builds
        self.venv_manager.reset_installer()
        return {"path": str(path), "version": self.venv_manager.installer.version()}


def live_status(d: Deployment, st: UnitStatus | None) -> str:
    """The deployment's status as it is now: the stored one, corrected by its unit.

    A deployment stored `healthy` whose unit systemd is restarting after a crash
    is "restarting"; one whose unit is failed (systemd gave up) or gone is
    "failed" (the unit monitor records the reason a moment later).
    """
    if st is None or d.status != "healthy":
        return d.status
    if st.active_state == "active":
        return "healthy"
    if st.sub_state == "auto-restart" or st.active_state in ("activating", "deactivating",
                                                             "reloading"):
        return "restarting"
    return "failed"


def _get_json(host: str, port: int, path: str, timeout: float = 2.0,
              source: str | None = None) -> tuple[int, dict]:
    """GET http://host:port/path, from the address `source` when given; (status, parsed
    JSON or {}) — 0 when unreachable."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        try:
            body = json.loads(data or b"{}")
        except ValueError:
            body = {}
        return resp.status, body if isinstance(body, dict) else {}
    except (OSError, http.client.HTTPException):
        return 0, {}
    finally:
        conn.close()
