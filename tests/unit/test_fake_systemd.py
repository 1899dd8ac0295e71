"""The FakeSystemd follows the state machine of a real transient agent unit (see its
module doc), for units built by par.agent_unit.unit_spec like pard's."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from par.agent_unit import AgentLaunch, unit_spec
from par.errors import ParError
from par.units import Systemd, UnitSpec, UnitStatus
from tests.unit.apkg_factory import make_cfg
from tests.unit.core_env import poll
from tests.unit.fake_systemd import FakeSystemd

UNIT = "par-agent@agent-a.service"


@pytest.fixture
def spec(tmp_path: Path) -> UnitSpec:
    """The unit pard would start for a deployment `d1` of `agent-a`."""
    launch = AgentLaunch(agent_id="agent-a", deployment_id="d1", org_id="org", name="demo",
                         version="1.0", package_root=tmp_path / "pkg",
                         venv_path=tmp_path / "venv", ports={"rest": 8100},
                         entrypoint="main:handler", rest_entry=None, a2a_service=None,
                         ui_path=None, env={"SECRET": "x"})
    return unit_spec(make_cfg(tmp_path), launch)


def state(st: UnitStatus) -> tuple[str, str, str, str, int]:
    return st.load_state, st.active_state, st.sub_state, st.result, st.exec_main_status


def test_every_public_method_of_systemd_is_faked() -> None:
    public = {n for n in vars(Systemd) if not n.startswith("_")}
    assert public <= {n for n in vars(FakeSystemd)}


def test_unknown_unit_reads_not_found() -> None:
    fake = FakeSystemd()
    st = fake.status(UNIT)
    assert state(st) == ("not-found", "inactive", "dead", "", 0) and not st.exists
    assert fake.property(UNIT, "Service", "Environment") == []
    assert fake.list_agent_units() == []
    assert fake.stop(UNIT, 5) == st


def test_start_activating_then_ready(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.start(spec)
    assert fake.status(UNIT).active_state == "activating"  # until someone waits
    with pytest.raises(ParError) as exc:
        fake.start(spec)
    assert exc.value.code == "unit_exists"
    st = fake.wait_active(UNIT, timeout=130)
    assert state(st) == ("loaded", "active", "running", "success", 0) and st.main_pid > 0
    with pytest.raises(ParError) as exc:
        fake.start(spec)
    assert exc.value.code == "unit_exists"
    env = fake.property(UNIT, "Service", "Environment")
    assert isinstance(env, list) and b"DEPLOYMENT_ID=d1" in env and b"REST_PORT=8100" in env
    assert not any(item.startswith(b"SECRET=") for item in env)  # in the EnvironmentFile only
    assert fake.list_agent_units() == [UNIT]


def test_permanent_exit_fails_and_stays_until_reset(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.script("agent-a", ("exit", 3), says=("ImportError: nope",))
    fake.start(spec)
    st = fake.wait_active(UNIT, timeout=130)
    assert state(st) == ("loaded", "failed", "failed", "exit-code", 3)
    assert st.n_restarts == 0 and st.main_pid == 0
    assert fake.list_agent_units() == [UNIT]
    assert fake.stop(UNIT, 5).active_state == "failed"  # stop leaves a failed unit failed
    assert "ImportError: nope" in fake.journal_lines(UNIT)
    assert f"{UNIT}: Main process exited, code=exited, status=3/NOTIMPLEMENTED" in \
        fake.journal_lines(UNIT)
    fake.reset_failed(UNIT)
    assert not fake.status(UNIT).exists and fake.list_agent_units() == []


def test_start_over_a_failed_leftover_resets_it(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.script("agent-a", ("exit", 3))
    fake.start(spec)
    failed = fake.wait_active(UNIT, timeout=130)
    fake.start(spec, current=failed)
    assert fake.ops() == [("start", "d1"), ("start", "d1")]
    assert fake.wait_active(UNIT, timeout=130).active_state == "active"


def test_transient_exit_restarts_until_ready(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.script("agent-a", ("exit", 1), "ok")
    fake.start(spec)
    st = fake.wait_active(UNIT, timeout=130)
    assert state(st)[1:3] == ("active", "running") and st.n_restarts == 1


def test_crash_loop_hits_the_start_limit(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.script("agent-a", *[("exit", 1)] * spec.start_limit_burst)
    fake.start(spec)
    st = fake.wait_active(UNIT, timeout=130)
    assert state(st) == ("loaded", "failed", "failed", "start-limit-hit", 1)
    assert st.n_restarts == spec.start_limit_burst - 1


def test_start_timeout(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.script("agent-a", "timeout")
    fake.start(spec)
    # pard waiting less than TimeoutStartSec sees it still starting
    assert state(fake.wait_active(UNIT, timeout=1))[1:3] == ("activating", "start")
    st = fake.wait_active(UNIT, timeout=spec.timeout_start_s + 10)
    assert state(st) == ("loaded", "activating", "auto-restart", "timeout", 0)
    st = fake.stop(UNIT, 10)  # stopped while waiting to restart: failed, result kept
    assert state(st) == ("loaded", "failed", "failed", "timeout", 0)


def test_stop_then_collected(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.start(spec)
    fake.wait_active(UNIT, timeout=130)
    st = fake.stop(UNIT, 40)
    assert state(st) == ("loaded", "inactive", "dead", "success", 0)
    assert not fake.status(UNIT).exists  # CollectMode=inactive


def test_stop_that_hangs_is_killed_and_failed(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.start(spec)
    fake.wait_active(UNIT, timeout=130)
    fake.script_stop("agent-a", "hang")
    st = fake.stop(UNIT, spec.timeout_stop_s + 10)
    assert state(st) == ("loaded", "failed", "failed", "timeout", signal.SIGKILL)


def test_crash_restarts_or_fails(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.start(spec)
    pid = fake.wait_active(UNIT, timeout=130).main_pid
    st = fake.crash("agent-a", ("signal", signal.SIGKILL))
    assert state(st)[1:3] == ("active", "running") and st.n_restarts == 1
    assert st.main_pid != pid
    st = fake.crash("agent-a", ("exit", 3))
    assert state(st) == ("loaded", "failed", "failed", "exit-code", 3)


def test_kill_term_is_a_clean_stop(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.start(spec)
    fake.wait_active(UNIT, timeout=130)
    fake.kill(UNIT, signal.SIGTERM)
    assert not fake.status(UNIT).exists


def test_vanish(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    fake.run_unit(spec)
    fake.vanish()
    assert not fake.status(UNIT).exists and fake.ops() == []


def test_hold_blocks_waits_until_released(spec: UnitSpec) -> None:
    fake = FakeSystemd()
    got: list[UnitStatus] = []
    with fake.hold("agent-a"):
        fake.start(spec)
        t = threading.Thread(target=lambda: got.append(fake.wait_active(UNIT, 130)))
        t.start()
        poll("the wait to block", lambda: fake.waiting() == {"agent-a": 1})
        assert got == []
    t.join(5)
    assert got[0].active_state == "active"
    assert fake.max_concurrent["agent-a"] == 1 and fake.max_parallel == 1


def test_no_dbus(spec: UnitSpec) -> None:
    with pytest.raises(AssertionError):
        FakeSystemd().restart(UNIT)
    with pytest.raises(AssertionError), FakeSystemd()._bus():
        pass
