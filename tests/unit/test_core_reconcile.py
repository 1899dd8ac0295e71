"""par.reconcile after each kind of pard crash or reboot, on a FakeSystemd.

A "pard restart" keeps the store and systemd (the fake) and starts afresh:
new locks, a new Deployer, reconcile.  Interrupted deploys are staged with the
pipeline's own steps, in the order and with the store writes the Deployer does.
"""

from __future__ import annotations

import dataclasses

from par import agent_sockets, loopback, pipeline
from par.agent_unit import AgentLaunch, unit_spec
from par.store import Deployment
from tests.unit.core_env import CoreEnv

AGENT = "agent-a"
UNIT = "par-agent@agent-a.service"


def interrupted(e: CoreEnv, did: str, phase: str, version: str = "2.0.0") -> AgentLaunch | None:
    """A deploy of AGENT that pard was running when it died, in `phase` (pending,
    downloading, loading, starting): its store record and files as the Deployer leaves
    them; for `starting`, the launch it was about to start (the previous deployment
    already stopped, as `Deployer._replace` does first)."""
    store, core = e.store, e.core
    req = e.request(did, e.package(f"p-{version}", version), version=version)
    store.insert_deployment(Deployment(
        deployment_id=did, agent_app_id=AGENT, version=version, package_url=req.package_url,
        org_id=req.org_id, request=dict(req.raw)))
    if phase == "pending":
        return None
    store.start_phase(did, "downloading", "downloading")
    fetched = pipeline.fetch(core, req, [])
    store.update(did, package_digest=fetched.sha256)
    if phase == "downloading":
        return None
    store.end_phase(did, "downloading")
    store.start_phase(did, "loading", "loading")
    pkg = pipeline.load(core, req, fetched, [])
    venv = pipeline.venv(core, req, pkg, [])
    store.update(did, venv=venv.name)
    if phase == "loading":
        return None
    store.end_phase(did, "loading")
    store.start_phase(did, "starting", "starting")
    previous = store.current(AGENT)
    ports = pipeline.allocate_ports(core, req, pkg.manifest,
                                    inherit=dict(previous.ports) if previous else {})
    store.update(did, ports=ports, unit=UNIT)
    if previous is not None:
        pipeline.stop_deployment(core, previous)
    return pipeline.launch(core, req, pkg, venv.path, venv.layer, ports)


# ---------------------------------------------------------------- current deployments


