"""Bring systemd in line with the store when `pard` starts.

- A current deployment that should run and whose unit is active is adopted as
  it is: no restart, same MainPID.
- One whose unit is missing (transient units are gone after a reboot) or dead
  is started again on its stored ports; if that fails it is marked failed with
  the reason.
- A deploy that was in flight when the daemon died is failed cleanly
  ("interrupted"), unless its unit is up and it had reached `starting` with
  this deployment's id, in which case it is finished (made current).
- One whose unit listens on another address than the configuration now gives it
  (`agents.isolate_loopback` was turned on or off) is restarted on its new address.
- `par-agent@*` units the store knows nothing about are reported, never killed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from par import loopback, pipeline
from par.agent_locks import AgentLocks
from par.deployment import Deployment
from par.errors import ParError
from par.log import event
from par.pipeline import Core
from par.units import SOCKET_SUFFIX, Systemd, agent_id_of, unit_name


@dataclass
class ReconcileReport:
    """What reconcile did, for the log and the STATUS line."""

    adopted: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    unknown_units: list[str] = field(default_factory=list)


def reconcile(core: Core, locks: AgentLocks) -> ReconcileReport:
    """Adopt, re-create or fail every deployment according to the store (see module doc)."""
    store, systemd, logger = core.store, core.systemd, core.logger
    report = ReconcileReport()

    for d in store.in_flight():
        st = systemd.status(unit_name(d.agent_app_id))
        unit_env_matches = st.active_state == "active" and d.status == "starting" and \
            _unit_deployment(systemd, st.name) == d.deployment_id
        if unit_env_matches:
            # what Deployer._replace had left to do
            replaced = store.set_current(d.agent_app_id, d.deployment_id)
            if "starting" in d.phases:
                store.end_phase(d.deployment_id, "starting")
            store.update(d.deployment_id, status="healthy")
            if replaced is not None:
                store.update(replaced.deployment_id, status="stopped")
            store.add_event(d.deployment_id, d.agent_app_id, "Deploy finished after daemon restart")
            continue  # now current with its unit active: adopted below
        if d.status == "stopping":
            store.update(d.deployment_id, status="stopped")
            continue
        if d.status == "starting" and st.exists and \
                _unit_deployment(systemd, st.name) == d.deployment_id:
            # half-started: its unit must not linger; the previous deployment, if
            # any, is brought back below like any current one whose unit is gone
            pipeline.stop_deployment(core, d, current=st)
        store.fail(d.deployment_id, "interrupted",
                   f"pard stopped during '{d.status}'; deploy again to retry")
        store.add_event(d.deployment_id, d.agent_app_id, "Deployment interrupted", phase=d.status)
        report.interrupted.append(d.deployment_id)

    known = set()
    for d in store.currents():
        known.add(d.agent_app_id)
        if d.desired_state != "running":
            continue
        name = unit_name(d.agent_app_id)
        st = systemd.status(name)
        if st.active_state in ("active", "activating", "reloading") \
                and not _listens_elsewhere(core, d, st.name):
            report.adopted.append(d.agent_app_id)
            event(logger, "Adopted running agent", agentAppId=d.agent_app_id,
                  deploymentId=d.deployment_id, pid=st.main_pid)
            continue
        try:
            if st.active_state in ("active", "activating", "reloading"):
                # agents.isolate_loopback turned on or off: it must move to its address
                event(logger, "Restarting agent for loopback isolation",
                      agentAppId=d.agent_app_id, deploymentId=d.deployment_id)
                with locks.of(d.agent_app_id):
                    st = pipeline.stop_deployment(core, d, current=st)
            if st.exists:
                systemd.reset_failed(name)
            with locks.of(d.agent_app_id):
                st = pipeline.start(core, pipeline.relaunch(core, d))
            store.update(d.deployment_id, status="healthy", error_code=None,
                         error_message=None, error_field=None)
            store.add_event(d.deployment_id, d.agent_app_id, "Agent re-created by reconcile",
                            pid=st.main_pid)
            report.restarted.append(d.agent_app_id)
        except ParError as exc:
            pipeline.release_if_idle(core, d.agent_app_id)
            store.fail(d.deployment_id, exc.code,
                       f"could not start after daemon restart: {exc.message}")
            store.add_event(d.deployment_id, d.agent_app_id, "Reconcile failed", code=exc.code,
                            message=exc.message)
            report.failed.append(d.agent_app_id)

    for unit in systemd.list_agent_units():
        agent = agent_id_of(unit)
        if agent is not None and agent not in known:
            report.unknown_units.append(unit)
            event(logger, "Unknown agent unit", logging.WARNING, unit=unit,
                  hint="not started by this pard's store; left running")
    _release_idle_sockets(core, locks, report)
    event(logger, "Reconcile done", adopted=len(report.adopted), restarted=len(report.restarted),
          failed=len(report.failed), interrupted=len(report.interrupted),
          unknown=len(report.unknown_units))
    return report


def _listens_elsewhere(core: Core, d: Deployment, unit: str) -> bool:
    """Whether the unit listens on another address than the configuration gives the agent
    now (`agents.isolate_loopback` changed since it started; par.loopback)."""
    found = _unit_env(core.systemd, unit, "PAR_BIND_ADDRESS")
    return found is not None and found != loopback.bind_address(core.cfg, d.ports)


def _release_idle_sockets(core: Core, locks: AgentLocks, report: ReconcileReport) -> None:
    """Stop the socket units of known agents that should not run (stopped, failed, removed
    while pard was down): a held socket would start them on the next connection.  Those of
    agents the store does not know are reported, like their services."""
    running = {d.agent_app_id for d in core.store.currents() if d.desired_state == "running"}
    for unit in core.systemd.list_agent_units(SOCKET_SUFFIX):
        agent = agent_id_of(unit, SOCKET_SUFFIX)
        if agent is None or agent in running:
            continue
        if not core.store.deployments(agent_app_id=agent):
            report.unknown_units.append(unit)
            event(core.logger, "Unknown agent unit", logging.WARNING, unit=unit,
                  hint="not started by this pard's store; left running")
            continue
        with locks.of(agent):
            pipeline.release_if_idle(core, agent)
        event(core.logger, "Released idle agent sockets", agentAppId=agent, unit=unit)


def _unit_deployment(systemd: Systemd, unit: str) -> str | None:
    """The DEPLOYMENT_ID in a unit's environment (which deployment it runs)."""
    return _unit_env(systemd, unit, "DEPLOYMENT_ID")


def _unit_env(systemd: Systemd, unit: str, key: str) -> str | None:
    """The value of `key` in a unit's `Environment=` (None when it has none)."""
    try:
        env = systemd.property(unit, "Service", "Environment")
    except Exception:
        return None
    if not isinstance(env, (list, tuple)):
        return None
    for item in env:
        text = item.decode() if isinstance(item, bytes) else str(item)
        if text.startswith(f"{key}="):
            return text.split("=", 1)[1]
    return None
