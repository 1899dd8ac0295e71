"""Deploys through par.deployer and par.pipeline on a FakeSystemd: the happy path,
each step's failure, replacement, rollback and the per-agent queues."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from par import layout, pipeline
from par.agent_unit import EXIT_MEANING, env_file_path
from par.errors import ParError
from tests.unit.core_env import CoreEnv, poll

AGENT = "agent-a"
IMPORT_ERROR = "ModuleNotFoundError: No module named 'nope'"


def test_deploy_becomes_healthy_and_current(core_env: CoreEnv) -> None:
    e = core_env
    d = e.deploy("d1", e.package())
    assert (d.status, d.current, d.desired_state, d.error) == ("healthy", True, "running", None)
    assert e.store.current(AGENT) == d
    low, high = e.cfg.ports.rest
    assert list(d.ports) == ["rest"] and low <= d.ports["rest"] <= high
    assert d.unit == "par-agent@agent-a.service" and d.package_digest is not None
    assert d.venv is not None and d.venv.startswith("agent-a_") and not d.venv_reused
    assert all(p["end"] is not None for p in d.phases.values())
    assert list(d.phases) == ["downloading", "loading", "starting"]
    names = e.events("d1")
    assert [n for n in names if n[0].isupper()] == [
        "Package ready", "Venv built", "Agent subprocess started"]

    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.active_state == "active"
    venv = layout.venv(e.cfg, d.venv)
    assert unit.spec.argv == [str(venv / "bin" / "python"), "-m", "par_agent_host"]
    assert (venv / "bin" / "python").exists()
    root = layout.extraction(e.cfg, AGENT, "1.0.0", d.package_digest)
    assert unit.spec.working_directory == str(root) and (root / "agent.yaml").is_file()
    env = unit.spec.environment
    assert (env["DEPLOYMENT_ID"], env["AGENT_APP_ID"], env["REST_PORT"]) == (
        "d1", AGENT, str(d.ports["rest"]))
    assert env_file_path(e.cfg, AGENT).is_file()
    assert e.fake.ops() == [("start", "d1")]
    kept = layout.package_file(e.cfg, AGENT, "1.0.0", d.package_digest)
    assert e.files() == [f"packages/{kept.name}", f"extracted/{root.name}", f"venvs/{d.venv}"]


def test_operator_env_reaches_the_env_file_not_the_unit(core_env: CoreEnv) -> None:
    e = core_env
    e.deploy("d1", e.package(files={".env": "FROM_PKG=1\nTOKEN=pkg\n"}),
             env={"TOKEN": "operator"})
    unit = e.fake.unit(AGENT)
    assert unit is not None and "TOKEN" not in unit.spec.environment
    text = env_file_path(e.cfg, AGENT).read_text()
    assert 'TOKEN="operator"' in text and 'FROM_PKG="1"' in text


@pytest.mark.parametrize(("kind", "code", "field"), [
    ("manifest", "manifest_invalid", "name"),
    ("requirements", "requirements_editable", "requirements.txt"),
    ("missing", "package_not_found", "packageUrl"),
])
def test_refused_package_leaves_nothing(core_env: CoreEnv, kind: str, code: str,
                                        field: str) -> None:
    e = core_env
    if kind == "manifest":
        pkg = e.package(manifest_text="version: 1.0.0\nentrypoint: main:handler\n")
    elif kind == "requirements":
        pkg = e.package(requirements="requests==2.31.0\n-e ./vendored\n")
    else:
        pkg = e.tmp / "nowhere.apkg"
    d = e.deploy("d1", pkg)
    assert (d.status, d.error_code, d.error_field, d.current) == ("failed", code, field, False)
    assert e.fake.ops() == []
    assert e.leftovers() == []
    assert e.store.current(AGENT) is None


def test_agent_exiting_at_start_fails_with_the_reason(core_env: CoreEnv) -> None:
    e = core_env
    e.fake.script(AGENT, ("exit", 3), says=("Traceback (most recent call last):", IMPORT_ERROR))
    d = e.deploy("d1", e.package())
    assert (d.status, d.error_code, d.current) == ("failed", "agent_start_failed", False)
    assert d.error_message is not None
    assert d.error_message.startswith(f"{EXIT_MEANING[3]} (exit status 3): ")
    assert IMPORT_ERROR in d.error_message
    # no unit, no env file, no files left behind
    assert e.fake.unit(AGENT) is None and not e.fake.status(d.unit or "").exists
    assert not env_file_path(e.cfg, AGENT).exists()
    assert e.leftovers() == []
    assert e.fake.ops("start", "stop") == [("start", "d1"), ("stop", "d1")]


def test_start_timeout_fails(core_env: CoreEnv) -> None:
    e = core_env
    e.fake.script(AGENT, "timeout")
    d = e.deploy("d1", e.package())
    assert (d.status, d.error_code) == ("failed", "agent_start_failed")
    assert d.error_message is not None and d.error_message.startswith(
        f"the agent did not report ready within {e.cfg.agents.boot_timeout_s} s")
    assert e.fake.unit(AGENT) is None  # stopped (failed, result timeout) and reset
    # its socket went first (parked), so the reset unit is collected at once
    assert e.fake.ops() == [("start", "d1"), ("stop", "d1"), ("reset_failed", "d1"),
                            ("reset_failed", None)]
    assert e.fake.sockets() == {}  # nothing serves: the ports are released
    assert e.leftovers() == []


def test_same_request_again_is_idempotent(core_env: CoreEnv) -> None:
    e = core_env
    pkg = e.package()
    d = e.deploy("d1", pkg)
    assert e.deployer.submit(e.request("d1", pkg))[0] == 200
    with pytest.raises(ParError) as exc:
        e.deployer.submit(e.request("d1", pkg, version="9.9"))
    assert (exc.value.code, exc.value.status) == ("conflict", 409)
    assert e.store.get("d1") == d and e.fake.ops() == [("start", "d1")]


# ---------------------------------------------------------------- replace, roll back


def test_replace_stops_old_then_starts_new_on_its_ports(core_env: CoreEnv) -> None:
    e = core_env
    d1 = e.deploy("d1", e.package("v1", "1.0.0"))
    d2 = e.deploy("d2", e.package("v2", "2.0.0"), version="2.0.0")
    assert (d2.status, d2.current, d2.ports) == ("healthy", True, d1.ports)
    old = e.store.get("d1")
    assert (old.status, old.current) == ("stopped", False)
    assert e.fake.ops() == [("start", "d1"), ("stop", "d1"), ("start", "d2")]
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.spec.environment["DEPLOYMENT_ID"] == "d2"
    assert unit.spec.environment["REST_PORT"] == str(d1.ports["rest"])
    assert "Stopped previous deployment" in e.events("d2")
    assert d2.venv == d1.venv and d2.venv_reused  # same (no) requirements


def test_failed_replacement_rolls_back(core_env: CoreEnv) -> None:
    e = core_env
    d1 = e.deploy("d1", e.package("v1", "1.0.0"))
    v1_files = e.files()
    e.fake.script(AGENT, ("exit", 3), says=(IMPORT_ERROR,))
    d2 = e.deploy("d2", e.package("v2", "2.0.0", requirements="# none\n"), version="2.0.0")
    assert (d2.status, d2.error_code, d2.current) == ("failed", "agent_start_failed", False)
    assert d2.error_message is not None and IMPORT_ERROR in d2.error_message
    back = e.store.get("d1")
    assert (back.status, back.current, back.ports, back.error) == ("healthy", True, d1.ports,
                                                                   None)
    assert e.fake.ops("start", "stop") == [("start", "d1"), ("stop", "d1"), ("start", "d2"),
                                           ("stop", "d2"), ("start", "d1")]
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.active_state == "active"
    assert unit.spec.environment["DEPLOYMENT_ID"] == "d1"
    assert "Rolled back" in e.events("d2")
    assert "Restarted after a failed replacement" in e.events("d1")
    assert env_file_path(e.cfg, AGENT).is_file()  # rewritten for d1
    assert e.files() == v1_files  # d2's package, extraction and venv are gone


def test_failed_rollback_fails_the_previous_too(core_env: CoreEnv) -> None:
    e = core_env
    e.deploy("d1", e.package("v1", "1.0.0"))
    e.fake.script(AGENT, ("exit", 3), ("exit", 4))
    d2 = e.deploy("d2", e.package("v2", "2.0.0"), version="2.0.0")
    assert d2.error_code == "agent_start_failed"
    d1 = e.wait("d1")
    assert (d1.status, d1.current, d1.error_code) == ("failed", True, "agent_start_failed")
    assert d1.error_message is not None and d1.error_message.startswith(
        "could not restart after failed replacement d2: " + EXIT_MEANING[4])
    assert e.fake.unit(AGENT) is None


def test_no_rollback_for_a_previous_that_was_stopped(core_env: CoreEnv) -> None:
    e = core_env
    e.deploy("d1", e.package("v1", "1.0.0"))
    e.actions.act(AGENT, "stop")
    e.fake.script(AGENT, ("exit", 3))
    assert e.deploy("d2", e.package("v2", "2.0.0"), version="2.0.0").status == "failed"
    d1 = e.store.get("d1")
    assert (d1.status, d1.current, d1.desired_state) == ("stopped", True, "stopped")
    assert [op for op in e.fake.ops("start") if op[1] == "d1"] == [("start", "d1")]
    assert e.fake.unit(AGENT) is None


# ---------------------------------------------------------------- queues


def test_deploys_of_one_agent_run_in_order_one_at_a_time(core_env: CoreEnv) -> None:
    e = core_env
    pkgs = [e.package(f"p{i}", f"1.0.{i}") for i in range(3)]
    with e.fake.hold(AGENT):
        for i, pkg in enumerate(pkgs):
            e.submit(f"d{i}", pkg, version=f"1.0.{i}")
        poll("d0 to wait for READY", lambda: e.fake.waiting() == {AGENT: 1})
        assert [e.store.get(f"d{i}").status for i in range(3)] == ["starting", "pending",
                                                                   "pending"]
    last = e.wait("d2")
    assert (last.status, last.current) == ("healthy", True)
    assert [(x.status, x.current) for x in (e.store.get("d0"), e.store.get("d1"))] == [
        ("stopped", False), ("stopped", False)]
    assert e.fake.ops("start", "stop") == [("start", "d0"), ("stop", "d0"), ("start", "d1"),
                                           ("stop", "d1"), ("start", "d2")]
    assert e.fake.max_concurrent[AGENT] == 1


def test_deploys_of_different_agents_run_in_parallel(core_env: CoreEnv) -> None:
    e = core_env
    with e.fake.hold("agent-a", "agent-b"):
        e.submit("da", e.package("a"), agent="agent-a")
        e.submit("db", e.package("b"), agent="agent-b")
        poll("both agents to wait for READY at once",
             lambda: e.fake.waiting() == {"agent-a": 1, "agent-b": 1})
    da, db = e.wait("da"), e.wait("db")
    assert (da.status, db.status) == ("healthy", "healthy")
    assert da.ports["rest"] != db.ports["rest"]
    assert e.fake.max_parallel == 2


def test_deploy_removed_while_queued_never_runs(core_env: CoreEnv) -> None:
    e = core_env
    result: list[dict] = []
    with e.fake.hold(AGENT):
        e.submit("d1", e.package("v1", "1.0.0"))
        poll("d1 to wait for READY", lambda: e.fake.waiting() == {AGENT: 1})
        e.submit("d2", e.package("v2", "2.0.0"), version="2.0.0")
        # remove waits for the agent's lock (d1 holds it); it takes d2 off the queue first
        remover = threading.Thread(target=lambda: result.append(e.actions.remove("d2", False)))
        remover.start()
        poll("d2 to leave the queue",
             lambda: "d2" not in e.deployer._queues.get(AGENT, ()))
    remover.join(10)
    assert result == [{"deleted": "d2", "agentAppId": AGENT, "purged": [],
                       "alreadyRemoved": False}]
    d2 = e.wait("d2")
    assert (d2.status, d2.desired_state, d2.current) == ("removed", "removed", False)
    assert d2.phases == {} and d2.package_digest is None
    d1 = e.wait("d1")
    assert (d1.status, d1.current) == ("healthy", True)
    assert e.fake.ops() == [("start", "d1")]


def test_failure_before_starting_leaves_the_current_deployment_alone(core_env: CoreEnv) -> None:
    e = core_env
    d1 = e.deploy("d1", e.package("v1", "1.0.0"))
    v1_files = e.files()
    d2 = e.deploy("d2", e.package("v2", "2.0.0", requirements="-e .\n"), version="2.0.0")
    assert d2.error_code == "requirements_editable"
    assert e.fake.ops() == [("start", "d1")]
    assert e.store.get("d1") == d1 and e.files() == v1_files


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_in_pards_own_writes_fails_cleanly(core_env: CoreEnv,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       err: int) -> None:
    """ENOSPC while pard extracts (its own write: on ext4, once the root reserve is
    gone too) is `disk_full`, not an internal error, and the downloaded package goes."""
    e = core_env

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(err, os.strerror(err), str(layout.extracted(e.cfg) / ".tmp-x"))

    monkeypatch.setattr(pipeline, "extract_package", full)
    d = e.deploy("d1", e.package())
    assert (d.status, d.error_code, d.current) == ("failed", "disk_full", False)
    message = d.error_message or ""
    assert message.startswith("No space left on device (") and ".tmp-x" in message, message
    assert str(e.cfg.paths.state_dir) in message
    assert e.leftovers() == []
    assert e.fake.ops() == []


def test_other_os_errors_stay_internal(core_env: CoreEnv,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    e = core_env

    def broken(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pipeline, "extract_package", broken)
    d = e.deploy("d1", e.package())
    assert (d.status, d.error_code) == ("failed", "internal")


def test_port_taken_by_another_agent_is_refused(core_env: CoreEnv) -> None:
    e = core_env
    da = e.deploy("da", e.package("a"), agent="agent-a")
    port = da.ports["rest"]
    db = e.deploy("db", e.package("b"), agent="agent-b", surfaces={"ports": {"rest": port}})
    assert (db.status, db.error_code, db.error_field) == ("failed", "port_in_use",
                                                          "surfaces.ports.rest")
    assert e.fake.ops() == [("start", "da")]
    assert e.files("agent-b") == []


def test_deploy_removed_while_running_is_removed_once_started(core_env: CoreEnv) -> None:
    e = core_env
    result: list[dict] = []
    with e.fake.hold(AGENT):
        e.submit("d1", e.package())
        poll("d1 to wait for READY", lambda: e.fake.waiting() == {AGENT: 1})
        remover = threading.Thread(target=lambda: result.append(e.actions.remove("d1", True)))
        remover.start()
    remover.join(10)
    assert result and result[0]["deleted"] == "d1" and len(result[0]["purged"]) == 3
    d1 = e.store.get("d1")
    assert (d1.status, d1.current) == ("removed", False)
    assert e.fake.ops() == [("start", "d1"), ("stop", "d1")]
    assert e.fake.unit(AGENT) is None and e.leftovers() == []
