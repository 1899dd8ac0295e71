"""par.store: schema and migrations, records, current, events, and failure modes.

Every test works on a fresh SQLite file under tmp_path; the kill -9 test runs a
writer in a child Python process and kills it mid-loop.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from par.errors import NotFound, ParError
from par.store import IN_FLIGHT, MIGRATIONS, STATUSES, Deployment, Store

REPO = Path(__file__).resolve().parents[2]
LATEST = len(MIGRATIONS)


class Clock:
    """A controllable time source: each call returns `now`, then advances by `step`."""

    def __init__(self, now: float = 1000.0, step: float = 0.0) -> None:
        self.now, self.step = now, step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def dep(deployment_id: str = "d-1", agent: str = "hello", **kw: object) -> Deployment:
    base = dict(version="1.0.0", package_url="https://example.test/hello.apkg", org_id="org")
    base.update(kw)
    return Deployment(deployment_id, agent, **base)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "par.db"


@pytest.fixture
def store(db: Path):
    s = Store.open(db)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# ---- opening, schema, migrations ------------------------------------------------


def test_open_creates_private_versioned_wal_store(db: Path) -> None:
    Store.open(db).close()
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"deployments", "events", "deployments_one_current",
            "deployments_agent_created", "events_deployment"} <= names


def test_reopen_keeps_data_and_does_not_migrate_again(db: Path) -> None:
    with Store.open(db) as s:
        s.insert_deployment(dep())
    with Store.open(db) as s:
        assert s.get("d-1").agent_app_id == "hello"
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == LATEST


def test_migrates_a_version_0_file(db: Path) -> None:
    db.parent.mkdir()
    conn = raw(db)
    conn.execute("CREATE TABLE unrelated (x)")
    conn.execute("INSERT INTO unrelated VALUES (42)")
    conn.close()
    with Store.open(db) as s:
        s.insert_deployment(dep())
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST
    assert conn.execute("SELECT x FROM unrelated").fetchall() == [(42,)]


def test_migration_chain_from_an_older_version_keeps_rows(db: Path) -> None:
    # A version-1 store made by hand, with a row, then code that knows one more version.
    db.parent.mkdir()
    conn = raw(db)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO deployments (deployment_id, agent_app_id, version, package_url, status,"
        " created_at, updated_at)"
        " VALUES ('old', 'hello', '0.9', 'https://x/a.apkg', 'healthy', 1, 2)"
    )
    conn.close()
    v2 = (*MIGRATIONS, ("ALTER TABLE deployments ADD COLUMN note TEXT NOT NULL DEFAULT 'n'",))
    with Store.open(db, migrations=v2) as s:
        old = s.get("old")
        assert (old.status, old.version, old.created_at) == ("healthy", "0.9", 1.0)
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(v2)
    assert conn.execute("SELECT note FROM deployments").fetchall() == [("n",)]
    # a deployment from before package digests were stored keeps the flat layout
    assert conn.execute("SELECT package_digest FROM deployments").fetchall() == [(None,)]


def test_failed_migration_rolls_back_and_keeps_the_version(db: Path) -> None:
    Store.open(db).close()
    broken = (*MIGRATIONS, ("CREATE TABLE half_done (x)", "THIS IS NOT SQL"))
    with pytest.raises(ParError) as err:
        Store.open(db, migrations=broken)
    assert err.value.code == "store_migration_failed"
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in names


def test_newer_schema_is_refused_untouched(db: Path) -> None:
    Store.open(db).close()
    conn = raw(db)
    conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    conn.close()
    before = db.read_bytes()
    with pytest.raises(ParError) as err:
        Store.open(db)
    assert err.value.code == "store_too_new"
    assert db.read_bytes() == before


def test_garbage_file_is_store_corrupt_and_left_untouched(db: Path) -> None:
    with Store.open(db) as s:
        s.insert_deployment(dep())
    garbage = random.Random(1).randbytes(db.stat().st_size)
    db.write_bytes(garbage)
    with pytest.raises(ParError) as err:
        Store.open(db)
    assert err.value.code == "store_corrupt"
    assert str(db) in err.value.message
    assert db.read_bytes() == garbage


def test_damaged_page_fails_quick_check_and_is_left_untouched(db: Path) -> None:
    with Store.open(db) as s:
        for i in range(50):
            s.insert_deployment(dep(f"d-{i}", request={"pad": "x" * 500}))
    page = raw(db).execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(db.read_bytes())  # closed: the WAL was checkpointed into the file
    data[page * 2 : page * 3] = random.Random(2).randbytes(page)  # header intact
    db.write_bytes(bytes(data))
    with pytest.raises(ParError) as err:
        Store.open(db)
    assert err.value.code == "store_corrupt"
    assert db.read_bytes() == bytes(data)


def test_file_locked_by_another_writer_is_store_locked(db: Path) -> None:
    # A rollback-journal database held exclusively: even reading it waits.
    db.parent.mkdir()
    other = raw(db)
    other.execute("CREATE TABLE x (y)")
    other.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    with pytest.raises(ParError) as err:
        Store.open(db, busy_timeout_ms=100)
    assert err.value.code == "store_locked"
    assert time.monotonic() - started < 2
    other.execute("ROLLBACK")


def test_write_while_another_writer_holds_the_lock_is_store_locked(db: Path) -> None:
    with Store.open(db, busy_timeout_ms=100) as s:
        other = raw(db)
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(ParError) as err:
            s.insert_deployment(dep())
        assert err.value.code == "store_locked"
        other.execute("COMMIT")
        assert s.insert_deployment(dep())[1] is True


def test_closed_store_refuses_use(db: Path) -> None:
    s = Store.open(db)
    s.close()
    s.close()
    with pytest.raises(ParError) as err:
        s.find("d-1")
    assert err.value.code == "store_closed"


# ---- deployments ------------------------------------------------------------


def test_insert_is_idempotent(db: Path) -> None:
    with Store.open(db, clock=Clock(5.0)) as s:
        first, created = s.insert_deployment(dep(version="1.0.0"))
        assert created and first.created_at == first.updated_at == 5.0
        again, created = s.insert_deployment(dep(version="2.0.0"))
        assert not created
        assert again == first
        assert len(s.deployments()) == 1
        assert [e["event"] for e in s.events("d-1")] == ["accepted"]


def test_insert_refuses_current(store: Store) -> None:
    with pytest.raises(ValueError):
        store.insert_deployment(dep(current=True))


def test_get_find_and_list(db: Path) -> None:
    with Store.open(db, clock=Clock(1.0, step=1.0)) as s:
        s.insert_deployment(dep("d-1", "a"))
        s.insert_deployment(dep("d-2", "b"))
        s.insert_deployment(dep("d-3", "a"))
        s.update("d-3", status="healthy")
        assert [d.deployment_id for d in s.deployments()] == ["d-3", "d-2", "d-1"]
        assert [d.deployment_id for d in s.deployments(agent_app_id="a")] == ["d-3", "d-1"]
        assert [d.deployment_id for d in s.deployments(status="pending")] == ["d-2", "d-1"]
        assert [d.deployment_id for d in s.deployments("a", "healthy")] == ["d-3"]
        assert s.find("nope") is None
        with pytest.raises(NotFound) as err:
            s.get("nope")
        assert (err.value.code, err.value.status, err.value.field) == (
            "not_found", 404, "deploymentId")


def test_round_trip_of_every_field(store: Store) -> None:
    d = dep(package_sha256="ab" * 32, request={"deploymentId": "d-1", "cpuUnits": 512},
            ports={"rest": 8100, "a2a": 50100, "ui": 3100})
    store.insert_deployment(d)
    store.update("d-1", unit="par-agent@hello.service", venv="hello_1a2b3c4",
                 venv_reused=True, desired_state="stopped")
    got = store.get("d-1")
    assert got.package_sha256 == "ab" * 32
    assert got.request == {"deploymentId": "d-1", "cpuUnits": 512}
    assert got.ports == {"rest": 8100, "a2a": 50100, "ui": 3100}
    assert (got.unit, got.venv, got.venv_reused, got.desired_state) == (
        "par-agent@hello.service", "hello_1a2b3c4", True, "stopped")


def test_wait_for_change_answers_on_the_next_write_or_after_the_timeout(db: Path) -> None:
    with Store.open(db, clock=Clock(10.0, step=1.0)) as s:
        first, _ = s.insert_deployment(dep())
        # already different from what the caller saw: at once
        assert s.wait_for_change("d-1", first.updated_at - 1, 30).updated_at == first.updated_at
        # nothing changes: the record as it is, after the timeout
        t0 = time.monotonic()
        assert s.wait_for_change("d-1", first.updated_at, 0.2) == first
        assert time.monotonic() - t0 >= 0.2
        # a write from another thread wakes the waiter with the new record
        writer = threading.Timer(0.2, lambda: s.start_phase("d-1", "downloading", "downloading"))
        writer.start()
        t0 = time.monotonic()
        changed = s.wait_for_change("d-1", first.updated_at, 30)
        writer.join()
        assert changed.status == "downloading" and time.monotonic() - t0 < 10
        with pytest.raises(NotFound):
            s.wait_for_change("d-9", 0.0, 1)


def test_close_wakes_a_waiter(db: Path) -> None:
    s = Store.open(db)
    first, _ = s.insert_deployment(dep())
    threading.Timer(0.2, s.close).start()
    with pytest.raises(ParError) as err:
        s.wait_for_change("d-1", first.updated_at, 30)
    assert err.value.code == "store_closed"


def test_update_sets_updated_at_records_status_and_refuses_unknown(db: Path) -> None:
    with Store.open(db, clock=Clock(10.0, step=1.0)) as s:
        s.insert_deployment(dep())
        new = s.update("d-1", status="healthy", ports={"rest": 8100})
        assert (new.status, new.ports, new.created_at, new.updated_at) == (
            "healthy", {"rest": 8100}, 10.0, 11.0)
        assert s.get("d-1") == new
        last = s.events("d-1")[-1]
        assert last["event"] == "status"
        assert last["fields"] == {"status": "healthy", "previous": "pending"}
        for bad in ({"nope": 1}, {"current": True}, {"deployment_id": "x"}, {"env": {}}):
            with pytest.raises(ValueError):
                s.update("d-1", **bad)
        with pytest.raises(ValueError):
            s.update("d-1", status="exploded")
        with pytest.raises(NotFound):
            s.update("missing", status="healthy")
        assert s.get("d-1") == new


def test_phases_record_start_end_seconds_and_status(db: Path) -> None:
    with Store.open(db, clock=Clock(100.0, step=0.25)) as s:
        s.insert_deployment(dep())
        d = s.start_phase("d-1", "downloading", "downloading")
        assert d.status == "downloading"
        assert d.phases == {"downloading": {"start": 100.25, "end": None, "seconds": None}}
        d = s.end_phase("d-1", "downloading")
        assert d.phases["downloading"] == {"start": 100.25, "end": 100.5, "seconds": 0.25}
        s.start_phase("d-1", "loading", "loading")
        d = s.get("d-1")
        assert list(d.phases) == ["downloading", "loading"]
        assert d.to_api()["phases"]["downloading"]["seconds"] == 0.25
        with pytest.raises(ValueError):
            s.end_phase("d-1", "starting")
        assert [e["event"] for e in s.events("d-1")] == [
            "accepted", "phase_started", "phase_ended", "phase_started"]


def test_fail_sets_error_and_closes_open_phases(db: Path) -> None:
    with Store.open(db, clock=Clock(1.0, step=1.0)) as s:
        s.insert_deployment(dep())
        s.start_phase("d-1", "loading", "loading")
        d = s.fail("d-1", "venv_build_failed", "pip could not find grpcio==99", "requirements")
        assert d.status == "failed"
        assert d.to_api()["error"] == {"code": "venv_build_failed",
                                       "message": "pip could not find grpcio==99",
                                       "field": "requirements"}
        assert d.phases["loading"] == {"start": 2.0, "end": 3.0, "seconds": 1.0}
        assert s.get("d-1") == d
        last = s.events("d-1")[-1]
        assert (last["event"], last["message"]) == ("failed", "pip could not find grpcio==99")
        assert last["fields"]["code"] == "venv_build_failed"


def test_set_current_swaps_atomically(store: Store) -> None:
    for i in (1, 2):
        store.insert_deployment(dep(f"d-{i}"))
    store.insert_deployment(dep("o-1", "other"))
    assert store.set_current("hello", "d-1") is None
    assert store.set_current("hello", "d-1") is None  # already current: no change
    previous = store.set_current("hello", "d-2")
    assert previous is not None and previous.deployment_id == "d-1" and not previous.current
    assert store.current("hello").deployment_id == "d-2"
    assert not store.get("d-1").current
    store.set_current("other", "o-1")
    assert [d.deployment_id for d in store.currents()] == ["d-2", "o-1"]
    assert store.current("nobody") is None
    assert [e["event"] for e in store.events("d-1")][-1] == "replaced"
    with pytest.raises(ParError) as err:
        store.set_current("other", "d-1")
    assert err.value.code == "conflict"
    assert store.current("hello").deployment_id == "d-2"
    cleared = store.clear_current("hello")
    assert cleared is not None and cleared.deployment_id == "d-2"
    assert store.current("hello") is None and store.clear_current("hello") is None


def test_two_currents_for_one_agent_are_impossible(store: Store) -> None:
    store.insert_deployment(dep("d-1"))
    store.insert_deployment(dep("d-2"))
    store.set_current("hello", "d-1")
    conn = raw(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE deployments SET current = 1 WHERE deployment_id = 'd-2'")
    assert [d.deployment_id for d in store.currents()] == ["d-1"]


def test_counts_and_in_flight(store: Store) -> None:
    for i, status in enumerate(["healthy", "failed", "loading", "failed", "stopped"]):
        store.insert_deployment(dep(f"d-{i}", f"a{i}"))
        store.update(f"d-{i}", status=status)
    store.set_current("a0", "d-0")  # healthy, current
    store.set_current("a1", "d-1")  # failed, current (its unit crashed)
    store.insert_deployment(dep("d-new", "a0"))  # pending, not yet current
    counts = store.counts_by_status()
    assert set(counts) == set(STATUSES)
    # d-3 (failed) and d-4 (stopped) are neither current nor in flight: history.
    assert {k: v for k, v in counts.items() if v} == {
        "healthy": 1, "failed": 1, "loading": 1, "pending": 1}
    assert [d.deployment_id for d in store.in_flight()] == ["d-2", "d-new"]
    assert all(d.status in IN_FLIGHT for d in store.in_flight())


def test_delete_cascades_to_events(store: Store) -> None:
    store.insert_deployment(dep("d-1"))
    store.insert_deployment(dep("d-2"))
    store.add_event("d-1", "hello", "note", "kept?")
    assert store.delete("d-1").deployment_id == "d-1"
    assert store.find("d-1") is None
    conn = raw(store.path)
    left = conn.execute("SELECT COUNT(*) FROM events WHERE deployment_id = 'd-1'").fetchone()
    assert left == (0,)
    assert len(store.events("d-2")) == 1
    with pytest.raises(NotFound):
        store.delete("d-1")


# ---- events -----------------------------------------------------------------


def test_events_order_limit_and_fields(db: Path) -> None:
    with Store.open(db, clock=Clock(1.0, step=1.0)) as s:
        s.insert_deployment(dep())
        for i in range(5):
            s.add_event("d-1", "hello", "Installing dependencies", f"step {i}", n=i, venv="v")
        events = s.events("d-1")
        assert [e["event"] for e in events] == ["accepted"] + ["Installing dependencies"] * 5
        assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
        assert events[-1] == {"ts": 6.0, "event": "Installing dependencies",
                              "message": "step 4", "fields": {"n": 4, "venv": "v"}}
        assert [e["message"] for e in s.events("d-1", limit=2)] == ["step 3", "step 4"]
        assert s.events("unknown") == []
        with pytest.raises(NotFound):
            s.add_event("unknown", "hello", "x")
        s.add_event(None, "stray", "unknown unit", "par-agent@stray.service is not ours")


# ---- API record -------------------------------------------------------------


def test_to_api_is_the_documented_record_with_env_redacted(store: Store) -> None:
    request = {"deploymentId": "d-1", "agentAppId": "hello", "orgId": "org",
               "version": "1.0.0", "packageUrl": "https://example.test/hello.apkg",
               "env": {"API_KEY": "s3cret-value", "MODE": "prod"}}
    d, _ = store.insert_deployment(dep(request=request, env=request["env"]))
    record = store.get("d-1").to_api()
    assert set(record) == {"deploymentId", "agentAppId", "orgId", "version", "status",
                           "current", "desiredState", "error", "unit", "venv", "venvReused",
                           "packageDigest", "ports", "phases", "createdAt", "updatedAt", "request"}
    assert record["request"]["env"] == {"API_KEY": "***", "MODE": "***"}
    assert record["request"]["packageUrl"] == request["packageUrl"]
    assert (record["error"], record["current"], record["status"]) == (None, False, "pending")
    assert "s3cret-value" not in repr(record)
    # The real values are kept apart, for re-creating the unit after a reboot.
    got = store.get("d-1")
    assert got.env == {"API_KEY": "s3cret-value", "MODE": "prod"}
    assert got.full_request() == request
    stored = raw(store.path).execute(
        "SELECT request_json, env_json FROM deployments").fetchone()
    assert "s3cret-value" not in stored[0] and "s3cret-value" in stored[1]
    # Mutating the caller's dict later does not reach the record.
    request["env"]["API_KEY"] = "changed"
    assert d.env["API_KEY"] == "s3cret-value"


def test_request_without_env_has_no_env_in_the_record() -> None:
    d = dep(request={"deploymentId": "d-1"})
    assert "env" not in d.to_api()["request"] and d.full_request() == {"deploymentId": "d-1"}
    assert dep(request={"env": {}}).full_request() == {"env": {}}


# ---- concurrency and crashes ------------------------------------------------


def test_eight_threads_fifty_writes_each_all_land(store: Store) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(50):
                store.insert_deployment(dep(f"t{t}-{i}", f"agent{t}"))
                store.add_event(f"t{t}-{i}", f"agent{t}", "note", n=i)
        except BaseException as exc:  # collected: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(store.deployments()) == 400
    conn = raw(store.path)
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (800,)


def test_separate_connections_lose_no_read_modify_write(db: Path) -> None:
    # Four connections (as four processes would) add phases to one deployment:
    # each start_phase reads phases_json and writes it back.
    Store.open(db).close()
    stores = [Store.open(db) for _ in range(4)]
    stores[0].insert_deployment(dep())
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(15):
                stores[n].start_phase("d-1", f"p{n}-{i}", "loading")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(stores[0].get("d-1").phases) == 60
    for s in stores:
        s.close()


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from par.store import Deployment, Store

    store = Store.open(Path(sys.argv[2]))
    prefix = sys.argv[3]
    i = 0
    while True:
        did, agent = f"{prefix}-{i}", f"agent{i % 3}"
        store.insert_deployment(Deployment(did, agent, "1.0", "https://x.test/a.apkg",
                                           request={"env": {"K": "***"}, "pad": "p" * 2000},
                                           env={"K": "v" * 200}))
        store.start_phase(did, "downloading", "downloading")
        store.end_phase(did, "downloading")
        if i % 2:
            store.fail(did, "boom", "it broke")
        else:
            store.set_current(agent, did)
        print(i, flush=True)
        i += 1
""")


