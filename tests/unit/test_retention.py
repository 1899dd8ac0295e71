"""par.retention and the store's pruning: events, history and spare packages stay bounded."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import pytest

from par import config, layout, retention
from par.config import Config, Retention, with_state_dir
from par.store import Deployment, Store

LOG = logging.getLogger("test-retention")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def dep(deployment_id: str, agent: str = "hello", **kw: object) -> Deployment:
    base = dict(version="1.0.0", package_url="https://example.test/x.apkg", org_id="org")
    base.update(kw)
    return Deployment(deployment_id, agent, **base)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "state" / "par.db", clock=Clock())
    yield s
    s.close()


def test_retention_keys_have_defaults_and_are_checked() -> None:
    r = Retention()
    assert (r.events_per_deployment, r.history_deployments, r.history_days,
            r.packages_per_agent) == (500, 1000, 90, 2)
    assert "retention:" in config.render_yaml()
    for raw, key in (({"events_per_deployment": 0}, "retention.events_per_deployment"),
                     ({"history_days": 0}, "retention.history_days"),
                     ({"history_deployments": -1}, "retention.history_deployments"),
                     ({"packages_per_agent": -1}, "retention.packages_per_agent")):
        with pytest.raises(config.ConfigError) as info:
            config.from_dict({"retention": raw})
        assert info.value.field == key
    config.from_dict({"retention": {"history_deployments": 0, "packages_per_agent": 0}})


def test_store_trims_events_as_it_writes(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "par.db", max_events=5)
    s.insert_deployment(dep("d-1"))
    s.insert_deployment(dep("d-2"))
    for i in range(20):
        s.add_event("d-1", "hello", f"e{i}")
        s.add_event(None, "hello", f"agent-wide {i}")
        s.add_event(None, "other", f"other {i}")
    assert [e["event"] for e in s.events("d-1")] == [f"e{i}" for i in range(15, 20)]
    assert [e["event"] for e in s.events("d-2")] == ["accepted"]  # others untouched
    with s._read() as conn:  # agent-wide events: per agent
        rows = conn.execute("SELECT agent_app_id, COUNT(*) FROM events WHERE deployment_id "
                            "IS NULL GROUP BY agent_app_id ORDER BY 1").fetchall()
    assert [tuple(r) for r in rows] == [("hello", 5), ("other", 5)]
    s.close()


def test_prune_events_trims_a_store_that_grew_before(tmp_path: Path) -> None:
    path = tmp_path / "par.db"
    with Store.open(path) as s:  # unbounded, as before retention existed
        for d in ("d-1", "d-2"):
            s.insert_deployment(dep(d))
            for i in range(30):
                s.add_event(d, "hello", f"{d} e{i}")
    with Store.open(path, max_events=10) as s:
        assert s.prune_events(10) == 2 * 31 - 2 * 10
        assert [e["event"] for e in s.events("d-1")] == [f"d-1 e{i}" for i in range(20, 30)]
        assert s.prune_events(10) == 0


def test_prune_history_keeps_current_in_flight_and_newest(store: Store) -> None:
    for i in range(6):
        store.insert_deployment(dep(f"d-{i}"))
        store.update(f"d-{i}", status="failed" if i % 2 else "stopped")
    store.insert_deployment(dep("cur", status="healthy"))
    store.update("cur", status="healthy")
    store.set_current("hello", "cur")
    store.insert_deployment(dep("flying"))  # pending: in flight
    store.insert_deployment(dep("gone", "old-agent"))
    store.update("gone", status="removed", desired_state="removed")
    store.add_event("d-0", "hello", "something")
    # newest 3 past deployments by updated_at: gone, d-5, d-4
    deleted = store.prune_history(3, updated_before=0.0)
    assert sorted(deleted) == ["d-0", "d-1", "d-2", "d-3"]
    left = {d.deployment_id for d in store.deployments()}
    assert left == {"cur", "flying", "gone", "d-5", "d-4"}
    assert store.events("d-0") == []  # events went with it
    # by age: everything past not updated since the cut-off
    cut = store.get("d-5").updated_at
    assert sorted(store.prune_history(100, updated_before=cut)) == ["d-4"]
    assert sorted(store.prune_history(0, updated_before=0.0)) == ["d-5", "gone"]
    assert {d.deployment_id for d in store.deployments()} == {"cur", "flying"}


# ---------------------------------------------------------------- packages


def make_cfg(tmp_path: Path, keep: int) -> Config:
    cfg = with_state_dir(Config(), tmp_path / "state")
    return dataclasses.replace(cfg, retention=dataclasses.replace(
        Retention(), packages_per_agent=keep))


def put_package(cfg: Config, agent: str, version: str, sha: str, mtime: float) -> None:
    pkg, ext = layout.deployment_files(cfg, agent, version, sha)
    pkg.parent.mkdir(parents=True, exist_ok=True)
    pkg.write_bytes(b"zip")
    (ext / "src").mkdir(parents=True)
    (ext / "agent.yaml").write_text("name: x\n")
    for p in (pkg, ext):
        os.utime(p, (mtime, mtime))


def names(cfg: Config) -> list[str]:
    return sorted(key for key in retention.package_paths(cfg))


def test_prune_packages_keeps_in_use_and_newest(tmp_path: Path, store: Store) -> None:
    cfg = make_cfg(tmp_path, keep=1)
    sha = {v: f"{i}" * 64 for i, v in enumerate(["1", "2", "3", "4", "5"], 1)}
    for i, v in enumerate(sha):
        put_package(cfg, "hello", v, sha[v], mtime=1000 + i)
    put_package(cfg, "hello-two", "1", "a" * 64, mtime=1)  # another agent: untouched
    layout.package_sources(cfg).mkdir(parents=True)
    for v in ("1", "5"):
        (layout.package_sources(cfg) / f"hello@{v}.json").write_text("{}")
    # the current deployment runs the oldest package
    store.insert_deployment(dep("cur", version="1", package_digest=sha["1"]))
    store.set_current("hello", "cur")
    removed = retention.prune_packages(cfg, store, "hello", 1, LOG)
    assert len(removed) == 6  # versions 2, 3, 4: package + extraction each
    assert names(cfg) == ["hello-two@1@" + "a" * 12, "hello@1@" + "1" * 12,
                          "hello@5@" + "5" * 12]
    assert (layout.package_sources(cfg) / "hello@1.json").exists()
    assert retention.prune_packages(cfg, store, "hello", 1, LOG) == []
    # keep 0: only what the current deployment uses
    retention.prune_packages(cfg, store, "hello", 0, LOG)
    assert names(cfg) == ["hello-two@1@" + "a" * 12, "hello@1@" + "1" * 12]
    assert not (layout.package_sources(cfg) / "hello@5.json").exists()


def test_temporary_files_are_not_packages(tmp_path: Path, store: Store) -> None:
    cfg = make_cfg(tmp_path, keep=0)
    put_package(cfg, "hello", "1", "1" * 64, mtime=1)
    part = layout.packages(cfg) / ".hello@2~x.part"
    part.write_bytes(b"")
    tmp = layout.extracted(cfg) / ".hello@2@abc~x.tmp"
    tmp.mkdir()
    retention.prune_packages(cfg, store, "hello", 0, LOG)
    assert part.exists() and tmp.exists() and names(cfg) == []


def test_at_start_prunes_everything_under_each_agents_lock(tmp_path: Path, store: Store) -> None:
    cfg = dataclasses.replace(make_cfg(tmp_path, keep=0), retention=Retention(
        events_per_deployment=3, history_deployments=0, packages_per_agent=0))
    put_package(cfg, "a", "1", "1" * 64, mtime=1)
    put_package(cfg, "b", "1", "2" * 64, mtime=1)
    store.insert_deployment(dep("old"))
    store.update("old", status="failed")
    store.insert_deployment(dep("cur", "b", version="1", package_digest="2" * 64))
    store.set_current("b", "cur")
    for i in range(10):
        store.add_event("cur", "b", f"e{i}")
    taken: list[str] = []
    locks: dict[str, threading.Lock] = {}

    def lock_of(agent: str) -> threading.Lock:
        taken.append(agent)
        return locks.setdefault(agent, threading.Lock())

    pruned = retention.at_start(cfg, store, lock_of, LOG, now=1e9)
    assert pruned.deployments == ("old",) and pruned.events >= 10 - 3
    assert taken == ["a", "b"]
    assert names(cfg) == ["b@1@" + "2" * 12]
    assert [e["event"] for e in store.events("cur")] == ["e7", "e8", "e9"]
