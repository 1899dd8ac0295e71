"""The deploy runner: accepts deploys, queues them per agent, runs the pipeline's steps.

A deploy goes through named phases, each recorded in the store with its
duration:

    downloading  pipeline.fetch
    loading      pipeline.load, pipeline.venv
    starting     pipeline.start (replacing the agent's current deployment)
    healthy | failed

Every agent has its own queue, drained by one worker at a time: deploys of
different agents run in parallel, deploys of one agent in the order they
came, and no worker thread waits for another deploy of the same agent.
A new deployment replaces the agent's current one only once it is healthy: if
it fails to start, the previous deployment is started again on its ports and
stays current.  On failure, whatever this deploy created on disk that no
other deployment uses is removed.  A deploy removed while queued never runs.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from par import pipeline, retention
from par.agent_locks import AgentLocks
from par.agent_unit import AgentLaunch
from par.deploy_request import DeployRequest, from_stored
from par.errors import ParError
from par.log import event
from par.ownership import remove_unused
from par.pipeline import Core
from par.store import Deployment, Store
from par.units import unit_name


@dataclass
class Counters:
    """Deploy counters for /metrics (guarded by the Deployer's lock)."""

    deploys_ok: int = 0
    deploys_failed: int = 0
    deploy_seconds: float = 0.0


class Deployer:
    """Accepts deploys and runs them, one queue per agent."""

    def __init__(self, core: Core, locks: AgentLocks, workers: int) -> None:
        self.core = core
        self.locks = locks
        self.counters = Counters()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="deploy")
        self._lock = threading.Lock()  # accept (idempotency), queues, ports, counters
        self._queues: dict[str, deque[str]] = {}  # agent → its deploys not yet begun
        self._stopping = False
        self._running = 0  # deploys a worker is running now (guarded by _lock)

    # ---------------------------------------------------------------- accepting

    def submit(self, req: DeployRequest) -> tuple[int, dict]:
        """Record the deploy and queue it: (202, accepted) or (200, existing record)."""
        store = self.core.store
        with self._lock:
            existing = store.find(req.deployment_id)
            if existing is not None:
                if from_stored(existing.full_request()).fingerprint() == req.fingerprint():
                    return 200, {"status": "exists", "deploymentId": req.deployment_id,
                                 "deployment": existing.to_api()}
                raise ParError("conflict",
                               f"deployment {req.deployment_id} exists with a different request",
                               "deploymentId", 409)
            _refuse_overlap(store, req)
            d, _ = store.insert_deployment(Deployment(
                deployment_id=req.deployment_id, agent_app_id=req.agent_app_id,
                version=req.version, package_url=req.package_url, org_id=req.org_id,
                package_sha256=req.package_sha256, request=dict(req.raw), env=dict(req.env),
            ))
            queue = self._queues.get(req.agent_app_id)
            if queue is None:
                self._queues[req.agent_app_id] = deque([req.deployment_id])
            else:
                queue.append(req.deployment_id)
        if queue is None:
            self._pool.submit(self._drain, req.agent_app_id)
        return 202, {"status": "accepted", "deploymentId": req.deployment_id,
                     "deployment": d.to_api()}

    def cancel(self, deployment_id: str, agent: str) -> bool:
        """Take a deploy that has not begun out of its agent's queue; False if it had begun
        (or was never queued).  The caller records why."""
        with self._lock:
            queue = self._queues.get(agent)
            if queue is not None and deployment_id in queue:
                queue.remove(deployment_id)
                return True
        return False

    def shutdown(self) -> None:
        """Stop taking work; running deploys are abandoned (reconcile finishes them)."""
        self._stopping = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def running(self) -> int:
        """How many deploys workers are running now."""
        with self._lock:
            return self._running

    # ---------------------------------------------------------------- running

    def _drain(self, agent: str) -> None:
        """Run the agent's queued deploys in order, until its queue is empty."""
        while not self._stopping:
            with self._lock:
                queue = self._queues[agent]
                if not queue:
                    del self._queues[agent]
                    return
                deployment_id = queue.popleft()
                self._running += 1
            try:
                self._run_safely(deployment_id)
            finally:
                with self._lock:
                    self._running -= 1

    def _run_safely(self, deployment_id: str) -> None:
        try:
            self._run(deployment_id)
        except Exception:
            logger = self.core.logger
            if self._stopping:
                # the store is closed under it: abandoned, like after a crash; reconcile
                # fails or finishes it at the next start
                event(logger, "Deploy abandoned: pard is stopping", deploymentId=deployment_id)
                return
            # a bug: record it, keep the worker alive
            logger.exception("deploy crashed", extra={"fields": {"deploymentId": deployment_id}})
            try:
                self._fail(deployment_id, ParError(
                    "internal", "internal error while deploying; see pard's journal"))
            except Exception:
                logger.exception("could not record the failure")

    def _run(self, deployment_id: str) -> None:
        store = self.core.store
        d = store.get(deployment_id)
        with self.locks.of(d.agent_app_id):
            d = store.get(deployment_id)
            if d.desired_state == "removed":
                return  # removed while it waited for the lock: never started
            req = from_stored(d.full_request())
            started = time.monotonic()
            created: list[Path] = []
            try:
                try:
                    self._deploy(d, req, created)
                except OSError as exc:
                    full = disk_full(exc, self.core.cfg.paths.state_dir)
                    if full is None:
                        raise
                    raise full from exc
            except ParError as exc:
                remove_unused(self.core.cfg, store, self.core.venvs, self.core.logger,
                              created, exclude=deployment_id)
                self._fail(deployment_id, exc)
                with self._lock:
                    self.counters.deploys_failed += 1
                return
            finally:
                self._prune(d.agent_app_id)
            with self._lock:
                self.counters.deploys_ok += 1
                self.counters.deploy_seconds += time.monotonic() - started

    def _prune(self, agent: str) -> None:
        """The history and the agent's spare packages (par.retention); the agent's lock is
        held.  A failure is logged: it must not fail the deploy."""
        core = self.core
        try:
            retention.after_deploy(core.cfg, core.store, agent, core.logger, time.time())
        except Exception:
            core.logger.exception("pruning failed", extra={"fields": {"agentAppId": agent}})

    def _deploy(self, d: Deployment, req: DeployRequest, created: list[Path]) -> None:
        """The phases of one deploy, recorded as they happen."""
        core, store, did, agent = self.core, self.core.store, d.deployment_id, d.agent_app_id
        store.start_phase(did, "downloading", "downloading")
        fetched = pipeline.fetch(core, req, created)
        # recorded before anything else: from now on the files of this digest are its own
        store.update(did, package_digest=fetched.sha256)
        store.end_phase(did, "downloading")
        store.add_event(did, agent, "Package ready", reused=fetched.reused,
                        bytes=fetched.bytes, sha256=fetched.sha256, seconds=fetched.seconds)

        store.start_phase(did, "loading", "loading")
        pkg = pipeline.load(core, req, fetched, created)
        venv = pipeline.venv(core, req, pkg, created)
        store.update(did, venv=venv.name, venv_reused=venv.reused)
        store.end_phase(did, "loading")
        why_pip = None if venv.reused or venv.installer != "pip" else core.venvs.fallback_reason()
        store.add_event(did, agent, "Reusing existing venv" if venv.reused else "Venv built",
                        venv=venv.name, installer=venv.installer, seconds=venv.seconds,
                        **({"installer_reason": why_pip} if why_pip else {}))

        store.start_phase(did, "starting", "starting")
        previous = store.current(agent)
        if previous is not None and previous.deployment_id == did:
            previous = None
        with self._lock:  # two agents must not pick the same free port
            ports = pipeline.allocate_ports(core, req, pkg.manifest,
                                            inherit=dict(previous.ports) if previous else {})
            store.update(did, ports=ports, unit=unit_name(agent))
        launch = pipeline.launch(core, req, pkg, venv.path, venv.layer, ports)
        self._replace(d, previous, launch)

    def _replace(self, d: Deployment, previous: Deployment | None,
                 launch: AgentLaunch) -> None:
        """Stop the agent's current deployment and start this one; roll back on failure."""
        core, store, did, agent = self.core, self.core.store, d.deployment_id, d.agent_app_id
        unit = core.systemd.status(unit_name(agent))
        # only a previous deployment that was serving is brought back on failure
        was_serving = previous is not None and unit.active_state == "active"
        if previous is not None:
            # another deployment's units follow: pard holds the ports meanwhile
            unit = pipeline.stop_deployment(core, previous, current=unit, park=True)
            store.add_event(did, agent, "Stopped previous deployment",
                            previous=previous.deployment_id)
        try:
            st = pipeline.start(core, launch, current=unit)
        except ParError:
            if previous is not None and was_serving:
                self._roll_back(did, previous)
            # nothing serves (no rollback, or it failed): the held ports go
            pipeline.release_if_idle(core, agent)
            raise
        # current first: a client that sees `healthy` must also see it current (a pard
        # killed in between leaves it `starting` with its unit up: reconcile finishes it)
        store.set_current(agent, did)
        store.end_phase(did, "starting")
        store.update(did, status="healthy")
        if previous is not None:
            store.update(previous.deployment_id, status="stopped")
        store.add_event(did, agent, "Agent subprocess started", pid=st.main_pid,
                        ports=launch.ports, unit=st.name)
        event(core.logger, "Agent subprocess started", deploymentId=did, agentAppId=agent,
              pid=st.main_pid, ports=launch.ports)

    def _roll_back(self, did: str, previous: Deployment) -> None:
        store = self.core.store
        try:
            pipeline.start(self.core, pipeline.relaunch(self.core, previous))
            store.add_event(did, previous.agent_app_id, "Rolled back",
                            previous=previous.deployment_id)
            store.add_event(previous.deployment_id, previous.agent_app_id,
                            "Restarted after a failed replacement", failed=did)
        except ParError as exc:
            store.fail(previous.deployment_id, exc.code,
                       f"could not restart after failed replacement {did}: {exc.message}")

    def _fail(self, deployment_id: str, exc: ParError) -> None:
        store = self.core.store
        d = store.find(deployment_id)
        if d is None:
            return
        store.fail(deployment_id, exc.code, exc.message, exc.field)
        event(self.core.logger, "Deployment failed", logging.WARNING, deploymentId=deployment_id,
              agentAppId=d.agent_app_id, code=exc.code, message=exc.message)


