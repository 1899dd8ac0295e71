"""Load: 30 deploys sent at once across 10 agentAppIds with overlapping requirements,
while a client polls GET /deployments 20 times a second.

The run happens once (module fixture `run`); each test checks one property of it.
Each agent gets three versions: 1.0.0 and 1.0.1 with the same requirements (one
venv, built once, then reused) and 1.0.2 with one more package (a second venv).
The requirements overlap across agents (a common package, three shared ones with
dependencies, tiny wheels in a local find-links folder), so builds run in
parallel against one uv cache.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
import pytest

from par.client import ApiError, DaemonUnreachable
from par.units import Systemd
from tests.integration import agents
from tests.integration.conftest import wait_for
from tests.integration.pard import Pard, apkg_with, running_pard, temp_leftovers
from tests.reliability_cases import (
    Case,
    Table,
    http_get,
    journal_since,
    json_body,
    main_pid,
    measure,
    raw_request,
    wait_status,
)
from tests.wheels import build_wheel

AGENTS = [f"ld-{i:02d}" for i in range(10)]
VERSIONS = ("1.0.0", "1.0.1", "1.0.2")
TERMINAL = ("healthy", "failed", "stopped")
MIB = 1024 * 1024
RSS_LIMIT = 300 * MIB  # generous: pard idles at a few tens of MiB
POLL_HZ = 20.0

TABLE = Table(
    key="load",
    title="Load",
    intro="30 `POST /deploy` sent at once (30 client threads) for 10 agentAppIds, three "
          "versions each, with overlapping requirements, while another client polls "
          "`GET /deployments` 20 times a second and pard's RSS is sampled 4 times a second.",
    module=__name__,
    cases=(
        Case("thirty-deploys", "30 deploys at once across 10 agents",
             "all 30 accepted (202); every deploy ends healthy (the older versions then "
             "`stopped`, replaced) or failed with a reason; each agent ends with one current, "
             "healthy deployment answering /health"),
        Case("store-complete", "the store after the run",
             "every record is listed, with its phases and events: accepted, downloading, "
             "loading, starting, a venv event, `Agent subprocess started`"),
        Case("venv-once-per-hash", "the venvs of the run (two requirement sets per agent)",
             "20 venvs, each built exactly once (events and pard's journal); the second "
             "version with the same requirements reused it"),
        Case("poll-during-load", "`GET /deployments` 20 times a second during the run",
             "no error; latency printed"),
        Case("rss-bounded", "pard's RSS (psutil, MainPID of par.service) during the run",
             f"stays below {RSS_LIMIT // MIB} MiB; printed"),
        Case("purge-all-at-once", "after the run, all 30 deployments removed with purge, "
             "all requests at once (30 client threads)",
             "all answered 200; no unit, venv, layer of installed packages or temporary "
             "folder left (agents sharing a layer remove it together without failing)"),
        Case("twenty-agents", "20 different agents deployed at once",
             "all healthy, 20 distinct REST ports, events recorded",
             "tests/integration/test_pard.py::test_twenty_deploys_at_once"),
        Case("one-agent-races", "6 deploys, 3 restarts and 3 removals of one agent, all at "
             "once from 6 threads",
             "no 5xx; every deployment ends in a final status; at most one current; its unit "
             "runs exactly when a current deployment should, with that deployment's id (no "
             "orphan unit); a purge of all of them leaves no unit and no file of the agent"),
        Case("deleted-queued-deploys", "50 deploys of different agents at once, 25 of them "
             "deleted right after their 202",
             "no deleted deploy ends healthy or current; none of their units runs; the others "
             "are listed (attack 7)",
             "tests/integration/test_attacks.py::test_attack_7_deleted_queued_deploys_stay_deleted"),
    ),
)


def requirements(index: int, version: str) -> str:
    """Overlapping sets: all need rlcommon, agents share rlshared-{a,b,c}; 1.0.2 adds rlextra."""
    shared = "abc"[index % 3]
    text = f"rlcommon\nrlshared-{shared}\n"
    return text + "rlextra\n" if version == "1.0.2" else text


@dataclass
class LoadRun:
    """What the run recorded."""

    sent: dict[str, tuple[str, str]]  # deploymentId -> (agent, version)
    answers: Counter = field(default_factory=Counter)
    final: dict[str, dict] = field(default_factory=dict)
    polls: Counter = field(default_factory=Counter)
    poll_errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    rss_idle: int = 0
    seconds: float = 0.0
    journal: str = ""


def _poll(pard: Pard, run: LoadRun, stop: threading.Event) -> None:
    client = pard.client(timeout=10)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            client.deployments()
            run.polls["ok"] += 1
            run.latencies.append(time.monotonic() - t0)
        except (ApiError, DaemonUnreachable) as exc:
            run.polls["error"] += 1
            run.poll_errors.append(f"{exc.code}: {exc.message}")
        stop.wait(max(0.0, 1 / POLL_HZ - (time.monotonic() - t0)))


def _sample_rss(pid: int, run: LoadRun, stop: threading.Event) -> None:
    proc = psutil.Process(pid)
    while not stop.wait(0.25):
        run.rss.append(proc.memory_info().rss)


@pytest.fixture(scope="module")
def pard() -> Iterator[Pard]:
    with running_pard("ld", {"agents": {"boot_timeout_s": 90}}, tcp=False) as p:
        yield p


@pytest.fixture(scope="module")
def run(pard: Pard) -> LoadRun:
    build_wheel(pard.local_packages, "rlcommon", "1.0")
    for shared in "abc":
        build_wheel(pard.local_packages, f"rlshared-{shared}", "1.0", requires=["rlcommon"])
    build_wheel(pard.local_packages, "rlextra", "1.0", requires=["rlshared-a"])
    bodies = []
    for i, agent in enumerate(AGENTS):
        for version in VERSIONS:
            apkg = apkg_with(pard.root / "apkg",
                             agents.with_requirements(agent, requirements(i, version), version))
            bodies.append({"deploymentId": f"{agent}-{version.replace('.', '-')}",
                           "agentAppId": agent, "orgId": "org-load", "version": version,
                           "packageUrl": f"file://{apkg}"})
    result = LoadRun(sent={b["deploymentId"]: (b["agentAppId"], b["version"]) for b in bodies})
    pid = pard.main_pid()
    _, cursor = journal_since("par.service")  # pard's journal of this run only
    result.rss_idle = psutil.Process(pid).memory_info().rss
    stop = threading.Event()
    threads = [threading.Thread(target=_poll, args=(pard, result, stop), daemon=True),
               threading.Thread(target=_sample_rss, args=(pid, result, stop), daemon=True)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:  # all 30 requests at once
            answers = list(pool.map(lambda b: raw_request(
                "POST", "/deploy", json_body(b), headers={"Idempotency-Key": b["deploymentId"]}),
                bodies))
        result.answers.update(a.status for a in answers)
        for did in result.sent:
            result.final[did] = wait_status(pard.client(), did, TERMINAL, timeout=600)
        # a deployment replaced after it was read as healthy is read again
        result.final = {did: pard.client().deployment(did) for did in result.sent}
    finally:
        result.seconds = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join(timeout=30)
    result.journal, _ = journal_since("par.service", cursor)
    return result


def _events(pard: Pard, did: str) -> list[dict]:
    return pard.client().events(did)["events"]


def test_thirty_deploys(pard: Pard, run: LoadRun) -> None:
    statuses = Counter(d["status"] for d in run.final.values())
    measure("30 deploys, 10 agents, 20 venvs", f"all terminal after {run.seconds:.1f} s; "
            f"answers {dict(run.answers)}; statuses {dict(statuses)}")
    assert run.answers == Counter({202: 30})
    for d in run.final.values():
        assert d["status"] in ("healthy", "stopped") or (
            d["status"] == "failed" and d["error"]["code"] and d["error"]["message"]), d
    failed = {did: d["error"] for did, d in run.final.items() if d["status"] == "failed"}
    assert not failed, failed  # nothing in this run has a reason to fail
    for agent in AGENTS:
        current = [d for d in run.final.values() if d["agentAppId"] == agent and d["current"]]
        assert len(current) == 1, (agent, current)
        assert current[0]["status"] == "healthy"
        assert main_pid(f"par-agent@{agent}.service") != 0
        status, body = http_get(current[0]["ports"]["rest"])
        assert status == 200 and json.loads(body)["ok"] is True, (agent, status, body)


def test_store_complete(pard: Pard, run: LoadRun) -> None:
    listed = {d["deploymentId"]: d for d in pard.client().deployments()["deployments"]}
    assert set(run.sent) <= set(listed)
    total = 0
    for did in run.sent:
        d = listed[did]
        assert set(d["phases"]) == {"downloading", "loading", "starting"}, d["phases"]
        assert all(p["seconds"] is not None for p in d["phases"].values()), d["phases"]
        names = [e["event"] for e in _events(pard, did)]
        total += len(names)
        assert names[0] == "accepted", names
        assert {"phase_started", "phase_ended", "Package ready",
                "Agent subprocess started"} <= set(names), names
        assert ("Venv built" in names) != ("Reusing existing venv" in names), names
    measure("events in the store for the 30 deployments", total)


def test_venv_once_per_hash(pard: Pard, run: LoadRun) -> None:
    built: Counter = Counter()
    reused: Counter = Counter()
    for did in run.sent:
        for e in _events(pard, did):
            if e["event"] == "Venv built":
                built[e["fields"]["venv"]] += 1
            elif e["event"] == "Reusing existing venv":
                reused[e["fields"]["venv"]] += 1
    logged: Counter = Counter()
    for line in run.journal.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "Venv built" and entry.get("venv", "").startswith("ld-"):
            logged[entry["venv"]] += 1
    measure("venvs", f"{len(built)} built once each, {sum(reused.values())} reuses")
    assert len(built) == 20, built
    assert set(built.values()) == {1}, built
    assert logged == built, (logged, built)
    assert sum(reused.values()) == 10, reused  # 1.0.0 and 1.0.1 share their venv
    for agent in AGENTS:
        mine = {d["venv"] for d in run.final.values() if d["agentAppId"] == agent}
        assert len(mine) == 2, (agent, mine)


def test_poll_during_load(run: LoadRun) -> None:
    lat = sorted(run.latencies)
    p50, p99 = (1000 * lat[min(len(lat) - 1, int(q * len(lat)))] for q in (0.5, 0.99))
    measure("GET /deployments during the run",
            f"{run.polls['ok']} answers, {run.polls['error']} errors; latency p50 {p50:.0f} ms, "
            f"p99 {p99:.0f} ms, max {1000 * lat[-1]:.0f} ms")
    assert not run.poll_errors, run.poll_errors[:5]
    # at 20/s for the whole run, minus the time answers took
    assert run.polls["ok"] >= 0.5 * POLL_HZ * run.seconds * 0.5, (run.polls, run.seconds)


def test_rss_bounded(pard: Pard, run: LoadRun) -> None:
    after = psutil.Process(pard.main_pid()).memory_info().rss
    peak = max(run.rss, default=0)
    measure("pard RSS", f"idle {run.rss_idle / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB during "
            f"the run, {after / MIB:.0f} MiB after ({len(run.rss)} samples)")
    assert run.rss, "no RSS sample"
    assert peak < RSS_LIMIT, peak


def test_one_agent_races(pard: Pard) -> None:
    agent = "ld-race"
    client = pard.client(timeout=120)
    apkgs = [(f"2.0.{i}", apkg_with(pard.root / "apkg", {
        "agent.yaml": agents.manifest(agent, f"2.0.{i}"),
        "src/main.py": "def handler(ctx):\n    return {}\n"})) for i in range(3)]
    first = pard.deploy(agent, apkgs[0][1], version=apkgs[0][0])
    assert first["status"] == "healthy", first

    def deploy(i: int) -> str:
        version, apkg = apkgs[i % 3]
        return pard.deploy(agent, apkg, version=version, wait=False)["deploymentId"]

    def act(name: str) -> str:
        try:
            if name == "rm":
                client.delete(agent)
            else:
                client.action(agent, name)
            return "ok"
        except ApiError as err:  # not current / not found meanwhile: refused, not broken
            assert err.status < 500, err
            return err.code

    ops = [lambda i=i: deploy(i) for i in range(6)] + \
        [lambda: act("restart")] * 3 + [lambda: act("rm")] * 3
    order = [0, 6, 9, 1, 7, 2, 10, 3, 8, 4, 11, 5]  # interleaved, the same every run
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda k: ops[k](), order))
    measure("one agent, 12 operations at once", f"outcomes {Counter(outcomes)}")

    def settled() -> list[dict] | None:
        rows = client.deployments(agent)["deployments"]
        return rows if all(r["status"] in (*TERMINAL, "removed") for r in rows) else None

    rows = wait_for(settled, timeout=180)
    current = [r for r in rows if r["current"]]
    assert len(current) <= 1, current
    st = Systemd().status(f"par-agent@{agent}.service")
    running = st.active_state in ("active", "activating", "reloading")
    should = bool(current) and current[0]["desiredState"] == "running" \
        and current[0]["status"] == "healthy"
    assert running == should, (st, current)
    if running:
        env = Systemd().property(st.name, "Service", "Environment") or []
        ids = [bytes(x).decode() for x in env if bytes(x).startswith(b"DEPLOYMENT_ID=")]
        assert ids == [f"DEPLOYMENT_ID={current[0]['deploymentId']}"], ids
    for r in rows:
        client.delete(r["deploymentId"], purge=True)
    assert not Systemd().status(f"par-agent@{agent}.service").exists
    for folder in ("packages", "extracted", "venvs"):
        left = sorted(p.name for p in (pard.state / folder).glob(f"{agent}[@_]*"))
        assert left == [], (folder, left)


def test_purge_all_at_once(pard: Pard, run: LoadRun) -> None:
    """Last in the module: it removes what the run deployed."""
    current = {d["agentAppId"] for d in run.final.values() if d["status"] == "healthy"}
    assert sorted(current) == AGENTS, current
    venvs = pard.state / "venvs"
    assert list((venvs / ".layers").iterdir())  # the run's layers, shared across agents
    with ThreadPoolExecutor(len(run.sent)) as pool:
        answers = list(pool.map(lambda did: raw_request("DELETE", f"/deployments/{did}?purge=true"),
                                run.sent))
    assert [a.status for a in answers] == [200] * len(run.sent), [a.body for a in answers]
    assert not [p.name for p in venvs.iterdir() if p.name.startswith("ld-")]
    assert not list((venvs / ".layers").iterdir())
    assert temp_leftovers(pard.state) == []
    for agent in AGENTS:
        assert not Systemd().status(f"par-agent@{agent}.service").exists, agent
