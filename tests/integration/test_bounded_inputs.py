"""Bounded inputs under real systemd: caps on the files pard parses, the environment an
agent may set, and what pard keeps of the past (events, history, packages).

The module's pard runs with the default caps (limits.max_manifest_bytes 1 MiB,
max_dotenv_bytes 256 KiB, max_requirements_bytes 1 MiB) and a small retention
(5 events per deployment, 3 past deployments, 1 spare package per agent), so
the pruning shows after a few deploys.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for
from tests.integration.pard import Pard, running_pard, temp_leftovers
from tests.reliability_cases import (
    Answer,
    Case,
    Snapshot,
    Table,
    json_body,
    measure,
    param_node,
    raw_request,
    wait_status,
)
from tests.unit.apkg_factory import GOOD_MAIN, package

KIB, MIB = 1024, 1024 * 1024
DISK_TESTS = "tests/integration/test_disk_exhaustion.py"
RETENTION = {"events_per_deployment": 5, "history_deployments": 3, "packages_per_agent": 1}
CONFIG = {"agents": {"boot_timeout_s": 20}, "retention": RETENTION}
MANIFEST = "name: cap-agent\nversion: 1.0.0\nentrypoint: main:handler\n"
ENV_MAIN = textwrap.dedent('''
    import os

    def handler(ctx):
        return {"env": dict(os.environ)}
''')


def padded(head: str, size: int) -> str:
    """`head` followed by comment lines, exactly `size` bytes (a valid file of that size)."""
    pad = size - len(head.encode())
    line = "#" + "x" * 62 + "\n"
    return head + line * (pad // 64) + "#" * (pad % 64)


@dataclass(frozen=True)
class Refused:
    """A deploy pard must refuse: 400 at once, or 202 then failed (nothing left on disk)."""

    id: str
    what: str
    files: dict[str, str]  # besides src/main.py; agent.yaml defaults to MANIFEST
    code: str
    field: str
    message_has: tuple[str, ...]
    env: dict[str, str] | None = None
    status: int = 202

    def case(self) -> Case:
        where = f"`{self.code}` (field `{self.field}`), message names " + \
            ", ".join(f'"{m}"' for m in self.message_has)
        if self.status == 202:
            expected = f"202, then failed {where}; nothing left on disk, no temporary folder"
        else:
            expected = f"{self.status} {where}; nothing stored"
        return Case(self.id, self.what, expected,
                    test=param_node(__name__, "test_refused", self.id))


def _over(name: str, head: str, limit: int) -> dict[str, str]:
    return {name: padded(head, limit + 1)}


REFUSED: tuple[Refused, ...] = (
    Refused("manifest-over-cap", "agent.yaml of 1 MiB + 1 byte (a valid manifest, then comment "
            "lines; limits.max_manifest_bytes = 1 MiB)",
            _over("agent.yaml", MANIFEST, MIB), "file_too_large", "agent.yaml",
            ("agent.yaml", str(MIB + 1), str(MIB), "limits.max_manifest_bytes")),
    Refused("manifest-20mib", "agent.yaml of 20 MiB (the issue's package: a valid manifest "
            "followed by comments)", {"agent.yaml": padded(MANIFEST, 20 * MIB)},
            "file_too_large", "agent.yaml", (str(20 * MIB), "limits.max_manifest_bytes")),
    Refused("dotenv-over-cap", ".env of 256 KiB + 1 byte (limits.max_dotenv_bytes = 256 KiB)",
            _over(".env", "A=1\n", 256 * KIB), "file_too_large", ".env",
            (".env", str(256 * KIB + 1), str(256 * KIB), "limits.max_dotenv_bytes")),
    Refused("requirements-over-cap", "requirements.txt of 1 MiB + 1 byte "
            "(limits.max_requirements_bytes = 1 MiB)",
            _over("requirements.txt", "\n", MIB), "file_too_large", "requirements.txt",
            ("requirements.txt", str(MIB + 1), str(MIB), "limits.max_requirements_bytes")),
    Refused("env-loader-dotenv", "`LD_PRELOAD=/tmp/x.so` in the package's .env",
            {".env": "GOOD=1\nLD_PRELOAD=/tmp/x.so\n"}, "env_forbidden", ".env",
            (".env: LD_PRELOAD", "dynamic loader")),
    Refused("env-interpreter-manifest", "`PYTHONHOME` in agent.yaml's `environment:`",
            {"agent.yaml": MANIFEST + "environment:\n  PYTHONHOME: /opt/py\n"},
            "env_forbidden", "environment.PYTHONHOME",
            ("agent.yaml: environment.PYTHONHOME", "interpreter")),
    Refused("env-systemd-dotenv", "`NOTIFY_SOCKET` in the package's .env (would send READY=1 "
            "elsewhere)", {".env": "NOTIFY_SOCKET=/run/elsewhere\n"}, "env_forbidden", ".env",
            (".env: NOTIFY_SOCKET", "systemd")),
    Refused("env-path-request", "`PATH` in the API's `env`", {}, "env_forbidden", "env.PATH",
            ("env.PATH",), env={"PATH": "/tmp/bin:/usr/bin"}, status=400),
    Refused("env-loader-request", "`LD_LIBRARY_PATH` in the API's `env`", {}, "env_forbidden",
            "env.LD_LIBRARY_PATH", ("env.LD_LIBRARY_PATH", "dynamic loader"),
            env={"LD_LIBRARY_PATH": "/tmp"}, status=400),
    Refused("env-reserved-request", "`PAR_BIND_ADDRESS` in the API's `env`", {},
            "env_forbidden", "env.PAR_BIND_ADDRESS", ("env.PAR_BIND_ADDRESS", "reserved"),
            env={"PAR_BIND_ADDRESS": "0.0.0.0"}, status=400),
)

TABLE = Table(
    key="bounded",
    title="Bounded inputs and retention",
    intro="Every file pard parses from a package has a cap in par.yaml, checked on the "
          "archive entry's declared size before anything is written (extraction stops at "
          "that size when a header lies) and again before a file on disk is read; the "
          "environment a package or a request may set is checked against the table in "
          "docs/security.md; events, past deployments and kept packages are bounded "
          "(`retention`). pard runs with the default caps and `retention` of 5 events per "
          "deployment, 3 past deployments and 1 spare package per agent. An agent's state "
          "folder has no bound of its own: the two `state-fills-` rows run their own pard on "
          "a small ext4 image, where the blocks reserved for root are what pard keeps.",
    module=__name__,
    cases=tuple(r.case() for r in REFUSED) + (
        Case("env-pars-win", "a package whose .env sets `REST_PORT`, `AGENT_APP_ID`, "
             "`PYTHONPATH`, `BASE_PATH` and agent.yaml sets `MULTIPLEXED`, a request `env` "
             "setting `DEPLOYMENT_ID`, plus keys of the agent's own",
             "healthy; the agent sees PAR's values for PAR's variables and its own keys "
             "(request over .env over agent.yaml); PAR's keys are not in its EnvironmentFile"),
        Case("systemd-env-order", "a transient unit with `Environment=X=unit` and an "
             "`EnvironmentFile=` holding `X=file` and `NOTIFY_SOCKET=/x`",
             "the process sees `X=file` and `NOTIFY_SOCKET=/x`: systemd applies the file "
             "last, over `Environment=` and its own variables, which is why PAR keeps "
             "PAR's and systemd's keys out of it"),
        Case("events-pruned", "a deploy (about 14 events), then 6 restarts of the agent",
             "`GET /deployments/{id}/events` holds exactly 5 events after the deploy and "
             "still 5 after the restarts (the newest ones)"),
        Case("history-and-packages-pruned", "5 versions of one agent deployed in turn",
             "`GET /deployments?agentAppId=` lists the current deployment and the 3 newest "
             "past ones; `packages/` and `extracted/` hold the current version's package and "
             "1 spare, nothing else"),
        Case("journal-flood", "an agent prints 5,000 lines at once (agents.log_rate_limit_burst "
             "200)",
             "the unit has LogRateLimitIntervalSec=30s, LogRateLimitBurst=200; journald keeps "
             "a few times the burst (it scales with free disk) and drops the rest; another "
             "agent's lines arrive",
             "tests/integration/test_attacks.py::test_a_journal_flood_is_cut_per_agent"),
        Case("default-limits", "a deploy without memoryMB or cpuUnits",
             "the unit gets MemoryMax= (agents.memory_max_mb, with MemorySwapMax=0), CPUQuota= "
             "and TasksMax= (fork bombs) from par.yaml",
             "tests/integration/test_attacks.py::test_attack_10_default_limits"),
        Case("state-fills-disk", "an agent writes into its state folder until ENOSPC, on a "
             "256 MiB ext4 image (`mkfs.ext4 -m 5`) holding pard's state_dir and "
             "/var/lib/private/par-agents",
             "the agent (a dynamic user) stops at the root reserve: 0 bytes left for non-root "
             "users; pard (uid 0) answers, records events and deploys another agent (healthy, "
             "from the reserve); a deploy that must build (as par-build) fails `disk_full`; "
             "with the reserve gone too, a deploy fails `disk_full`; nothing left behind, the "
             "store passes quick_check; `rm --purge` gives the space back (attack 10)",
             f"{DISK_TESTS}::test_a_full_state_dir_leaves_pard_the_root_reserve"),
        Case("state-fills-inodes", "an agent creates empty files until ENOSPC, on an ext4 "
             "image with 4,096 inodes",
             "root gets no inode either (ext4 reserves blocks, not inodes: open, see "
             "docs/security.md); pard answers, fails a new deploy `disk_full` with nothing "
             "left behind, restarts the agent and records it; after `rm --purge` of the agent "
             "a deploy is healthy",
             f"{DISK_TESTS}::test_inodes_have_no_root_reserve_but_pard_fails_cleanly"),
        Case("api-caps", "a request line over 8 KiB, headers over 32 KiB, JSON nested deeper "
             "than 32, 300 slow clients from one address",
             "414, 431, 400 naming listen.max_json_depth; the slow clients are capped per "
             "address and cut at their deadline while others are served (attack 5)",
             "tests/integration/test_attacks.py::test_attack_5_slow_clients_do_not_take_the_api"),
    ),
)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def pard() -> Iterator[Pard]:
    with running_pard("cap", CONFIG, tcp=False) as p:
        yield p


@pytest.fixture(scope="module")
def files(pard: Pard) -> Path:
    path = pard.root / "cap-files"
    path.mkdir(exist_ok=True)
    return path


def make_package(files: Path, content: dict[str, str], main: str = GOOD_MAIN) -> Path:
    manifest = content.get("agent.yaml", MANIFEST)
    others = {k: v for k, v in content.items() if k != "agent.yaml"}
    return package(files / f"cap-{uuid.uuid4().hex[:8]}.apkg", others, manifest=manifest,
                   main=main)


def deploy_body(agent: str, apkg: Path, version: str = "1.0.0", **extra: object) -> dict:
    return {"deploymentId": f"{agent}-{uuid.uuid4().hex[:8]}", "agentAppId": agent,
            "orgId": "org-cap", "version": version, "packageUrl": f"file://{apkg}", **extra}


def post_deploy(body: dict) -> Answer:
    return raw_request("POST", "/deploy", json_body(body),
                       headers={"Idempotency-Key": body["deploymentId"]})


def invoke(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invoke", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_refused(case: Refused, pard: Pard, files: Path) -> None:
    client = pard.client()
    apkg = make_package(files, case.files)
    before = Snapshot.take(pard.state)
    records = {d["deploymentId"] for d in client.deployments()["deployments"]}
    extra = {"env": case.env} if case.env is not None else {}
    answer = post_deploy(deploy_body(f"cap-{case.id}"[:40], apkg, **extra))
    assert answer.status == case.status, answer
    if case.status == 202:
        d = wait_status(client, answer.body["deploymentId"], timeout=60)
        assert d["status"] == "failed" and d["current"] is False, d
        error = d["error"]
    else:
        error = answer.error
        assert {d["deploymentId"] for d in client.deployments()["deployments"]} == records
    assert (error.get("code"), error.get("field")) == (case.code, case.field), error
    for piece in case.message_has:
        assert piece in error["message"], error
    if case.env:
        assert all(v not in error["message"] for v in case.env.values()), error
    before.assert_same(pard.state)
    assert temp_leftovers(pard.state) == []
    if case.id == "manifest-20mib":
        measure("20 MiB agent.yaml refused with", error["message"])


def test_env_pars_win(pard: Pard, files: Path) -> None:
    agent = "cap-env"
    apkg = make_package(files, {
        "agent.yaml": MANIFEST + "environment:\n  MULTIPLEXED: 'true'\n  OWN_M: m\n"
                                 "  OWN_MD: m\n  OWN_ALL: m\n",
        ".env": "REST_PORT=1\nAGENT_APP_ID=spoofed\nPYTHONPATH=/nowhere\nBASE_PATH=/x\n"
                "OWN_D=d\nOWN_MD=d\nOWN_ALL=d\n",
    }, main=ENV_MAIN)
    body = deploy_body(agent, apkg, env={"DEPLOYMENT_ID": "forged", "OWN_ALL": "r",
                                         "OWN_R": "r"})
    assert post_deploy(body).status == 202
    d = wait_status(pard.client(), body["deploymentId"], timeout=120)
    assert d["status"] == "healthy", d
    env = invoke(d["ports"]["rest"], {})["env"]
    assert env["REST_PORT"] == str(d["ports"]["rest"])
    assert env["AGENT_APP_ID"] == agent and env["DEPLOYMENT_ID"] == body["deploymentId"]
    assert env["BASE_PATH"] == f"/agents/{agent}" and env["MULTIPLEXED"] == "false"
    assert env["PYTHONPATH"] != "/nowhere"
    assert (env["OWN_M"], env["OWN_D"], env["OWN_R"]) == ("m", "d", "r")
    assert (env["OWN_MD"], env["OWN_ALL"]) == ("d", "r")
    env_file = (pard.state / "env" / f"{agent}.env").read_text()
    for key in ("REST_PORT", "AGENT_APP_ID", "PYTHONPATH", "BASE_PATH", "MULTIPLEXED",
                "DEPLOYMENT_ID"):
        assert f"{key}=" not in env_file, env_file
    assert "Environment keys left to PAR" in pard.journal(lines=400)


def test_systemd_env_order() -> None:
    env_file = Path("/run/cap-env-order.env")
    env_file.write_text("X=file\nNOTIFY_SOCKET=/x\n")
    try:
        res = subprocess.run(
            ["systemd-run", "--quiet", "--wait", "--pipe", "--unit",
             f"cap-env-order-{uuid.uuid4().hex[:6]}", "-p", "Environment=X=unit",
             "-p", f"EnvironmentFile={env_file}",
             "/bin/sh", "-c", 'echo "X=$X NOTIFY_SOCKET=$NOTIFY_SOCKET"'],
            capture_output=True, text=True, timeout=30)
    finally:
        env_file.unlink(missing_ok=True)
    assert "X=file NOTIFY_SOCKET=/x" in res.stdout, res
    measure("systemd 252 with Environment=X=unit and EnvironmentFile= X=file, NOTIFY_SOCKET=/x",
            res.stdout.strip())


def test_events_pruned(pard: Pard, files: Path) -> None:
    client = pard.client()
    d = pard.deploy("cap-events", make_package(files, {}))
    assert d["status"] == "healthy", d
    did = d["deploymentId"]
    events = client.events(did)["events"]
    assert len(events) == RETENTION["events_per_deployment"], events
    for _ in range(6):
        assert raw_request("POST", f"/deployments/{did}/restart").status == 200
    events = client.events(did)["events"]
    assert len(events) == RETENTION["events_per_deployment"], events
    measure("events of one deployment after a deploy and 6 restarts (kept 5)",
            [e["event"] for e in events])


def test_history_and_packages_pruned(pard: Pard, files: Path) -> None:
    agent = "cap-history"
    ids = []
    for i in range(1, 6):
        version = f"1.0.{i}"
        apkg = make_package(files, {"agent.yaml": MANIFEST.replace("1.0.0", version)})
        d = pard.deploy(agent, apkg, version=version)
        assert d["status"] == "healthy", d
        ids.append(d["deploymentId"])
    def versions(folder: str, pattern: str) -> list[str]:
        return sorted(p.name.split("@")[1] for p in (pard.state / folder).glob(pattern))

    # pruning ends a moment after the deploy is healthy: wait for it, not for a guess
    want = ["1.0.4", "1.0.5"]
    wait_for(lambda: versions("packages", f"{agent}@*.apkg") == want
             and versions("extracted", f"{agent}@*") == want, timeout=10)
    listed = [x["deploymentId"] for x in pard.client().deployments(agent)["deployments"]]
    assert listed == list(reversed(ids))[:1 + RETENTION["history_deployments"]], listed
