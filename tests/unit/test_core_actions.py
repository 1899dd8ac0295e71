"""par.actions on a FakeSystemd: stop, start, restart, remove and purge."""

from __future__ import annotations

import shutil

import pytest

from par import layout, pipeline
from par.actions import resolve
from par.agent_unit import env_file_path
from par.errors import ParError
from par.store import Deployment
from tests.unit.core_env import CoreEnv

AGENT = "agent-a"


def test_stop_then_start(core_env: CoreEnv) -> None:
    e = core_env
    d = e.deployed()
    stopped = e.actions.act(AGENT, "stop")
    assert (stopped.status, stopped.desired_state, stopped.current) == ("stopped", "stopped",
                                                                        True)
    assert e.fake.ops() == [("stop", "d1")] and e.fake.unit(AGENT) is None
    assert e.events("d1")[-1] == "Agent stop"

    e.fake.clear_calls()
    started = e.actions.act("d1", "start")
    assert (started.status, started.desired_state, started.error) == ("healthy", "running", None)
    assert e.fake.ops() == [("start", "d1")]
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.active_state == "active"
    assert unit.spec.environment["REST_PORT"] == str(d.ports["rest"])


def test_start_of_a_running_agent_starts_nothing(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    pid = e.fake.status("par-agent@agent-a.service").main_pid
    assert e.actions.act(AGENT, "start").status == "healthy"
    assert e.fake.ops() == []
    assert e.fake.status("par-agent@agent-a.service").main_pid == pid


def test_restart_stops_then_starts(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    pid = e.fake.status("par-agent@agent-a.service").main_pid
    assert e.actions.act(AGENT, "restart").status == "healthy"
    # the same unit behind the same socket, its start limit reset (as a new unit's is)
    assert e.fake.ops() == [("stop", "d1"), ("reset_failed", "d1"), ("start", "d1")]
    st = e.fake.status("par-agent@agent-a.service")
    assert st.active_state == "active" and st.main_pid != pid


def test_many_restarts_in_a_row_are_not_refused_by_the_start_limit(core_env: CoreEnv) -> None:
    """Found by test_bounded_inputs: the loaded unit behind a kept socket counts every
    start towards StartLimitBurst, so the sixth restart within a minute failed."""
    e = core_env
    e.deployed()
    for _ in range(e.cfg.agents.start_limit_burst + 2):
        assert e.actions.act(AGENT, "restart").status == "healthy"


def test_restart_that_fails_marks_the_deployment_failed(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    e.fake.script(AGENT, ("exit", 2))
    with pytest.raises(ParError) as exc:
        e.actions.act(AGENT, "restart")
    assert exc.value.code == "agent_start_failed"
    d = e.store.get("d1")
    assert (d.status, d.error_code, d.current) == ("failed", "agent_start_failed", True)
    assert e.fake.unit(AGENT) is None
    # a later start brings it back and clears the error
    assert e.actions.act(AGENT, "start").error is None


def test_restart_without_the_extracted_package_leaves_the_agent_alone(core_env: CoreEnv) -> None:
    e = core_env
    d = e.deployed()
    shutil.rmtree(layout.extraction(e.cfg, AGENT, "1.0.0", d.package_digest))
    pid = e.fake.status("par-agent@agent-a.service").main_pid
    with pytest.raises(ParError) as exc:
        e.actions.act(AGENT, "restart")
    assert exc.value.code == "package_missing"
    assert e.fake.ops() == []
    st = e.fake.status("par-agent@agent-a.service")
    assert (st.active_state, st.main_pid) == ("active", pid)
    after = e.store.get("d1")
    assert (after.status, after.error) == ("healthy", None)


def test_start_without_the_extracted_package_fails(core_env: CoreEnv) -> None:
    e = core_env
    d = e.deployed()
    e.actions.act(AGENT, "stop")
    shutil.rmtree(layout.extraction(e.cfg, AGENT, "1.0.0", d.package_digest))
    with pytest.raises(ParError) as exc:
        e.actions.act(AGENT, "start")
    assert exc.value.code == "package_missing"
    assert (e.store.get("d1").status, e.store.get("d1").error_code) == ("failed",
                                                                        "package_missing")


def test_actions_need_the_current_deployment(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed("d1", "1.0.0")
    e.deployed("d2", "2.0.0")
    for action in ("stop", "start", "restart"):
        with pytest.raises(ParError) as exc:
            e.actions.act("d1", action)
        assert (exc.value.code, exc.value.status) == ("not_current", 409)
    with pytest.raises(ParError) as exc:
        e.actions.act("d2", "reload")
    assert exc.value.code == "bad_action"
    with pytest.raises(ParError) as exc:
        e.actions.act("nobody", "stop")
    assert exc.value.code == "not_found"
    assert e.fake.ops() == []


def test_resolve(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed("d1", "1.0.0")
    e.deployed("d2", "2.0.0")
    assert resolve(e.store, "d1").deployment_id == "d1"
    assert resolve(e.store, AGENT).deployment_id == "d2"  # the current one
    e.actions.remove("d2", purge=False)
    e.deploy("d3", e.package("bad", manifest_text="nope: 1\n"))
    assert resolve(e.store, AGENT).deployment_id == "d3"  # no current: the latest


def test_remove_stops_and_forgets_but_keeps_files(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    files = e.files()
    out = e.actions.remove(AGENT, purge=False)
    assert out == {"deleted": "d1", "agentAppId": AGENT, "purged": [], "alreadyRemoved": False}
    d = e.store.get("d1")
    assert (d.status, d.desired_state, d.current) == ("removed", "removed", False)
    events = len(e.store.events("d1"))
    # again: nothing changes, and it says so
    assert e.actions.remove(AGENT, purge=False)["alreadyRemoved"] is True
    assert len(e.store.events("d1")) == events
    assert e.store.current(AGENT) is None
    assert e.fake.ops() == [("stop", "d1")] and e.fake.unit(AGENT) is None
    assert not env_file_path(e.cfg, AGENT).exists()
    assert e.files() == files


def test_remove_purge_deletes_files_no_other_deployment_uses(core_env: CoreEnv) -> None:
    e = core_env
    d1 = e.deployed("d1", "1.0.0")
    d2 = e.deployed("d2", "2.0.0")  # same requirements: same venv
    assert d1.venv == d2.venv and d1.package_digest != d2.package_digest
    v1_package, v1_extraction = layout.deployment_files(e.cfg, AGENT, "1.0.0",
                                                        d1.package_digest)
    out = e.actions.remove("d1", purge=True)
    assert sorted(out["purged"]) == sorted([str(v1_package), str(v1_extraction)])
    assert e.fake.ops() == []  # d1 was not running
    venv = layout.venv(e.cfg, d2.venv or "")
    assert venv.is_dir() and not v1_package.exists() and not v1_extraction.exists()

    out = e.actions.remove("d2", purge=True)
    assert len(out["purged"]) == 3 and str(venv) in out["purged"]
    assert e.leftovers() == []
    assert e.fake.ops() == [("stop", "d2")]


def test_remove_purge_keeps_files_another_deployment_uses(core_env: CoreEnv) -> None:
    e = core_env
    pkg = e.package("same")
    e.deploy("d1", pkg)
    e.deploy("d2", pkg)  # the same bytes: the same package, extraction and venv
    files = e.files()
    assert len(files) == 3
    assert e.actions.remove("d1", purge=True)["purged"] == []
    assert e.files() == files
    assert e.store.get("d2").current and e.fake.unit(AGENT) is not None


def test_resolve_refuses_an_id_that_names_two_agents(core_env: CoreEnv) -> None:
    """Attack 12: a deploymentId equal to another agent's agentAppId stopped the wrong one."""
    e = core_env
    e.deployed("d1")
    # agent "victim" is deployed with deploymentId "agent-x"; an agent "agent-x" exists too,
    # recorded before deploys refused the overlap (an old store)
    e.deploy("agent-x", e.package("p-v"), agent="victim")
    e.store.insert_deployment(Deployment(deployment_id="x-1", agent_app_id="agent-x",
                                         version="1.0.0", package_url="file:///x.apkg"))
    with pytest.raises(ParError) as err:
        resolve(e.store, "agent-x")
    assert err.value.code == "ambiguous_id" and err.value.status == 409
    assert "victim" in err.value.message and "agent-x" in err.value.message
    assert resolve(e.store, "x-1").agent_app_id == "agent-x"
    assert resolve(e.store, "victim").deployment_id == "agent-x"


@pytest.mark.parametrize(("did", "agent", "field"), [
    ("victim", "agent-x", "deploymentId"),  # a deploymentId that is another agent's name
    ("x-2", "d1", "agentAppId"),  # an agentAppId that is another agent's deploymentId
])
def test_deploys_that_would_name_two_agents_are_refused(
        core_env: CoreEnv, did: str, agent: str, field: str) -> None:
    e = core_env
    assert e.deploy("d1", e.package("p"), agent="victim").status == "healthy"
    with pytest.raises(ParError) as err:
        e.submit(did, e.package("p-x"), agent)
    assert (err.value.code, err.value.status, err.value.field) == ("ambiguous_id", 409, field)
    assert [d.deployment_id for d in e.store.deployments()] == ["d1"]
    # an agent's deploymentId may be its own agentAppId
    assert e.deploy("victim", e.package("p-v"), agent="victim").status == "healthy"


def test_env_set_replaces_the_deployment_with_the_same_package_and_venv(
        core_env: CoreEnv) -> None:
    e = core_env
    d1 = e.deploy("d1", e.package("p"), env={"KEEP": "k", "OLD": "o"})
    assert d1.status == "healthy"
    status, answer = e.actions.set_env(AGENT, {"NEW": "n", "KEEP": "k2"}, ["OLD"], True)
    assert status == 202
    new_id = answer["deploymentId"]
    assert new_id.startswith(f"{AGENT}-env-")
    d2 = e.wait(new_id)
    assert (d2.status, d2.current, d2.env) == ("healthy", True, {"KEEP": "k2", "NEW": "n"})
    assert (d2.venv, d2.package_digest, d2.ports) == (d1.venv, d1.package_digest, d1.ports)
    assert e.store.get("d1").status == "stopped"
    assert "k2" not in str(answer)  # values never come back
    written = env_file_path(e.cfg, AGENT).read_text()
    assert 'NEW="n"' in written and "OLD" not in written


def test_env_set_without_restart_changes_the_next_start_only(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    pid = e.fake.status("par-agent@agent-a.service").main_pid
    status, answer = e.actions.set_env("d1", {"LATER": "x"}, [], False)
    assert status == 200 and answer["restart"] == "pending"
    assert answer["deployment"]["request"]["env"] == {"LATER": "***"}
    assert e.fake.ops() == [] and e.fake.status("par-agent@agent-a.service").main_pid == pid
    assert 'LATER="x"' in env_file_path(e.cfg, AGENT).read_text()  # read at the next start
    assert e.store.get("d1").env == {"LATER": "x"}


def test_env_set_refuses_what_a_deploy_refuses(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    for values, field in (({"LD_PRELOAD": "/x.so"}, "env.LD_PRELOAD"), ({"1BAD": "x"}, "env")):
        with pytest.raises(ParError) as info:
            e.actions.set_env(AGENT, values, [], True)
        assert info.value.field == field, info.value
    assert [d.deployment_id for d in e.store.deployments(agent_app_id=AGENT)] == ["d1"]


def test_an_action_waiting_for_the_lock_acts_on_the_record_as_it_is_then(
        core_env: CoreEnv) -> None:
    """A restart that resolved the current deployment, then waited while a removal ran,
    must not start the removed deployment's unit again (found by the load table's races)."""
    import threading
    import time

    e = core_env
    e.deployed()
    outcome: list[object] = []
    with e.locks.of(AGENT):  # the removal holds the lock ...
        waiter = threading.Thread(target=lambda: outcome.append(_try(e, "restart")))
        waiter.start()
        time.sleep(0.3)  # the restart has resolved d1 (current then) and waits for the lock
        e.store.clear_current(AGENT)  # ... and does its work meanwhile
        e.store.update("d1", desired_state="removed", status="removed")
        pipeline.stop(e.core, AGENT, 1, release=True)
    waiter.join(10)
    assert outcome == ["not_current"]
    assert e.fake.unit(AGENT) is None  # no unit that no deployment owns


def _try(e: CoreEnv, name: str) -> object:
    try:
        e.actions.act(AGENT, name)
        return "acted"
    except ParError as err:
        return err.code
