"""Faults under a running pard: a restart under load, an agent leaking memory, corrupted
venvs, deleted package files, and a store that is corrupted or locked.

kill -9 of pard in each phase, "reboots", crash loops and SIGTERM-ignoring agents are
proven in test_pard.py and test_agents.py; TABLE lists them too, naming those tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from par.client import ApiError, DaemonUnreachable
from par.store import Deployment, Store
from tests.integration import agents
from tests.integration.pard import Pard, apkg_with, new_root, running_pard, sh, temp_leftovers
from tests.reliability_cases import (
    Case,
    Resident,
    Table,
    journal_since,
    main_pid,
    measure,
    retry_until,
    wait_status,
)
from tests.wheels import build_hanging_sdist, build_wheel

PARD_TESTS = "tests/integration/test_pard.py"
AGENT_TESTS = "tests/integration/test_agents.py"
TERMINAL = ("healthy", "failed", "stopped")

TABLE = Table(
    key="faults",
    title="Faults",
    intro="Things that break while pard runs: the daemon killed or restarted in the middle of "
          "work, agents that crash, leak or ignore SIGTERM, files under PAR's folders damaged "
          "or deleted, and a store pard must not touch. A row naming another test module is "
          "proven there (those tests came with the deploy pipeline); `scripts/reliability-doc` "
          "runs them in the same run as the rest.",
    module=__name__,
    cases=(
        Case("kill9-downloading", "`kill -9` of pard while a package downloads",
             "systemd restarts pard; the deploy is failed `interrupted`; no partial file; "
             "deploying again works", f"{PARD_TESTS}::test_kill9_while_downloading"),
        Case("kill9-building", "`kill -9` of pard while the installer builds a venv",
             "deploy failed `interrupted`; no half-built venv (temp folder removed at start); "
             "deploying again works", f"{PARD_TESTS}::test_kill9_while_building_the_venv"),
        Case("kill9-starting", "`kill -9` of pard while the agent starts",
             "deploy failed `interrupted`; the half-started unit is stopped",
             f"{PARD_TESTS}::test_kill9_while_starting"),
        Case("store-after-kills", "the store after the three kills",
             "`PRAGMA quick_check` ok; nothing left in flight; one current deployment per agent",
             f"{PARD_TESTS}::test_store_is_consistent_after_the_kills"),
        Case("restart-par", "`systemctl restart par` and `stop`/`start` with three agents",
             "same MainPIDs: stopping pard stops no agent; they are adopted",
             f"{PARD_TESTS}::test_restart_of_pard_keeps_agents_running"),
        Case("restart-under-load", "`systemctl restart par` while 8 deploys are in flight and "
             "a client polls `GET /deployments` 20 times a second",
             "pard is back within seconds; every deploy ends healthy or failed `interrupted` "
             "(none stuck); failed ones deploy again; the poller sees no 5xx, only a short "
             "window of refused connections; a running agent keeps its MainPID"),
        Case("reboot", "all agent units gone (what a reboot does to transient units)",
             "pard re-creates every agent on its stored ports before READY=1",
             f"{PARD_TESTS}::test_reboot_recreates_agents_on_their_ports"),
        Case("crash-loop", "an agent that exits 1 s after becoming ready, forever",
             "systemd's start limit ends it (`failed`); the other agent keeps its MainPID",
             f"{AGENT_TESTS}::test_crash_loop_ends_failed_and_spares_others"),
        Case("agent-sigkill", "`kill -9` of an agent",
             "systemd restarts it on the same ports",
             f"{AGENT_TESTS}::test_sigkill_restarts_on_same_ports"),
        Case("sigterm-ignored", "an agent that blocks SIGTERM, stopped with stopTimeoutSec 2",
             "SIGKILL after 2 s; `stop` returns in under 8 s",
             f"{AGENT_TESTS}::test_stop_is_fast_and_sigterm_blocker_is_killed"),
        Case("failed-replacement", "a new version whose import fails, then one whose "
             "requirement does not exist, over a healthy agent",
             "both fail with the reason; the old deployment stays current and keeps serving",
             f"{PARD_TESTS}::test_bad_version_over_a_healthy_one_leaves_the_old_one_serving"),
        Case("memory-leak", "an agent (memoryMB 64) allocating 8 MiB every 20 ms",
             "the kernel OOM-kills it at MemoryMax (result `oom-kill`), systemd restarts it; "
             "another agent and pard are untouched (skipped where the cgroup memory controller "
             "is not enforced, e.g. inside the test sandbox)"),
        Case("venv-python-deleted", "`bin/python` of a running agent's venv deleted, then "
             "`POST /deployments/{id}/restart`",
             "the venv fails validation and is rebuilt (\"Invalid venv found, rebuilding\"); "
             "the agent is healthy again with a new MainPID"),
        Case("venv-metadata-broken", "`par-venv.json` of a running agent's venv overwritten "
             "with garbage, then restart", "rebuilt, valid metadata again, healthy"),
        Case("venv-deleted", "a running agent's whole venv deleted, then restart",
             "rebuilt under the same name, healthy"),
        Case("extracted-deleted-restart", "the extracted package of a running agent deleted, "
             "then restart", "refused with `package_missing` naming the folder and the fix "
             "(deploy again); the running agent is left running (same MainPID)"),
        Case("extracted-deleted-redeploy", "the same, then a deploy of the same version",
             "extracted again from the package; healthy"),
        Case("store-garbage", "`state/par.db` is 8 KiB of random bytes",
             "pard refuses to start: exit status 2 (no restart), journal line "
             "`pard refused to start` with `store_corrupt`; the file's bytes unchanged"),
        Case("store-corrupt-page", "a real store with one page overwritten",
             "exit status 2, `store_corrupt` (quick_check), bytes unchanged"),
        Case("store-too-new", "a store whose schema version is 99",
             "exit status 2, `store_too_new` (\"upgrade PAR\"), bytes unchanged"),
        Case("store-locked", "another process holds an exclusive lock on the store",
             "exit status 1 after the 5 s busy timeout (systemd may retry), journal line with "
             "`store_locked` (\"is another pard running?\"); bytes unchanged"),
    ),
)


@pytest.fixture(scope="module")
def pard() -> Iterator[Pard]:
    with running_pard("fl", {"agents": {"boot_timeout_s": 30}}, tcp=False) as p:
        yield p


def probe_agent(pard: Pard, agent: str, requirements: str | None = None, **extra) -> dict:
    files = agents.with_requirements(agent, requirements) if requirements else agents.probe(agent)
    d = pard.deploy(agent, apkg_with(pard.root / "apkg", files), **extra)
    assert d["status"] == "healthy", json.dumps(d, indent=1) + pard.journal()
    return d


def resident_of(d: dict) -> Resident:
    unit = f"par-agent@{d['agentAppId']}.service"
    return Resident(d["agentAppId"], d["deploymentId"], main_pid(unit), d["ports"]["rest"])


# ---------------------------------------------------------------- restart under load


@dataclass
class Poller:
    """Polls GET /deployments at `hz` in a thread; counts answers by kind, keeps latencies."""

    pard: Pard
    hz: float = 20.0
    counts: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    refused_at: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = self.pard.client(timeout=10)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                client.deployments()
                self.counts["ok"] += 1
                self.latencies.append(time.monotonic() - t0)
            except DaemonUnreachable:
                self.counts["unreachable"] += 1
                self.refused_at.append(t0)
            except ApiError as exc:
                self.counts[f"http {exc.status}"] += 1
                self.errors.append(f"{exc.status} {exc.code}: {exc.message}")
            self._stop.wait(max(0.0, 1 / self.hz - (time.monotonic() - t0)))

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def test_restart_under_load(pard: Pard) -> None:
    bystander = resident_of(probe_agent(pard, "fl-bystander"))
    for i in range(4):
        build_wheel(pard.local_packages, f"rlload{i}", "1.0")
    build_hanging_sdist(pard.local_packages, "rlloadhang", "1.0")
    sent = []
    _, cursor = journal_since("par.service")
    with Poller(pard) as poller:
        # an install that never ends (installer.timeout_s 300): the stop must not wait for it
        hang = apkg_with(pard.root / "apkg", agents.with_requirements("fl-load-hang",
                                                                      "rlloadhang\n"))
        sent.append(pard.deploy("fl-load-hang", hang, wait=False)["deploymentId"])
        for i in range(8):
            agent = f"fl-load-{i}"
            reqs = "".join(f"rlload{j}\n" for j in range(4) if (i >> j) & 1 or j == i % 4)
            files = agents.with_requirements(agent, reqs)
            if i % 2:  # half take 2 s to start: some are surely in flight at the restart
                files["src/main.py"] = "import time\ntime.sleep(2)\n" + files["src/main.py"]
            apkg = apkg_with(pard.root / "apkg", files)
            sent.append(pard.deploy(agent, apkg, wait=False)["deploymentId"])

        def mixed() -> dict[str, dict] | None:
            # some deploys done, some still downloading/building/starting: restart now
            now = {d: pard.client().deployment(d) for d in sent}
            done = sum(r["status"] == "healthy" for r in now.values())
            busy = sum(r["status"] not in TERMINAL for r in now.values())
            return now if done >= 2 and busy >= 3 else None

        at_restart = retry_until(mixed, timeout=120, interval=0.05)
        serving = {r["agentAppId"]: main_pid(f"par-agent@{r['agentAppId']}.service")
                   for r in at_restart.values() if r["status"] == "healthy"}
        t0 = time.monotonic()
        pard.restart()
        restart_s = time.monotonic() - t0
        retry_until(lambda: pard.client(timeout=2).daemon_health()["ok"], timeout=30)
        final = {d: wait_status(pard.client(), d, TERMINAL, timeout=180) for d in sent}
        time.sleep(1.0)  # a second of polling the restarted pard
    window = (max(poller.refused_at) - min(poller.refused_at)) if poller.refused_at else 0.0
    outcome = Counter(d["status"] if d["status"] != "failed" else d["error"]["code"]
                      for d in final.values())
    measure("`systemctl restart par` with deploys in flight",
            f"{restart_s:.1f} s; at the restart {len(serving)} of {len(sent)} deploys were "
            f"healthy (one install hangs); outcome {dict(outcome)}")
    measure("poller (GET /deployments, 20/s) across the restart",
            f"{dict(poller.counts)}; refused for {window:.1f} s; latency p50 "
            f"{poller.latency_ms(0.5):.0f} ms, p99 {poller.latency_ms(0.99):.0f} ms")

    assert not poller.errors, poller.errors  # only refused connections while pard was away
    assert poller.counts["ok"] > 20
    # in-flight work is abandoned (as after a crash), not waited for: no install or boot
    # timeout, no SIGKILL at TimeoutStopSec, no error tracebacks for a normal stop
    assert restart_s < 10 and window < 10, (restart_s, window)
    log, _ = journal_since("par.service", cursor)
    assert "deploy crashed" not in log and "Traceback" not in log, log[-3000:]
    assert final[sent[0]]["error"]["code"] == "interrupted", final[sent[0]]
    for d in final.values():
        assert d["status"] == "healthy" or (d["status"] == "failed" and d["error"]["code"]
                                            == "interrupted" and d["error"]["message"]), d
    for agent, pid in serving.items():  # adopted, not restarted
        assert main_pid(f"par-agent@{agent}.service") == pid, agent
    bystander.assert_untouched()
    assert temp_leftovers(pard.state) == []
    # what the restart interrupted deploys again
    for d in final.values():
        if d["status"] == "failed":
            agent = d["agentAppId"]
            again = pard.deploy(agent, apkg_with(pard.root / "apkg", agents.probe(agent)))
            assert again["status"] == "healthy", again
    assert all(c["status"] == "healthy" for c in pard.client().deployments()["deployments"]
               if c["current"])


# ---------------------------------------------------------------- memory


def memory_enforced() -> str | None:
    """None when the cgroup memory controller is enforced here, else why not."""
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    try:
        have = controllers.read_text().split()
    except OSError as exc:
        return f"{controllers} unreadable ({exc.strerror})"
    if "memory" not in have:
        return (f"the cgroup memory controller is not delegated here ({controllers} lists "
                f"{' '.join(have) or 'nothing'}): MemoryMax is accepted but not enforced")
    return None


LEAKER = '''
import threading, time
hog = []
def leak():
    time.sleep(1.0)  # after READY
    while len(hog) < 128:  # 1 GiB at most, should MemoryMax not stop it
        hog.append(b"x" * (8 * 1024 * 1024))  # written, so resident
        time.sleep(0.02)
threading.Thread(target=leak, daemon=True).start()
def handler(ctx):
    return {"held": len(hog)}
'''


def test_memory_leak(pard: Pard) -> None:
    why_not = memory_enforced()
    if why_not:
        pytest.skip(why_not)
    bystander = resident_of(probe_agent(pard, "fl-mem-bystander"))
    unit = "par-agent@fl-mem-leak.service"
    d = pard.deploy("fl-mem-leak", apkg_with(pard.root / "apkg", {
        "agent.yaml": agents.manifest("fl-mem-leak"), "src/main.py": LEAKER}), memoryMB=64)
    assert d["status"] == "healthy", d
    assert sh("systemctl", "show", "-P", "MemoryMax", unit).stdout.strip() == str(64 * 1024**2)
    retry_until(lambda: "oom" in sh("journalctl", "-u", unit, "--no-pager", "-o", "cat",
                                    check=False).stdout.lower(), timeout=60)
    n = int(sh("systemctl", "show", "-P", "NRestarts", unit).stdout.strip())
    measure("leaking agent (memoryMB 64)", f"OOM-killed at MemoryMax, restarted {n} time(s)")
    assert n >= 1 or sh("systemctl", "show", "-P", "Result", unit).stdout.strip() == "oom-kill"
    bystander.assert_untouched()
    assert pard.client().daemon_health()["ok"] is True


# ---------------------------------------------------------------- venvs


def _venv_case(pard: Pard, damage: str) -> None:
    agent = f"fl-{damage}"[:40]
    build_wheel(pard.local_packages, "rlvenv", "1.0")
    d = probe_agent(pard, agent, "rlvenv\n")
    venv = pard.state / "venvs" / d["venv"]
    before = resident_of(d)
    if damage == "venv-python-deleted":
        (venv / "bin" / "python").unlink()
        reason = "bin/python is missing"
    elif damage == "venv-metadata-broken":
        (venv / "par-venv.json").write_text("{garbage")
        reason = "par-venv.json is missing or unreadable"
    else:
        shutil.rmtree(venv)
        reason = None
    before.assert_untouched()  # the running process does not notice
    _, cursor = journal_since("par.service")

    after = pard.client(timeout=120).action(d["deploymentId"], "restart")

    assert after["status"] == "healthy", after
    assert after["venv"] == d["venv"]
    assert (venv / "bin" / "python").exists()
    meta = json.loads((venv / "par-venv.json").read_text())
    assert meta["agent_app_id"] == agent
    assert list(venv.glob("lib/python3*/site-packages/rlvenv/__init__.py"))
    log, _ = journal_since("par.service", cursor)
    assert "Venv built" in log
    if reason:
        assert "Invalid venv found, rebuilding" in log and reason in log, log
    new_pid = main_pid(f"par-agent@{agent}.service")
    assert new_pid not in (0, before.pid)
    Resident(agent, d["deploymentId"], new_pid, before.port).assert_untouched()


def test_venv_python_deleted(pard: Pard) -> None:
    _venv_case(pard, "venv-python-deleted")


def test_venv_metadata_broken(pard: Pard) -> None:
    _venv_case(pard, "venv-metadata-broken")


def test_venv_deleted(pard: Pard) -> None:
    _venv_case(pard, "venv-deleted")


# ---------------------------------------------------------------- extracted package


@pytest.fixture(scope="module")
def extracted_gone(pard: Pard) -> dict:
    """A healthy agent whose extracted package folder was then deleted."""
    d = probe_agent(pard, "fl-extracted")
    shutil.rmtree(pard.state / "extracted" / f"fl-extracted@1.0.0@{d['packageDigest'][:12]}")
    return d


def test_extracted_deleted_restart(pard: Pard, extracted_gone: dict) -> None:
    d = extracted_gone
    running = resident_of(d)
    with pytest.raises(ApiError) as info:
        pard.client().action(d["deploymentId"], "restart")
    err = info.value
    assert err.code == "package_missing", err
    assert "fl-extracted@1.0.0" in err.message and "deploy" in err.message
    running.assert_untouched()
    rec = pard.client().deployment(d["deploymentId"])
    assert rec["current"] is True and rec["status"] == "healthy", rec


def test_extracted_deleted_redeploy(pard: Pard, extracted_gone: dict) -> None:
    again = probe_agent(pard, "fl-extracted")
    assert again["deploymentId"] != extracted_gone["deploymentId"]
    assert (pard.state / "extracted" / f"fl-extracted@1.0.0@{again['packageDigest'][:12]}"
            / "agent.yaml").is_file()
    assert pard.client().action(again["deploymentId"], "restart")["status"] == "healthy"


# ---------------------------------------------------------------- the store


@dataclass
class RefusedStart:
    """What happened when par.service was started over a prepared store."""

    start_rc: int
    exit_status: int
    active_state: str
    journal: str
    lines: list[dict]


@pytest.fixture
def store_pard(pard: Pard) -> Iterator[Pard]:
    """A second pard (own state dir) in place of the module's; the module's is back after."""
    pard.stop()
    other = Pard(new_root("fl-store"))
    (other.state / "state").mkdir(parents=True)
    try:
        yield other
    finally:
        sh("systemctl", "stop", "par.service", check=False, timeout=60)
        sh("systemctl", "reset-failed", "par.service", check=False)
        shutil.rmtree(other.root, ignore_errors=True)
        pard.start()


def start_refused(p: Pard) -> RefusedStart:
    p.write_config()
    p.install_unit()
    sh("systemctl", "reset-failed", "par.service", check=False)
    _, cursor = journal_since("par.service")
    rc = sh("systemctl", "start", "par.service", check=False, timeout=120).returncode
    exit_status = int(sh("systemctl", "show", "-P", "ExecMainStatus", "par.service").stdout)
    state = sh("systemctl", "show", "-P", "ActiveState", "par.service").stdout.strip()
    sh("systemctl", "stop", "par.service", check=False, timeout=60)  # no retries meanwhile
    text, _ = journal_since("par.service", cursor)
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return RefusedStart(rc, exit_status, state, text, lines)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def real_store(path: Path) -> None:
    """A store written by PAR's own code, with a few deployments."""
    with Store.open(path) as store:
        for i in range(5):
            store.insert_deployment(Deployment(deployment_id=f"d{i}", agent_app_id=f"a{i}",
                                               version="1.0.0", package_url="https://x/y.apkg"))


