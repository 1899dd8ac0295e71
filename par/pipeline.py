"""The deploy pipeline as named steps: fetch → load → venv → start; stop; relaunch.

Each step takes typed inputs and returns a typed result, or raises a
`ParError` with a stable code; none of them knows about threads, queues or
phases (par.deployer runs them and records the phases, par.actions and
par.reconcile reuse `start`, `stop` and `relaunch`).  Steps that put a new
file or folder on disk append it to `created`, so a failed deploy can delete
what it made and nothing else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from par import agent_env, agent_sockets, agent_state, layout, loopback
from par import ports as portalloc
from par.agent_unit import (
    AgentLaunch,
    effective_stop_timeout,
    env_file_path,
    unit_spec,
    write_env_file,
    write_host_spec,
)
from par.config import Config
from par.deploy_request import DeployRequest, from_stored
from par.errors import ParError
from par.extract import compile_sources, extract_package
from par.fetch import FetchResult, fetch_package
from par.file_caps import REQUIREMENTS_NAME, caps, check_on_disk
from par.fsutil import atomic_write_text
from par.journal import failure_reason
from par.log import event
from par.manifest import Manifest, load_manifest, read_dotenv
from par.requirements import Policy, Requirements, effective_requirements
from par.store import Deployment, Store
from par.units import Systemd, UnitStatus, unit_name
from par.venvs import VenvManager, VenvResult, venv_name

# Written last into a finished extraction: these bytes, checked and complete.
EXTRACT_MARKER = ".par-package.sha256"
# Beyond a unit's own timeout: how long pard waits on systemd's job before giving up.
JOB_GRACE_S = 10.0


@dataclass(frozen=True)
class Core:
    """What the steps work with; the daemon builds one and hands it to its users."""

    cfg: Config
    store: Store
    systemd: Systemd
    venvs: VenvManager
    logger: logging.Logger
    host_dir: Path  # the compiled agent host units run (par.host_files)
    # ports pard holds for agents between two socket units (par.agent_sockets)
    parked: agent_sockets.ParkedPorts = field(default_factory=agent_sockets.ParkedPorts)


@dataclass(frozen=True)
class LoadedPackage:
    """An extracted package with its agent.yaml, .env and requirements, parsed once."""

    root: Path
    manifest: Manifest
    dotenv: dict[str, str]
    requirements: Requirements


# ---------------------------------------------------------------- fetch


def fetch(core: Core, req: DeployRequest, created: list[Path]) -> FetchResult:
    """The package's bytes in `packages/`, downloaded unless a kept copy is known good."""
    fetched = fetch_package(core.cfg, req.agent_app_id, req.version, req.package_url,
                            req.package_sha256, req.force_refresh, core.logger)
    if fetched.created:
        created.append(fetched.path)
    return fetched


# ---------------------------------------------------------------- load


def read_package(root: Path, cfg: Config, logger: logging.Logger | None) -> LoadedPackage:
    """Parse the package at `root`: agent.yaml, .env, the effective requirements.

    Each file is refused (`file_too_large`) over its cap in `limits` before it is read."""
    manifest = load_manifest(root, logger, cfg.limits)
    dotenv = read_dotenv(root, cfg.limits)
    # refused keys fail the deploy here, before the package lands in extracted/
    agent_env.check(manifest.environment, agent_env.SOURCE_MANIFEST)
    agent_env.check(dotenv, agent_env.SOURCE_DOTENV)
    check_on_disk(root / REQUIREMENTS_NAME, caps(cfg.limits)[REQUIREMENTS_NAME])
    reqs = effective_requirements(root, manifest, Policy(
        allow_index_options=cfg.installer.allow_index_options,
        only_binary=cfg.installer.only_binary))
    return LoadedPackage(root, manifest, dotenv, reqs)