def test_active_unit_is_adopted_without_a_restart(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed(clear_calls=False)
    pid = e.fake.status(UNIT).main_pid
    report = e.restart_pard()
    assert (report.adopted, report.restarted, report.failed, report.interrupted,
            report.unknown_units) == ([AGENT], [], [], [], [])
    assert e.fake.ops() == []
    assert e.fake.status(UNIT).main_pid == pid
    assert e.store.get("d1").status == "healthy"


def test_unit_gone_after_a_reboot_is_recreated_on_its_ports(core_env: CoreEnv) -> None:
    e = core_env
    d = e.deployed(clear_calls=False)
    e.fake.vanish()
    report = e.restart_pard()
    assert (report.adopted, report.restarted) == ([], [AGENT])
    assert e.fake.ops() == [("start", "d1")]
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.active_state == "active"
    assert unit.spec.environment["REST_PORT"] == str(d.ports["rest"])
    assert unit.spec.environment["DEPLOYMENT_ID"] == "d1"
    after = e.store.get("d1")
    assert (after.status, after.current, after.ports) == ("healthy", True, d.ports)
    assert "Agent re-created by reconcile" in e.events("d1")


def test_failed_unit_is_reset_and_restarted(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed(clear_calls=False)
    assert e.fake.crash(AGENT, ("exit", 3)).active_state == "failed"
    report = e.restart_pard()
    assert report.restarted == [AGENT]
    # reconcile's reset, then the one before the start behind the kept socket
    assert e.fake.ops() == [("reset_failed", "d1"), ("reset_failed", "d1"), ("start", "d1")]
    assert e.fake.status(UNIT).active_state == "active"


def test_unit_that_cannot_start_again_fails_with_the_reason(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed(clear_calls=False)
    e.fake.vanish()
    e.fake.script(AGENT, ("exit", 3), says=("ImportError: gone",))
    report = e.restart_pard()
    assert report.failed == [AGENT] and report.restarted == []
    d = e.store.get("d1")
    assert (d.status, d.current, d.error_code) == ("failed", True, "agent_start_failed")
    assert d.error_message is not None
    assert d.error_message.startswith("could not start after daemon restart: ")
    assert "ImportError: gone" in d.error_message
    assert e.fake.unit(AGENT) is None


def test_stopped_deployment_stays_stopped(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed(clear_calls=False)
    e.actions.act(AGENT, "stop")
    report = e.restart_pard()
    assert (report.adopted, report.restarted, report.unknown_units) == ([], [], [])
    assert e.fake.ops() == [] and e.store.get("d1").status == "stopped"


def test_unknown_units_are_reported_never_stopped(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed(clear_calls=False)
    stray = unit_spec(e.cfg, AgentLaunch(
        agent_id="stray", deployment_id="x1", org_id="o", name="n", version="1",
        package_root=e.tmp, venv_path=e.tmp, ports={}, entrypoint="m:f", rest_entry=None,
        a2a_service=None, ui_path=None, env={}))
    e.fake.run_unit(stray)
    report = e.restart_pard()
    assert report.unknown_units == ["par-agent@stray.service"] and report.adopted == [AGENT]
    assert e.fake.ops() == []
    assert e.fake.status("par-agent@stray.service").active_state == "active"


# ---------------------------------------------------------------- interrupted deploys


def test_deploy_interrupted_before_starting_fails(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed("d1", "1.0.0", clear_calls=False)
    for did, phase in (("p1", "pending"), ("p2", "downloading"), ("p3", "loading")):
        assert interrupted(e, did, phase) is None
    report = e.restart_pard()
    assert report.interrupted == ["p1", "p2", "p3"] and report.adopted == [AGENT]
    for did, phase in (("p1", "pending"), ("p2", "downloading"), ("p3", "loading")):
        d = e.store.get(did)
        assert (d.status, d.error_code, d.current) == ("failed", "interrupted", False)
        assert d.error_message == f"pard stopped during '{phase}'; deploy again to retry"
        assert all(p["end"] is not None for p in d.phases.values())
    assert e.fake.ops() == []  # d1's unit untouched
    assert e.store.get("d1").current


def test_deploy_interrupted_after_its_unit_came_up_is_finished(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed("d1", "1.0.0", clear_calls=False)
    launch = interrupted(e, "d2", "starting")
    assert launch is not None
    pipeline.start(e.core, launch)  # READY; pard died before recording it
    report = e.restart_pard()
    assert report.adopted == [AGENT] and report.interrupted == []
    assert e.fake.ops() == []  # neither stopped nor started again
    d2 = e.store.get("d2")
    assert (d2.status, d2.current, d2.error) == ("healthy", True, None)
    assert d2.phases["starting"]["end"] is not None
    d1 = e.store.get("d1")
    assert (d1.status, d1.current) == ("stopped", False)  # as after a finished deploy
    assert "Deploy finished after daemon restart" in e.events("d2")


def test_first_deploy_interrupted_after_its_unit_came_up_is_finished(core_env: CoreEnv) -> None:
    e = core_env
    launch = interrupted(e, "d1", "starting", "1.0.0")
    assert launch is not None
    pipeline.start(e.core, launch)
    report = e.restart_pard()
    assert report.adopted == [AGENT] and report.unknown_units == []
    assert (e.store.get("d1").status, e.store.get("d1").current) == ("healthy", True)


def test_half_started_deploy_is_stopped_and_the_previous_brought_back(
        core_env: CoreEnv) -> None:
    e = core_env
    d1 = e.deployed("d1", "1.0.0", clear_calls=False)
    launch = interrupted(e, "d2", "starting")
    assert launch is not None
    _start_unit(e, launch)  # still activating when pard died
    report = e.restart_pard()
    assert report.interrupted == ["d2"] and report.restarted == [AGENT]
    # d2's stopped unit stays loaded (its socket pins it) until d1 replaces both
    assert e.fake.ops() == [("stop", "d2"), ("reset_failed", "d2"), ("start", "d1")]
    d2 = e.store.get("d2")
    assert (d2.status, d2.error_code, d2.current) == ("failed", "interrupted", False)
    back = e.store.get("d1")
    assert (back.status, back.current, back.ports) == ("healthy", True, d1.ports)
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.spec.environment["DEPLOYMENT_ID"] == "d1"


def test_deploy_whose_new_unit_failed_is_cleaned_up(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed("d1", "1.0.0", clear_calls=False)
    launch = interrupted(e, "d2", "starting")
    assert launch is not None
    e.fake.script(AGENT, ("exit", 3))
    _start_unit(e, launch)
    assert e.fake.settle(AGENT).active_state == "failed"
    report = e.restart_pard()
    assert report.interrupted == ["d2"] and report.restarted == [AGENT]
    assert e.fake.ops() == [("stop", "d2"), ("reset_failed", "d2"), ("reset_failed", "d2"),
                            ("start", "d1")]
    assert e.store.get("d1").status == "healthy"


def test_deploy_interrupted_before_the_previous_was_stopped(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed("d1", "1.0.0", clear_calls=False)
    e.store.insert_deployment(Deployment(deployment_id="d2", agent_app_id=AGENT,
                                         version="2.0.0", package_url="file:///x"))
    e.store.start_phase("d2", "starting", "starting")
    report = e.restart_pard()  # the unit runs d1: d2 is not finished with it
    assert report.interrupted == ["d2"] and report.adopted == [AGENT]
    assert e.fake.ops() == []
    assert e.store.get("d1").current and e.store.get("d2").status == "failed"


def test_interrupted_stop_is_recorded_stopped(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed(clear_calls=False)
    e.store.update("d1", desired_state="stopped", status="stopping")
    e.core.systemd.stop(UNIT, 40)  # the stop job systemd had queued finishes anyway
    report = e.restart_pard()
    assert (report.adopted, report.restarted, report.interrupted) == ([], [], [])
    d = e.store.get("d1")
    assert (d.status, d.desired_state, d.current) == ("stopped", "stopped", True)
    assert e.fake.ops() == []


def test_agent_moves_to_its_own_address_when_isolation_is_turned_on(
        core_env: CoreEnv) -> None:
    e = core_env
    d = e.deployed(clear_calls=False)
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.spec.environment["PAR_BIND_ADDRESS"] == "127.0.0.1"
    isolated = dataclasses.replace(e.cfg, agents=dataclasses.replace(
        e.cfg.agents, isolate_loopback=True))
    e.core = dataclasses.replace(e.core, cfg=isolated)
    report = e.restart_pard()
    assert (report.adopted, report.restarted) == ([], [AGENT])
    assert [op for op in e.fake.ops() if op[0] in ("stop", "start")] == [("stop", "d1"),
                                                                          ("start", "d1")]
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.active_state == "active"
    assert unit.spec.environment["PAR_BIND_ADDRESS"] == loopback.agent_address(d.ports["rest"])
    assert e.store.get("d1").status == "healthy"
    # the next pard start finds it where the configuration says: adopted as it is
    report = e.restart_pard()
    assert (report.adopted, report.restarted) == ([AGENT], [])


def _start_unit(e: CoreEnv, launch: AgentLaunch) -> None:
    """What an earlier pard did to start `launch`'s unit (its sockets replaced), up to
    the wait for READY it died in."""
    spec = unit_spec(e.cfg, launch)
    agent_sockets.start(e.fake, spec, agent_sockets.held_sockets(e.cfg, AGENT, launch.ports,
                                                                 spec), e.core.parked)