def check_consistent(s: Store) -> int:
    """Every row agrees with the events written in the same transactions; returns the count."""
    deployments = s.deployments()
    for d in deployments:
        kinds = [e["event"] for e in s.events(d.deployment_id)]
        assert kinds[0] == "accepted", d
        assert d.env == {"K": "v" * 200} and len(d.request["pad"]) == 2000
        if "downloading" in d.phases:
            assert "phase_started" in kinds and d.status in ("downloading", "failed")
            if d.phases["downloading"]["end"] is not None:
                assert "phase_ended" in kinds
        else:
            assert kinds == ["accepted"] and d.status == "pending"
        assert (d.status == "failed") == ("failed" in kinds)
        assert d.current == (kinds[-1] == "current")
    agents = [d.agent_app_id for d in s.currents()]
    assert len(agents) == len(set(agents))
    orphans = raw(s.path).execute(
        "SELECT COUNT(*) FROM events WHERE deployment_id NOT IN"
        " (SELECT deployment_id FROM deployments)").fetchone()
    assert orphans == (0,)
    return len(deployments)


def test_kill_9_mid_write_leaves_a_consistent_store(db: Path) -> None:
    Store.open(db).close()
    rng = random.Random(9)
    total = 0
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(db), f"r{round_}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(10):  # let it get going, then kill it at a random moment
                assert child.stdout.readline(), child.stderr.read()
            time.sleep(rng.uniform(0, 0.02))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        with Store.open(db) as s:  # open runs quick_check
            assert raw(db).execute("PRAGMA quick_check").fetchone() == ("ok",)
            count = check_consistent(s)
        assert count >= total + 10
        total = count