def load(core: Core, req: DeployRequest, fetched: FetchResult,
         created: list[Path]) -> LoadedPackage:
    """Extract the package unless these very bytes are extracted already, and parse it.

    A package whose manifest, .env or requirements are refused never lands in
    `extracted/`: they are parsed in the temporary folder, before the rename.
    """
    target = layout.extraction(core.cfg, req.agent_app_id, req.version, fetched.sha256)
    try:
        if (target / EXTRACT_MARKER).read_text().strip() == fetched.sha256:
            return read_package(target, core.cfg, core.logger)
    except OSError:
        pass
    if not target.exists():
        created.append(target)
    parsed: list[LoadedPackage] = []

    def check(tmp_root: Path) -> None:
        parsed.append(read_package(tmp_root, core.cfg, core.logger))
        compile_sources(tmp_root)
        atomic_write_text(tmp_root / EXTRACT_MARKER, fetched.sha256 + "\n")

    root = extract_package(core.cfg, req.agent_app_id, req.version, fetched.path, check=check,
                           sha256=fetched.sha256)
    # what was parsed holds no path of the temporary folder but its root
    pkg = parsed[0]
    return LoadedPackage(root, pkg.manifest, pkg.dotenv, pkg.requirements)


# ---------------------------------------------------------------- venv


def venvs_in_use(store: Store, exclude: str | None = None) -> set[str]:
    """Venvs that a current or in-flight deployment (but `exclude`) refers to."""
    return {x.venv for x in store.currents() + store.in_flight()
            if x.venv and x.deployment_id != exclude}


def venv(core: Core, req: DeployRequest, pkg: LoadedPackage, created: list[Path]) -> VenvResult:
    """A valid venv for the package's requirements: reused or built."""
    reqs = pkg.requirements
    name = venv_name(req.agent_app_id, pkg.manifest.package_id, reqs.sha256)
    had_venv = layout.venv(core.cfg, name).exists()
    result = core.venvs.ensure(req.agent_app_id, pkg.manifest.package_id, reqs.text,
                               reqs.sha256, venvs_in_use(core.store))
    if not result.reused and not had_venv:
        created.append(result.path)
    return result


# ---------------------------------------------------------------- start


def ports_taken(store: Store, exclude_agent: str) -> set[int]:
    """Ports that current or in-flight deployments of other agents hold."""
    return {port for x in store.currents() + store.in_flight()
            if x.agent_app_id != exclude_agent for port in x.ports.values()}


def allocate_ports(core: Core, req: DeployRequest, manifest: Manifest,
                   inherit: dict[str, int]) -> dict[str, int]:
    """A port per surface the manifest declares: requested, inherited, or free ones.

    The caller serializes allocations (two agents must not pick the same port)."""
    return portalloc.allocate(core.cfg.ports, requested=dict(req.ports),
                              taken=ports_taken(core.store, req.agent_app_id),
                              inherit=inherit, kinds=manifest.served)


def launch(core: Core, req: DeployRequest, pkg: LoadedPackage, venv_path: Path,
           layer: Path | None, ports: dict[str, int]) -> AgentLaunch:
    """What the unit of this deployment runs, with its environment merged."""
    m = pkg.manifest
    # the operator's values win over the package's; PAR's own variables over both
    merged = agent_env.merge(m.environment, pkg.dotenv, req.env)
    if merged.dropped:
        event(core.logger, "Environment keys left to PAR", logging.WARNING,
              deploymentId=req.deployment_id, keys=list(merged.dropped))
    env = merged.env
    return AgentLaunch(
        agent_id=req.agent_app_id, deployment_id=req.deployment_id, org_id=req.org_id,
        name=m.name, version=req.version, package_root=pkg.root, venv_path=venv_path,
        ports=dict(ports), entrypoint=m.entrypoint, rest_entry=m.rest_entry,
        a2a_service=m.a2a_service, ui_path=m.ui_path, env=env,
        memory_mb=req.memory_mb, cpu_units=req.cpu_units,
        stop_timeout_s=req.stop_timeout_s, host_dir=core.host_dir,
        layer_path=layer,
    )