def _refuse_overlap(store: Store, req: DeployRequest) -> None:
    """Refuse ids that would name two agents: a deploymentId that is another agent's
    agentAppId, or an agentAppId that is another agent's deploymentId (409
    `ambiguous_id`).  `parctl stop <id>` would otherwise have to guess (attack 20.12);
    records from before this check are refused at lookup instead (actions.resolve)."""
    if req.deployment_id != req.agent_app_id and store.deployments(agent_app_id=req.deployment_id):
        raise ParError("ambiguous_id",
                       f"deploymentId {req.deployment_id!r} is the agentAppId of another "
                       "agent; choose a deploymentId no agent is named", "deploymentId", 409)
    other = store.find(req.agent_app_id)
    if other is not None and other.agent_app_id != req.agent_app_id:
        raise ParError("ambiguous_id",
                       f"agentAppId {req.agent_app_id!r} is deployment {other.deployment_id} "
                       f"of agent {other.agent_app_id}; choose another agentAppId",
                       "agentAppId", 409)


def disk_full(exc: OSError, state_dir: Path) -> ParError | None:
    """ENOSPC/EDQUOT from pard's own writes (download, extraction, its files) as the
    `disk_full` failure, so the deploy's files are removed like on any refusal; None
    for any other OSError (a bug: it stays an internal error).  pard runs as root, so
    on ext4 it reaches this only once the root reserve is gone too."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return ParError("disk_full", f"No space left on device{where} while deploying: free "
                    f"space (or inodes) on the filesystem of {state_dir}", None, 507)