def assert_refused(p: Pard, code: str, exit_status: int, expect: str) -> RefusedStart:
    db = p.state / "state" / "par.db"
    before = digest(db)
    res = start_refused(p)
    assert res.start_rc != 0, res.journal
    assert res.exit_status == exit_status, res.journal
    refused = [ln for ln in res.lines if ln.get("event") == "pard refused to start"]
    assert refused and refused[0]["code"] == code, res.journal
    assert str(db) in refused[0]["message"] and expect in refused[0]["message"], refused
    assert digest(db) == before  # nothing written, nothing "repaired"
    wal = db.with_name("par.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    message = refused[0]["message"].replace(str(db), "state/par.db")
    measure(f"pard over a {code} store", f"exit status {res.exit_status}; journal: {message}")
    return res


def test_store_garbage(store_pard: Pard) -> None:
    (store_pard.state / "state" / "par.db").write_bytes(os.urandom(8192))
    res = assert_refused(store_pard, "store_corrupt", 2, "corrupted")
    assert res.active_state == "failed"  # RestartPreventExitStatus=2: no restart loop


def test_store_corrupt_page(store_pard: Pard) -> None:
    db = store_pard.state / "state" / "par.db"
    real_store(db)
    data = bytearray(db.read_bytes())
    data[4096:8192] = os.urandom(4096)  # page 2: a table's root page
    db.write_bytes(bytes(data))
    assert_refused(store_pard, "store_corrupt", 2, "corrupted")


def test_store_too_new(store_pard: Pard) -> None:
    db = store_pard.state / "state" / "par.db"
    real_store(db)
    subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                    "c.execute('PRAGMA user_version = 99'); c.commit(); c.close()", str(db)],
                   check=True, timeout=30)
    assert_refused(store_pard, "store_too_new", 2, "upgrade PAR")


HOLD_LOCK = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA locking_mode=EXCLUSIVE")
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_store_locked(store_pard: Pard) -> None:
    db = store_pard.state / "state" / "par.db"
    real_store(db)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_refused(store_pard, "store_locked", 1, "another pard")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