def start(core: Core, launch: AgentLaunch, current: UnitStatus | None = None) -> UnitStatus:
    """Start the agent's unit behind its socket unit (par.agent_sockets) and wait for
    READY=1; on failure raise `agent_start_failed` with the reason, the service stopped
    (the socket stays: a rollback starts on the same ports; `release_if_idle` after).

    `current`: the unit's status if the caller just read it."""
    # read at each start: the resolvers an isolated agent keeps follow /etc/resolv.conf
    resolvers = loopback.read_resolvers()[0] if core.cfg.agents.isolate_loopback else []
    spec = unit_spec(core.cfg, launch, resolvers)
    held = agent_sockets.held_sockets(core.cfg, launch.agent_id, launch.ports, spec)
    current_org = getattr(core.store.current(launch.agent_id), "org_id", launch.org_id)
    if current_org == launch.org_id:  # a pre-0.x state folder is that org's, no other's
        agent_state.migrate_legacy(launch.agent_id, launch.org_id)
    write_host_spec(launch)  # what the host serves (unchanged ones are not rewritten)
    write_env_file(core.cfg, launch)  # its secrets, read by PID 1 at every (re)start
    started = time.time()
    if current is not None and current.active_state in ("active", "activating", "reloading",
                                                        "deactivating"):
        raise ParError("unit_exists", f"{spec.name} is already {current.active_state}",
                       None, 409)
    agent_sockets.start(core.systemd, spec, held, core.parked, core.logger)
    st = core.systemd.wait_active(spec.name, timeout=spec.timeout_start_s + JOB_GRACE_S)
    if st.active_state == "active":
        return st
    reason = failure_reason(st, core.cfg.agents.boot_timeout_s, since=started)
    # the ports stay held, but no caller's connection may start this version again
    core.parked.park(core.systemd, launch.agent_id, core.logger, held.addresses)
    stop(core, launch.agent_id, 5)
    core.systemd.reset_failed(spec.name)
    env_file_path(core.cfg, launch.agent_id).unlink(missing_ok=True)  # a rollback rewrites it
    raise ParError("agent_start_failed", reason, None, 500)


# ---------------------------------------------------------------- stop


def stop(core: Core, agent: str, timeout_s: float, current: UnitStatus | None = None,
         release: bool = False, park: bool = False) -> UnitStatus:
    """Stop the agent's unit (SIGTERM, SIGKILL after `timeout_s`) and forget a failed
    state; its status afterwards.

    The agent's socket unit keeps the ports (a restart of the same deployment follows),
    unless `park` (another deployment starts next: pard holds the ports, the socket goes)
    or `release` (the ports go).  Either way the socket goes first, so no connection
    starts the service again (par.agent_sockets)."""
    name = unit_name(agent)
    if release:
        agent_sockets.release(core.systemd, agent, core.parked)
    elif park:
        core.parked.park(core.systemd, agent, core.logger)
    st = core.systemd.stop(name, wait_s=timeout_s + JOB_GRACE_S, current=current)
    if st.exists and st.active_state == "failed":
        core.systemd.reset_failed(name)
        st = core.systemd.status(name)
    return st


def stop_deployment(core: Core, d: Deployment, current: UnitStatus | None = None,
                    release: bool = False, park: bool = False) -> UnitStatus:
    """`stop` with the deployment's own stop timeout."""
    requested = from_stored(d.full_request()).stop_timeout_s
    return stop(core, d.agent_app_id, effective_stop_timeout(core.cfg, requested), current,
                release, park)


def release_if_idle(core: Core, agent: str) -> None:
    """Free the agent's ports when its service is not running (a start failed and
    nothing was rolled back): a held socket would start it on the next connection."""
    st = core.systemd.status(unit_name(agent))
    if st.active_state not in ("active", "activating", "reloading"):
        agent_sockets.release(core.systemd, agent, core.parked)


# ---------------------------------------------------------------- relaunch


def relaunch(core: Core, d: Deployment) -> AgentLaunch:
    """The launch of a stored deployment (restart, rollback, reconcile), from its files;
    a damaged or evicted venv is built again from the package's requirements."""
    req = from_stored(d.full_request())
    root = layout.extraction(core.cfg, d.agent_app_id, d.version, d.package_digest)
    if not (root / "agent.yaml").is_file():
        raise ParError("package_missing",
                       f"extracted package {root} is missing; deploy the agent again")
    pkg = read_package(root, core.cfg, core.logger)
    if not d.venv:
        raise ParError("venv_missing", f"deployment {d.deployment_id} has no venv recorded")
    venv_path = layout.venv(core.cfg, d.venv)
    layer = core.venvs.layer_path(venv_path)
    if core.venvs.validate(venv_path, pkg.requirements.sha256) is not None:
        built = core.venvs.ensure(d.agent_app_id, pkg.manifest.package_id, pkg.requirements.text,
                                  pkg.requirements.sha256, venvs_in_use(core.store))
        venv_path, layer = built.path, built.layer
    return launch(core, req, pkg, venv_path, layer, dict(d.ports))
