"""The deploy pipeline and the agent actions (stop, start, restart, remove).

A deploy runs in a worker thread through named phases, each recorded in the
store with its duration:

    downloading  fetch the package (par.fetch)
    loading      extract it, read agent.yaml, effective requirements, venv (par.venvs)
    starting     ports, the transient unit, wait for READY (par.units)
    healthy | failed

Deploys of different agents run in parallel; deploys of one agentAppId are
serialized by a per-agent lock.  A new deployment replaces the agent's current
one only once it is healthy: if it fails to start, the previous deployment is
started again on its ports and stays current.  On failure, whatever this deploy
created on disk that no other deployment uses is removed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from par import layout
from par import ports as portalloc
from par.agent_unit import (EXIT_MEANING, AgentLaunch, env_file_path, unit_spec,
                            write_env_file, write_host_spec)
from par.config import Config
from par.deploy_request import DeployRequest, parse_deploy_request
from par.errors import NotFound, ParError
from par.extract import compile_sources, extract_package
from par.fetch import fetch_package, forget_sources
from par.fsutil import atomic_write_text, remove_tree
from par.journal import tail as journal_tail
from par.log import event
from par.manifest import Manifest, load_manifest, read_dotenv
from par.requirements import effective_requirements
from par.store import Deployment, Store
from par.units import Systemd, UnitStatus, unit_name
from par.venvs import VenvManager, venv_name

EXTRACT_MARKER = ".par-package.sha256"


@dataclass
class Counters:
    """Deploy counters for /metrics (guarded by the Deployer's lock)."""

    deploys_ok: int = 0
    deploys_failed: int = 0
    deploy_seconds: float = 0.0


class Deployer:
    """Runs deploys and actions against the store, the venvs and systemd."""

    def __init__(self, cfg: Config, store: Store, systemd: Systemd, venvs: VenvManager,
                 logger: logging.Logger, host_dir: Path) -> None:
        self.cfg = cfg
        self.host_dir = host_dir  # the compiled agent host agents run (host_files.install_host)
        self.store = store
        self.systemd = systemd
        self.venvs = venvs
        self.logger = logger
        self.counters = Counters()
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="deploy")
        self._lock = threading.Lock()  # accept (idempotency), port allocation, counters
        self._agent_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        # local deploys may use file:// URLs; remembered per deployment for the worker
        self._local: dict[str, bool] = {}
        self._stopping = False
        self._running = 0  # deploys a worker is running now (guarded by _lock)

    # ------------------------------------------------------------------ deploy
    def submit(self, req: DeployRequest, *, local: bool) -> tuple[int, dict]:
        """Record the deploy and queue it: (202, accepted) or (200, existing record)."""
        with self._lock:
            existing = self.store.find(req.deployment_id)
            if existing is not None:
                if _fingerprint(existing) == req.fingerprint():
                    return 200, {"status": "exists", "deploymentId": req.deployment_id,
                                 "deployment": existing.to_api()}
                raise ParError(
                    "conflict",
                    f"deployment {req.deployment_id} exists with a different request",
                    "deploymentId", 409,
                )
            d = Deployment(
                deployment_id=req.deployment_id, agent_app_id=req.agent_app_id,
                version=req.version, package_url=req.package_url, org_id=req.org_id,
                package_sha256=req.package_sha256, request=dict(req.raw), env=dict(req.env),
            )
            self.store.insert_deployment(d)
            self._local[d.deployment_id] = local
        self._pool.submit(self._run_safely, req.deployment_id)
        return 202, {"status": "accepted", "deploymentId": req.deployment_id,
                     "deployment": self.store.get(req.deployment_id).to_api()}

    def resume(self, deployment_id: str) -> None:
        """Queue an accepted deployment again (reconcile after a daemon restart)."""
        self._local.setdefault(deployment_id, True)
        self._pool.submit(self._run_safely, deployment_id)

    def shutdown(self) -> None:
        """Stop taking work; running deploys are abandoned (reconcile finishes them)."""
        self._stopping = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def running(self) -> int:
        """How many deploys workers are running now."""
        with self._lock:
            return self._running

    def _run_safely(self, deployment_id: str) -> None:
        with self._lock:
            self._running += 1
        try:
            self._run(deployment_id)
        except Exception:
            if self._stopping:
                # the store is closed under it: abandoned, like after a crash; reconcile
                # fails or finishes it at the next start
                event(self.logger, "Deploy abandoned: pard is stopping",
                      deploymentId=deployment_id)
                return
            # a bug: record it, keep the worker alive
            self.logger.exception("deploy crashed", extra={"fields": {"deploymentId": deployment_id}})
            try:
                self._fail(deployment_id, ParError("internal", "internal error while deploying; see pard's journal"))
            except Exception:
                self.logger.exception("could not record the failure")
        finally:
            with self._lock:
                self._running -= 1

    def _run(self, deployment_id: str) -> None:
        d = self.store.get(deployment_id)
        with self._agent_locks[d.agent_app_id]:
            started = time.monotonic()
            created: list[Path] = []
            try:
                launch = self._prepare(d, created)
                self._start_replacing(d, launch)
            except ParError as exc:
                self._cleanup(d, created)
                self._fail(deployment_id, exc)
                with self._lock:
                    self.counters.deploys_failed += 1
                return
            finally:
                self._local.pop(deployment_id, None)
            with self._lock:
                self.counters.deploys_ok += 1
                self.counters.deploy_seconds += time.monotonic() - started

    def _prepare(self, d: Deployment, created: list[Path]) -> AgentLaunch:
        """downloading + loading: package on disk, extracted, venv ready."""
        cfg, store, did = self.cfg, self.store, d.deployment_id
        store.start_phase(did, "downloading", "downloading")
        fetched = fetch_package(
            cfg, d.agent_app_id, d.version, d.full_request()["packageUrl"],
            d.package_sha256, bool(d.request.get("forceRefresh")),
            self._local.get(did, False), self.logger,
        )
        if fetched.created:
            created.append(fetched.path)
        # recorded before anything else: from now on the files of this digest are its own
        store.update(did, package_digest=fetched.sha256)
        store.end_phase(did, "downloading")
        store.add_event(did, d.agent_app_id, "Package ready", reused=fetched.reused,
                        bytes=fetched.bytes, sha256=fetched.sha256, seconds=fetched.seconds)

        store.start_phase(did, "loading", "loading")
        root = self._extract(d, fetched.path, fetched.sha256, created)
        manifest = load_manifest(root, self.logger)
        reqs = effective_requirements(root, manifest, cfg.installer.allow_index_options)
        in_use = self._venvs_in_use()
        had_venv = (layout.venvs(cfg) / venv_name(d.agent_app_id, manifest.package_id,
                                                reqs.sha256)).exists()
        venv = self.venvs.ensure(d.agent_app_id, manifest.package_id, reqs.text, reqs.sha256, in_use)
        if not venv.reused and not had_venv:
            created.append(venv.path)
        store.update(did, venv=venv.name, venv_reused=venv.reused)
        store.end_phase(did, "loading")
        store.add_event(did, d.agent_app_id,
                        "Reusing existing venv" if venv.reused else "Venv built",
                        venv=venv.name, installer=venv.installer, seconds=venv.seconds)
        return self._launch(d, root, manifest, venv.path, ports={}, layer=venv.layer)

    def _extract(self, d: Deployment, apkg: Path, sha256: str, created: list[Path]) -> Path:
        """Extract unless these very bytes are extracted already."""
        target = layout.extraction(self.cfg, d.agent_app_id, d.version, sha256)
        marker = target / EXTRACT_MARKER
        try:
            if marker.read_text().strip() == sha256:
                return target
        except OSError:
            pass
        if not target.exists():
            created.append(target)
        def check(tmp_root: Path) -> None:
            # a package whose manifest, .env or requirements are refused never lands
            manifest = load_manifest(tmp_root, self.logger)
            read_dotenv(tmp_root)
            effective_requirements(tmp_root, manifest, self.cfg.installer.allow_index_options)
            compile_sources(tmp_root)
            atomic_write_text(tmp_root / EXTRACT_MARKER, sha256 + "\n")

        return extract_package(self.cfg, d.agent_app_id, d.version, apkg, check=check,
                               sha256=sha256)

    def _launch(self, d: Deployment, root: Path, manifest: Manifest, venv_path: Path,
                ports: dict[str, int], layer: Path | None) -> AgentLaunch:
        env = dict(manifest.environment)
        env.update(read_dotenv(root))
        env.update(d.env)  # the operator's values win over the package's
        return AgentLaunch(
            agent_id=d.agent_app_id, deployment_id=d.deployment_id, org_id=d.org_id or "",
            name=manifest.name, version=d.version, package_root=root, venv_path=venv_path,
            ports=ports, entrypoint=manifest.entrypoint, rest_entry=manifest.rest_entry,
            a2a_service=manifest.a2a_service, ui_path=manifest.ui_path, env=env,
            memory_mb=d.request.get("memoryMB"), cpu_units=d.request.get("cpuUnits"),
            stop_timeout_s=d.request.get("stopTimeoutSec"), host_dir=self.host_dir,
            layer_path=layer,
        )

    def launch_for(self, d: Deployment) -> AgentLaunch:
        """Rebuild the launch of a stored deployment (restart, rollback, reconcile)."""
        root = layout.extraction(self.cfg, d.agent_app_id, d.version, d.package_digest)
        if not (root / "agent.yaml").is_file():
            raise ParError("package_missing",
                           f"extracted package {root} is missing; deploy the agent again")
        manifest = load_manifest(root, self.logger)
        if not d.venv:
            raise ParError("venv_missing", f"deployment {d.deployment_id} has no venv recorded")
        venv_path = layout.venvs(self.cfg) / d.venv
        reqs = effective_requirements(root, manifest, self.cfg.installer.allow_index_options)
        layer = self.venvs.layer_path(venv_path)
        if self.venvs.validate(venv_path, reqs.sha256) is not None:
            # corrupted or evicted: build it again from the package's requirements
            venv = self.venvs.ensure(d.agent_app_id, manifest.package_id, reqs.text,
                                     reqs.sha256, self._venvs_in_use())
            venv_path, layer = venv.path, venv.layer
        return self._launch(d, root, manifest, venv_path, dict(d.ports), layer)

    def _start_replacing(self, d: Deployment, launch: AgentLaunch) -> None:
        """starting: stop the agent's current deployment, start this one; roll back on failure."""
        did, agent = d.deployment_id, d.agent_app_id
        self.store.start_phase(did, "starting", "starting")
        previous = self.store.current(agent)
        if previous is not None and previous.deployment_id == did:
            previous = None
        with self._lock:
            inherit = dict(previous.ports) if previous else {}
            ports = portalloc.allocate(self.cfg.ports, requested=_requested_ports(d),
                                       taken=self._ports_taken(exclude_agent=agent),
                                       inherit=inherit, kinds=launch.surfaces())
            self.store.update(did, ports=ports, unit=unit_name(agent))
        launch = AgentLaunch(**{**launch.__dict__, "ports": ports})
        write_host_spec(launch)
        # only a previous deployment that was serving is brought back on failure
        unit = self.systemd.status(unit_name(agent))
        was_serving = previous is not None and unit.active_state == "active"
        if previous is not None:
            unit = self._stop_unit(agent, _stop_timeout(self.cfg, previous), current=unit)
            self.store.add_event(did, agent, "Stopped previous deployment",
                                 previous=previous.deployment_id)
        try:
            st = self.start_unit(launch, current=unit)
        except ParError:
            if previous is not None and was_serving:
                self._roll_back(did, previous)
            raise
        # current first: a client that sees `healthy` must also see it current (a pard
        # killed in between leaves it `starting` with its unit up: reconcile finishes it)
        self.store.set_current(agent, did)
        self.store.end_phase(did, "starting")
        self.store.update(did, status="healthy")
        if previous is not None:
            self.store.update(previous.deployment_id, status="stopped")
        self.store.add_event(did, agent, "Agent subprocess started", pid=st.main_pid, ports=ports,
                             unit=st.name)
        event(self.logger, "Agent subprocess started", deploymentId=did, agentAppId=agent,
              pid=st.main_pid, ports=ports)

    def agent_lock(self, agent: str) -> threading.Lock:
        """The lock serializing everything done to one agent."""
        return self._agent_locks[agent]

    def start_unit(self, launch: AgentLaunch, current: UnitStatus | None = None) -> UnitStatus:
        """Start the unit and wait for READY; on failure raise with the reason and leave no unit.

        `current`: the unit's status if the caller just read it."""
        spec = unit_spec(self.cfg, launch)
        write_env_file(self.cfg, launch)  # its secrets, read by PID 1 at every (re)start
        started = time.time()
        self.systemd.start(spec, current)
        st = self.systemd.wait_active(spec.name, timeout=spec.timeout_start_s + 10)
        if st.active_state == "active":
            return st
        reason = self._failure_reason(st, since=started)
        self._stop_unit(launch.agent_id, 5)
        self.systemd.reset_failed(spec.name)
        env_file_path(self.cfg, launch.agent_id).unlink(missing_ok=True)  # a rollback rewrites it
        raise ParError("agent_start_failed", reason, None, 500)

    def _failure_reason(self, st: UnitStatus, since: float | None = None) -> str:
        return failure_reason(self.cfg, st, since)

    def _roll_back(self, did: str, previous: Deployment) -> None:
        try:
            self.start_unit(self.launch_for(previous))
            self.store.add_event(did, previous.agent_app_id, "Rolled back",
                                 previous=previous.deployment_id)
            self.store.add_event(previous.deployment_id, previous.agent_app_id,
                                 "Restarted after a failed replacement", failed=did)
        except ParError as exc:
            self.store.fail(previous.deployment_id, exc.code,
                            f"could not restart after failed replacement {did}: {exc.message}")

    def _stop_unit(self, agent: str, stop_timeout_s: float,
                   current: UnitStatus | None = None) -> UnitStatus:
        """Stop the agent's unit and forget a failed state; its status afterwards."""
        name = unit_name(agent)
        st = self.systemd.stop(name, wait_s=stop_timeout_s + 10, current=current)
        if st.exists and st.active_state == "failed":
            self.systemd.reset_failed(name)
            st = self.systemd.status(name)
        return st

    def _fail(self, deployment_id: str, exc: ParError) -> None:
        d = self.store.find(deployment_id)
        if d is None:
            return
        self.store.fail(deployment_id, exc.code, exc.message, exc.field)
        event(self.logger, "Deployment failed", logging.WARNING, deploymentId=deployment_id,
              agentAppId=d.agent_app_id, code=exc.code, message=exc.message)

    def _cleanup(self, d: Deployment, created: list[Path]) -> None:
        """Remove what this failed deploy created that no deployment that could run uses."""
        self._remove_unused(created, exclude=d.deployment_id)

    def _remove_unused(self, paths: list[Path], exclude: str) -> list[str]:
        """Delete those of `paths` (packages, extractions, venvs) that no deployment but
        `exclude` that could run again refers to; return what was deleted.

        Called under the agent's lock: no deploy of the agent can take a reference
        meanwhile (names of packages, extractions and venvs start with the agent's id).
        """
        keepers = [x for x in self.store.currents() + self.store.in_flight()
                   if x.deployment_id != exclude]
        files_in_use = {f for x in keepers if x.package_digest is not None or x.venv
                        for f in layout.deployment_files(self.cfg, x.agent_app_id,
                                                         x.version, x.package_digest)}
        venvs_in_use = {x.venv for x in keepers if x.venv}
        removed: list[str] = []
        for path in paths:
            is_venv = path.parent == layout.venvs(self.cfg)
            if (path.name in venvs_in_use) if is_venv else (path in files_in_use):
                continue
            try:
                if is_venv:
                    if self.venvs.remove(path.name):  # with its layer, once unlinked
                        removed.append(str(path))
                elif path.exists():
                    remove_tree(path)
                    removed.append(str(path))
            except OSError as exc:
                self.logger.warning("cleanup failed", extra={"fields": {"path": str(path),
                                                                         "error": str(exc)}})
        return removed

    # ------------------------------------------------------------------ helpers
    def _venvs_in_use(self, exclude: str | None = None) -> set[str]:
        out = set()
        for x in self.store.currents() + self.store.in_flight():
            if x.venv and x.deployment_id != exclude:
                out.add(x.venv)
        return out

    def _ports_taken(self, exclude_agent: str) -> set[int]:
        taken: set[int] = set()
        for x in self.store.currents() + self.store.in_flight():
            if x.agent_app_id != exclude_agent:
                taken.update(x.ports.values())
        return taken

    # ------------------------------------------------------------------ actions
    def resolve(self, ident: str) -> Deployment:
        """A deploymentId, or an agentAppId meaning its current (else latest) deployment."""
        d = self.store.find(ident)
        if d is not None:
            return d
        d = self.store.current(ident)
        if d is not None:
            return d
        latest = self.store.deployments(agent_app_id=ident)
        if latest:
            return latest[0]
        raise NotFound(f"no deployment or agent named {ident!r}", "id")

    def action(self, ident: str, name: str) -> Deployment:
        """stop / start / restart the agent of a (current) deployment."""
        d = self.resolve(ident)
        if not d.current:
            raise ParError("not_current",
                           f"deployment {d.deployment_id} is not the current one of {d.agent_app_id}",
                           "id", 409)
        agent = d.agent_app_id
        with self._agent_locks[agent]:
            if name == "stop":
                self.store.update(d.deployment_id, desired_state="stopped", status="stopping")
                self._stop_unit(agent, _stop_timeout(self.cfg, d))
                self.store.update(d.deployment_id, status="stopped")
            elif name in ("start", "restart"):
                running = self.systemd.status(unit_name(agent)).active_state == "active"
                launch = None
                if name == "restart" or not running:
                    try:
                        # Before anything is stopped: a restart that cannot start the agent
                        # again (its extracted package is gone) leaves the running one alone.
                        launch = self.launch_for(d)
                    except ParError as exc:
                        if not running:
                            self.store.fail(d.deployment_id, exc.code, exc.message, exc.field)
                        raise
                self.store.update(d.deployment_id, desired_state="running", status="starting")
                try:
                    if name == "restart":
                        self._stop_unit(agent, _stop_timeout(self.cfg, d))
                    if launch is not None:
                        self.start_unit(launch)
                except ParError as exc:
                    self.store.fail(d.deployment_id, exc.code, exc.message, exc.field)
                    raise
                self.store.update(d.deployment_id, status="healthy", error_code=None,
                                  error_message=None, error_field=None)
            else:
                raise ParError("bad_action", f"unknown action {name!r}", "action", 400)
            self.store.add_event(d.deployment_id, agent, f"Agent {name}", by="api")
        return self.store.get(d.deployment_id)

    def remove(self, ident: str, purge: bool) -> dict:
        """Stop the agent and forget the deployment; with `purge`, delete its files too."""
        d = self.resolve(ident)
        agent = d.agent_app_id
        purged: list[str] = []
        with self._agent_locks[agent]:
            if d.current:
                self._stop_unit(agent, _stop_timeout(self.cfg, d))
                env_file_path(self.cfg, agent).unlink(missing_ok=True)
            if d.current:
                self.store.clear_current(agent)
            self.store.update(d.deployment_id, desired_state="removed", status="removed")
            self.store.add_event(d.deployment_id, agent, "Deployment removed", purge=purge)
            if purge:
                purged = self._purge(d)
        return {"deleted": d.deployment_id, "agentAppId": agent, "purged": purged}

    def _purge(self, d: Deployment) -> list[str]:
        """Delete the deployment's package, extraction and venv unless another deployment
        that could run again uses them."""
        paths = list(layout.deployment_files(self.cfg, d.agent_app_id, d.version,
                                             d.package_digest))
        if d.venv:
            paths.append(layout.venvs(self.cfg) / d.venv)
        removed = self._remove_unused(paths, exclude=d.deployment_id)
        if not any(x.version == d.version and x.deployment_id != d.deployment_id
                   for x in self.store.currents() + self.store.in_flight()
                   if x.agent_app_id == d.agent_app_id):
            forget_sources(self.cfg, d.agent_app_id, d.version)
        return removed


def failure_reason(cfg: Config, st: UnitStatus, since: float | None = None) -> str:
    """Why the unit's last run ended, in words, with its last journal lines since `since`."""
    code = st.exec_main_status
    if st.result == "timeout":
        why = (f"the agent did not report ready within {cfg.agents.boot_timeout_s} s "
               "(agents.boot_timeout_s)")
    elif st.result == "exit-code" and code in EXIT_MEANING:
        why = f"{EXIT_MEANING[code]} (exit status {code})"
    elif st.result == "signal":
        why = f"the agent was killed by signal {code}"
    else:
        why = f"the agent exited ({st.result}, status {code})"
    tail = journal_tail(st.name, since=since)
    return f"{why}: {tail}" if tail else why


def _fingerprint(d: Deployment) -> str:
    """The fingerprint of the request a stored deployment was made from."""
    return parse_deploy_request(d.full_request(), local=True, idempotency_key=None).fingerprint()


def _requested_ports(d: Deployment) -> dict[str, int]:
    surfaces = d.request.get("surfaces") or {}
    return dict(surfaces.get("ports") or {})


def _stop_timeout(cfg: Config, d: Deployment) -> float:
    return float(d.request.get("stopTimeoutSec") or cfg.agents.stop_timeout_s)
