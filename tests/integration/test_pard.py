"""pard as par.service under real systemd: deploys over the socket and TCP, redeploys,
restarts of the daemon, "reboots", kill -9 in every phase, concurrency."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import urllib.error
import urllib.request
import uuid

import pytest

from par.client import ApiError
from par.store import IN_FLIGHT
from par.units import SOCKET_SUFFIX, Systemd
from par.venvs import linked_layer
from tests.wheels import build_hanging_sdist, build_wheel

from . import agents
from .conftest import wait_for
from .pard import TEST_TOKEN, Pard, agent_get, apkg_with, serve_files, sh, temp_leftovers

TOKEN = TEST_TOKEN


def tcp_post(pard: Pard, path: str, body: dict, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(pard.tcp_url + path, data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")




def body(agent: str, url: str, version: str = "1.0.0", **extra) -> dict:
    return {"deploymentId": f"{agent}-{uuid.uuid4().hex[:8]}", "agentAppId": agent,
            "orgId": "org", "version": version, "packageUrl": url, **extra}


def events(pard: Pard, deployment_id: str) -> list[str]:
    return [e["event"] for e in pard.client().events(deployment_id)["events"]]


def unit_pid(agent: str) -> int:
    return Systemd().status(f"par-agent@{agent}.service").main_pid


def kill9_pard(pard: Pard) -> None:
    """SIGKILL pard; systemd restarts it (Restart=on-failure); wait until it answers."""
    old = pard.main_pid()
    os.kill(old, signal.SIGKILL)

    def back() -> bool:
        pid = pard.main_pid()
        if pid in (0, old):
            return False
        try:
            pard.client(timeout=2).daemon_health()
            return True
        except Exception:
            return False

    wait_for(back, timeout=60, interval=0.2)


def test_hello_agent_deploys_healthy(pard: Pard) -> None:
    d = pard.deploy("hello", pard.pack("hello-agent"))
    assert d["status"] == "healthy", json.dumps(d, indent=1) + pard.journal()
    assert d["current"] is True
    assert set(d["phases"]) >= {"downloading", "loading", "starting"}
    code, raw = agent_get(d["ports"]["rest"], "/health")
    assert code == 200 and json.loads(raw)["ok"] is True
    assert "Agent subprocess started" in events(pard, d["deploymentId"])
    assert "Agent subprocess started" in pard.journal()


def test_tcp_needs_the_token_and_refuses_file_urls(pard: Pard) -> None:
    apkg = pard.pack("hello-agent")
    with serve_files(apkg.parent) as base:
        code, err = tcp_post(pard, "/deploy", body("tcp-agent", f"{base}/{apkg.name}"), token=None)
        assert code == 401 and err["error"]["code"] == "unauthorized"
        code, err = tcp_post(pard, "/deploy", body("tcp-agent", f"{base}/{apkg.name}"),
                             token="wrong")
        assert code == 401
        # no side effect
        assert not pard.client().deployments(agent_app_id="tcp-agent")["deployments"]
        code, err = tcp_post(pard, "/deploy", body("tcp-agent", f"file://{apkg}"))
        assert code == 403 and err["error"]["field"] == "packageUrl"
        b = body("tcp-agent", f"{base}/{apkg.name}")
        code, ok = tcp_post(pard, "/deploy", b)
        assert code == 202 and ok["deploymentId"] == b["deploymentId"]
        assert pard.wait(b["deploymentId"])["status"] == "healthy"
        # the same request again: the existing record, nothing rebuilt
        code, again = tcp_post(pard, "/deploy", b)
        assert code == 200 and again["deployment"]["deploymentId"] == b["deploymentId"]
        code, err = tcp_post(pard, "/deploy", {**b, "version": "2.0.0"})
        assert code == 409 and err["error"]["code"] == "conflict"


def test_redeploy_reuses_venv_and_new_requirements_build_a_new_one(pard: Pard) -> None:
    build_wheel(pard.local_packages, "partiny", "1.0")
    build_wheel(pard.local_packages, "partwo", "1.0")
    first = pard.deploy("reuser", apkg_with(pard.root / "apkg",
                                            agents.with_requirements("reuser", "partiny\n")))
    assert first["status"] == "healthy", first
    assert first["venvReused"] is False
    second = pard.deploy("reuser", apkg_with(pard.root / "apkg", agents.with_requirements(
        "reuser", "partiny\n", version="1.0.1")), version="1.0.1")
    assert second["status"] == "healthy"
    assert second["venvReused"] is True and second["venv"] == first["venv"]
    assert "Reusing existing venv" in pard.journal()
    assert second["phases"]["loading"]["seconds"] < first["phases"]["loading"]["seconds"]
    third = pard.deploy("reuser", apkg_with(pard.root / "apkg", agents.with_requirements(
        "reuser", "partiny\npartwo\n", version="1.0.2")), version="1.0.2")
    assert third["status"] == "healthy" and third["venv"] != first["venv"]
    assert third["ports"] == first["ports"]  # a new deployment takes over the agent's ports
    assert pard.client().deployment(first["deploymentId"])["current"] is False


def test_agents_with_the_same_requirements_share_a_layer_until_the_last_is_purged(
        pard: Pard) -> None:
    build_wheel(pard.local_packages, "parshared", "1.0")
    files = {name: agents.with_requirements(name, "parshared\n") for name in ("lay-a", "lay-b")}
    a = pard.deploy("lay-a", apkg_with(pard.root / "apkg", files["lay-a"]))
    b = pard.deploy("lay-b", apkg_with(pard.root / "apkg", files["lay-b"]))
    assert a["status"] == b["status"] == "healthy", (a, b)
    assert a["venv"] != b["venv"]  # each agent its own venv ...
    layer = linked_layer(pard.state / "venvs" / a["venv"])
    assert layer is not None and layer == linked_layer(pard.state / "venvs" / b["venv"])
    assert "Reusing installed packages" in pard.journal()  # ... one install
    # the layer is bound into each agent's sandbox, read-only: the agent imports from it
    env = sh("systemctl", "show", "-p", "BindReadOnlyPaths", "par-agent@lay-b.service").stdout
    assert str(layer) in env, env
    pard.client().delete(a["deploymentId"], purge=True)
    assert layer.is_dir() and not (pard.state / "venvs" / a["venv"]).exists()
    # the remaining agent is unaffected and still starts from the layer
    restarted = pard.client().action(b["deploymentId"], "restart")
    assert restarted["status"] == "healthy", restarted
    pard.client().delete(b["deploymentId"], purge=True)
    assert not layer.exists()  # gone with the last venv linking it


def test_a_waiting_get_follows_a_deploy_change_by_change(pard: Pard) -> None:
    res = pard.deploy("waiter", pard.pack("hello-agent"), wait=False)
    client = pard.client()
    record = client.deployment(res["deploymentId"])
    seen = [record["status"]]
    while record["status"] not in ("healthy", "failed"):
        changed = client.deployment(res["deploymentId"], wait=30, since=record["updatedAt"])
        assert changed["updatedAt"] != record["updatedAt"]  # answered because it changed
        record = changed
        seen.append(record["status"])
    assert record["status"] == "healthy", (seen, record)
    # a record that does not change is held for the wait, then answered as it is
    t0 = time.monotonic()
    same = client.deployment(res["deploymentId"], wait=0.5)
    assert same["updatedAt"] == record["updatedAt"] and time.monotonic() - t0 >= 0.5
    assert client.deployment("waiter", wait=0.2)["deploymentId"] == res["deploymentId"]


def test_bad_version_over_a_healthy_one_leaves_the_old_one_serving(pard: Pard) -> None:
    good = pard.deploy("steady", apkg_with(pard.root / "apkg", agents.probe("steady")))
    assert good["status"] == "healthy"
    bad = pard.deploy("steady", apkg_with(pard.root / "apkg", agents.import_error("steady")),
                      version="2.0.0")
    assert bad["status"] == "failed" and "no_such_module_par_test" in bad["error"]["message"]
    cur = pard.client().deployment("steady")
    assert cur["deploymentId"] == good["deploymentId"] and cur["current"] is True
    assert Systemd().status("par-agent@steady.service").active_state == "active"
    assert agent_get(good["ports"]["rest"], "/health")[0] == 200
    # a failure before starting (bad requirement) never touches the running agent
    pid = unit_pid("steady")
    worse = pard.deploy("steady", apkg_with(pard.root / "apkg", agents.with_requirements(
        "steady", "no-such-package-par==9.9\n", version="3.0.0")), version="3.0.0")
    assert worse["status"] == "failed" and "no-such-package-par" in worse["error"]["message"]
    assert unit_pid("steady") == pid


def test_restart_of_pard_keeps_agents_running(pard: Pard) -> None:
    ids = ["keep-a", "keep-b", "keep-c"]
    for agent in ids:
        d = pard.deploy(agent, apkg_with(pard.root / "apkg", agents.probe(agent)))
        assert d["status"] == "healthy", d
    pids = {a: unit_pid(a) for a in ids}
    pard.restart()
    assert pard.client().daemon_health()["ok"] is True
    assert {a: unit_pid(a) for a in ids} == pids
    pard.stop()
    assert {a: unit_pid(a) for a in ids} == pids  # stopping pard stops no agent
    pard.start()
    assert {a: unit_pid(a) for a in ids} == pids
    assert "Adopted running agent" in pard.journal()


def test_reboot_recreates_agents_on_their_ports(pard: Pard) -> None:
    d = pard.deploy("survivor", apkg_with(pard.root / "apkg", agents.probe("survivor")))
    assert d["status"] == "healthy"
    pard.stop()
    # what a reboot does to transient units: they are gone (sockets too)
    for unit in Systemd().list_agent_units(SOCKET_SUFFIX) + Systemd().list_agent_units():
        sh("systemctl", "stop", unit, check=False)
        sh("systemctl", "reset-failed", unit, check=False)
    assert not Systemd().status("par-agent@survivor.service").exists
    pard.start()  # READY only after reconcile re-created them
    assert Systemd().status("par-agent@survivor.service").active_state == "active"
    assert agent_get(d["ports"]["rest"], "/health")[0] == 200
    after = pard.client().deployment("survivor")
    assert after["status"] == "healthy" and after["ports"] == d["ports"]


def test_kill9_while_downloading(pard: Pard) -> None:
    apkg = pard.pack("hello-agent")
    with serve_files(apkg.parent, slow_s=30) as base:
        b = body("dl-victim", f"{base}/slow/{apkg.name}")
        pard.client().deploy(b)
        wait_for(lambda: pard.client().deployment(b["deploymentId"])["status"] == "downloading")
        kill9_pard(pard)
    d = pard.client().deployment(b["deploymentId"])
    assert d["status"] == "failed" and d["error"]["code"] == "interrupted"
    assert temp_leftovers(pard.state) == []
    assert pard.deploy("dl-victim", apkg)["status"] == "healthy"


def test_kill9_while_building_the_venv(pard: Pard) -> None:
    build_hanging_sdist(pard.local_packages, "parhang", "1.0")
    apkg = apkg_with(pard.root / "apkg", agents.with_requirements("build-victim", "parhang\n"))
    res = pard.deploy("build-victim", apkg, wait=False)
    wait_for(lambda: pard.client().deployment(res["deploymentId"])["status"] == "loading")
    # the installer runs in the temporary folder of the requirements' new layer
    wait_for(lambda: list((pard.state / "venvs" / ".layers").glob(".tmp-*")), timeout=30)
    time.sleep(0.5)  # the installer is running
    kill9_pard(pard)
    d = pard.client().deployment(res["deploymentId"])
    assert d["status"] == "failed" and d["error"]["code"] == "interrupted"
    assert temp_leftovers(pard.state) == []
    assert not [p for p in (pard.state / "venvs").iterdir() if p.name.startswith("build-victim")]
    # no half-built layer: every layer is one a venv links
    venvs = [p for p in (pard.state / "venvs").iterdir() if not p.name.startswith(".")]
    linked = {layer.name for v in venvs if (layer := linked_layer(v)) is not None}
    assert {p.name for p in (pard.state / "venvs" / ".layers").iterdir()} <= linked
    ok = pard.deploy("build-victim", apkg_with(pard.root / "apkg", agents.probe("build-victim")))
    assert ok["status"] == "healthy"


def test_kill9_while_starting(pard: Pard) -> None:
    apkg = apkg_with(pard.root / "apkg", agents.slow_start("start-victim", 20))
    res = pard.deploy("start-victim", apkg, wait=False)
    wait_for(lambda: pard.client().deployment(res["deploymentId"])["status"] == "starting",
             timeout=60)
    kill9_pard(pard)
    d = pard.client().deployment(res["deploymentId"])
    assert d["status"] == "failed" and d["error"]["code"] == "interrupted"
    assert not Systemd().status("par-agent@start-victim.service").exists
    ok = pard.deploy("start-victim", apkg_with(pard.root / "apkg", agents.probe("start-victim")))
    assert ok["status"] == "healthy"


def test_store_is_consistent_after_the_kills(pard: Pard) -> None:
    # Its own kill -9 (a deploy starting, another agent serving), so that the store holds
    # something to check also when this test runs alone; after the three tests above,
    # their deployments are checked too.
    steady = pard.deploy("store-steady", apkg_with(pard.root / "apkg",
                                                   agents.probe("store-steady")))
    assert steady["status"] == "healthy", steady
    victim = pard.deploy("store-victim", apkg_with(pard.root / "apkg",
                                                   agents.slow_start("store-victim", 20)),
                         wait=False)["deploymentId"]
    wait_for(lambda: pard.client().deployment(victim)["status"] == "starting", timeout=60)
    kill9_pard(pard)

    db = sqlite3.connect(f"file:{pard.state / 'state' / 'par.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        marks = ", ".join("?" for _ in IN_FLIGHT)
        in_flight = db.execute(f"SELECT deployment_id, status FROM deployments WHERE status IN "
                               f"({marks})", IN_FLIGHT).fetchall()
        assert in_flight == []
        dup = db.execute("SELECT agent_app_id, count(*) FROM deployments WHERE current = 1 "
                         "GROUP BY agent_app_id HAVING count(*) > 1").fetchall()
        assert dup == []

        def row(deployment_id: str) -> tuple:
            return db.execute("SELECT status, error_code, current FROM deployments "
                              "WHERE deployment_id = ?", (deployment_id,)).fetchone()

        # the kill interrupted one deploy and left the serving one as it was
        assert row(victim) == ("failed", "interrupted", 0)
        assert row(steady["deploymentId"]) == ("healthy", None, 1)
    finally:
        db.close()


def test_twenty_deploys_at_once(pard: Pard) -> None:
    apkgs = {f"many-{i:02d}": apkg_with(pard.root / "apkg", agents.probe(f"many-{i:02d}"))
             for i in range(20)}
    sent = {}
    for agent, apkg in apkgs.items():
        sent[agent] = pard.deploy(agent, apkg, wait=False)["deploymentId"]
    results = {agent: pard.wait(did, timeout=300) for agent, did in sent.items()}
    bad = {a: d["error"] for a, d in results.items() if d["status"] != "healthy"}
    assert not bad
    ports = [d["ports"]["rest"] for d in results.values()]
    assert len(set(ports)) == 20
    for did in sent.values():
        evs = events(pard, did)
        assert "Agent subprocess started" in evs and len(evs) >= 5


def test_unknown_ids_are_404(pard: Pard) -> None:
    with pytest.raises(ApiError) as exc:
        pard.client().deployment("no-such-agent")
    assert exc.value.status == 404


def test_status_line_and_metrics(pard: Pard) -> None:
    out = sh("systemctl", "status", "par.service", "--no-pager", check=False).stdout
    assert "agent(s) healthy" in out, out
    metrics = pard.client().metrics()
    assert 'par_deployments{status="healthy"}' in metrics
    for name in ("par_venv_builds_total", "par_venv_hits_total", "par_deploys_total"):
        assert name in metrics


def test_bad_config_is_refused_naming_the_key(pard: Pard) -> None:
    good = pard.config_path.read_text()
    pard.stop()
    try:
        pard.config_path.write_text(good + "bogus_section: 1\ninstaller_extra: {}\n")
        res = sh("systemctl", "start", "par.service", check=False, timeout=60)
        assert res.returncode != 0
        wait_for(lambda: "bogus_section" in pard.journal(lines=20))
        show = sh("systemctl", "show", "par.service", "-p", "ExecMainStatus", "-p", "ActiveState",
                  "-p", "NRestarts").stdout
        assert "ExecMainStatus=2" in show and "ActiveState=failed" in show
        assert "NRestarts=0" in show  # RestartPreventExitStatus=2: no restart loop
        pard.config_path.write_text(good.replace("timeout_s: 120", "timeout_s: soon"))
        sh("systemctl", "reset-failed", "par.service", check=False)
        assert sh("systemctl", "start", "par.service", check=False, timeout=60).returncode != 0
        wait_for(lambda: "installer.timeout_s" in pard.journal(lines=20))
    finally:
        pard.config_path.write_text(good)
        sh("systemctl", "reset-failed", "par.service", check=False)
        pard.start()
    assert pard.client().daemon_health()["ok"] is True
