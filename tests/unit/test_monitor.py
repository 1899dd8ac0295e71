"""The unit monitor's bookkeeping, live status and journal parsing (pure logic; the
real-systemd behaviour is in tests/integration/test_operator_trust.py)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import pytest

from par import journal, layout, ports
from par.config import Ports
from par.monitor import UnitMonitor, _unit_of_path, crashed_runs, describe_exit
from par.service import live_status
from par.store import Deployment, Store
from par.units import UnitStatus
from tests.unit.apkg_factory import make_cfg


def unit(active: str = "active", sub: str = "running", restarts: int = 0,
         result: str = "success", status: int = 0) -> UnitStatus:
    return UnitStatus(name="par-agent@a.service", load_state="loaded", active_state=active,
                      sub_state=sub, main_pid=42, n_restarts=restarts, result=result,
                      exec_main_status=status, since_usec=0, status_text="")


def dep(status: str = "healthy", **kw: object) -> Deployment:
    return Deployment("d-1", "a", "1.0.0", "https://x/a.apkg", status=status, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("stored", "st", "live"), [
    ("healthy", unit(), "healthy"),
    ("healthy", unit("activating", "auto-restart", 1), "restarting"),
    ("healthy", unit("activating", "start", 2), "restarting"),
    ("healthy", unit("failed", "failed", 5, "exit-code", 7), "failed"),
    ("healthy", unit("inactive", "dead"), "failed"),
    ("stopped", unit("inactive", "dead"), "stopped"),
    ("starting", unit("activating", "start"), "starting"),
    ("failed", unit("failed", "failed"), "failed"),
    ("healthy", None, "healthy"),
])
def test_live_status(stored: str, st: UnitStatus | None, live: str) -> None:
    assert live_status(dep(stored), st) == live


def test_crashed_runs_counts_the_run_being_restarted() -> None:
    assert crashed_runs(unit()) == 0
    assert crashed_runs(unit(restarts=2)) == 2
    assert crashed_runs(unit("activating", "auto-restart", 2)) == 3
    assert crashed_runs(unit("failed", "failed", 4)) == 5


def test_main_exits_and_tail_from_systemds_lines() -> None:
    text = [
        "loaded",
        "par-agent@a.service: Main process exited, code=exited, status=7/n/a",
        "par-agent@a.service: Failed with result 'exit-code'.",
        "Traceback: boom",
        "par-agent@a.service: Main process exited, code=killed, status=9/KILL",
        "par-agent@a.service: Scheduled restart job, restart counter is at 2.",
    ]
    assert journal.main_exits(text) == [journal.MainExit("exited", 7),
                                         journal.MainExit("killed", 9)]
    assert journal.meaningful_tail(text) == "loaded | Traceback: boom"


def test_describe_exit() -> None:
    st = unit("activating", "auto-restart", 1, "exit-code", 7)
    assert describe_exit(journal.MainExit("exited", 7), st) == "the agent exited with status 7"
    assert "failed to import (exit status 3)" in describe_exit(journal.MainExit("exited", 3), st)
    assert describe_exit(journal.MainExit("killed", 9), st) == "the agent was killed by signal 9"
    assert "unexpectedly" in describe_exit(None, st)


def test_unit_of_path() -> None:
    path = b"/org/freedesktop/systemd1/unit/par_2dagent_40my_2dagent_5f1_2eservice"
    assert _unit_of_path(path) == "par-agent@my-agent_1.service"


class FakeSystemd:
    """Answers status() with what the test sets (the monitor's only systemd call)."""

    def __init__(self) -> None:
        self.st = unit()

    def status(self, name: str) -> UnitStatus:
        return dataclasses.replace(self.st, name=name)


@pytest.fixture
def monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = Store.open(tmp_path / "par.db")
    store.insert_deployment(Deployment("d-1", "a", "1.0.0", "https://x/a.apkg", status="healthy"))
    store.set_current("a", "d-1")
    systemd = FakeSystemd()
    locks: dict[str, threading.Lock] = {}
    mon = UnitMonitor(store, systemd, lambda a: locks.setdefault(a, threading.Lock()),  # type: ignore[arg-type]
                      logging.getLogger("test.monitor"))
    exits: list[journal.MainExit] = []
    monkeypatch.setattr(journal, "lines", lambda unit, since=None, count=60: [
        f"{unit}: Main process exited, code={e.code}, status={e.status}/x" for e in exits
    ] + ["the agent's last words"])
    yield mon, store, systemd, locks, exits
    store.close()


def crashes(store: Store) -> list[dict]:
    return [e for e in store.events("d-1") if e["event"] == "Agent crashed"]


def test_a_crash_is_recorded_once_with_its_exit_status(monitor) -> None:
    mon, store, systemd, _locks, exits = monitor
    name = "par-agent@a.service"
    mon.check(name, first=True)  # pard's start: what came before is history
    exits.append(journal.MainExit("exited", 7))
    systemd.st = unit("activating", "auto-restart", 0, "exit-code", 7)
    mon.check(name)
    systemd.st = unit(restarts=1)  # restarted: the same crash, not a new one
    mon.check(name)
    assert [(e["fields"]["exitStatus"], e["fields"]["result"]) for e in crashes(store)] == \
        [(7, "exit-code")]
    assert "the agent's last words" in crashes(store)[0]["message"]
    assert store.get("d-1").status == "healthy"


def test_restarts_missed_between_looks_are_each_recorded(monitor) -> None:
    mon, store, systemd, _locks, exits = monitor
    mon.check("par-agent@a.service", first=True)
    exits += [journal.MainExit("exited", 7), journal.MainExit("killed", 9)]
    systemd.st = unit(restarts=2)
    mon.check("par-agent@a.service")
    assert [e["fields"]["exitStatus"] for e in crashes(store)] == [7, 9]


def test_restarts_from_before_pards_start_are_not_news(monitor) -> None:
    mon, store, systemd, _locks, _exits = monitor
    systemd.st = unit(restarts=3)
    mon.check("par-agent@a.service", first=True)
    assert crashes(store) == []


def test_start_limit_fails_the_deployment_and_a_restart_heals_it(monitor) -> None:
    mon, store, systemd, _locks, exits = monitor
    mon.check("par-agent@a.service", first=True)
    exits.append(journal.MainExit("exited", 7))
    systemd.st = unit("failed", "failed", 4, "exit-code", 7)
    mon.check("par-agent@a.service")
    d = store.get("d-1")
    assert (d.status, d.error_code) == ("failed", "agent_crashed")
    assert "gave up after 4 restart(s)" in (d.error_message or "")
    assert "status 7" in (d.error_message or "")
    systemd.st = unit()  # an operator's systemctl restart
    mon.check("par-agent@a.service")
    assert store.get("d-1").status == "healthy"
    assert store.events("d-1")[-1]["event"] == "Agent running again"


def test_an_agent_being_changed_is_left_alone(monitor) -> None:
    mon, store, systemd, locks, _exits = monitor
    mon.check("par-agent@a.service", first=True)
    systemd.st = unit("failed", "failed", 2, "exit-code", 7)
    with locks.setdefault("a", threading.Lock()):
        mon.check("par-agent@a.service")
    assert crashes(store) == [] and store.get("d-1").status == "healthy"
    store.update("d-1", desired_state="stopped", status="stopped")
    mon.check("par-agent@a.service")
    assert crashes(store) == []


def test_layout_names_files_by_their_bytes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    sha = "ab" * 32
    pkg, root = layout.deployment_files(cfg, "a", "1.0+x", sha)
    assert pkg == layout.packages(cfg) / "a@1.0+x@abababababab.apkg"
    assert root == layout.extracted(cfg) / "a@1.0+x@abababababab"
    # deployments from before the digest was recorded keep the flat names
    assert layout.deployment_files(cfg, "a", "1.0", None) == (
        layout.packages(cfg) / "a@1.0.apkg", layout.extracted(cfg) / "a@1.0")


def test_ports_only_for_the_declared_surfaces() -> None:
    cfg = Ports(rest=(20100, 20199), a2a=(20200, 20299), ui=(20300, 20399))
    got = ports.allocate(cfg, requested={"a2a": 20250}, taken=set(), kinds=("rest",))
    assert set(got) == {"rest"}
    grown = ports.allocate(cfg, requested={}, taken=set(), inherit=got, kinds=("rest", "ui"))
    assert grown["rest"] == got["rest"] and set(grown) == {"rest", "ui"}
