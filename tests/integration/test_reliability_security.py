"""Who can reach what: the TCP token, the root-only socket, what an agent can see and
touch, what other local users can read, and secrets in pard's journal and answers.

The module's pard keeps its TCP token in /etc/par (as a real install does), so an
agent's view of /etc/par is tested for real: the folder is created for the module
when the machine has none, and removed again.  Two agents run: `sc-a`, deployed with
secrets (request env, package .env), and `sc-b`, its neighbour.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from par import layout
from tests.integration.pard import TEST_TOKEN, Pard, apkg_with, running_pard, sh
from tests.reliability_cases import (
    Answer,
    Case,
    Resident,
    Snapshot,
    Table,
    journal_since,
    json_body,
    main_pid,
    measure,
    raw_request,
)

AGENT_TESTS = "tests/integration/test_agents.py"
ETC_PAR = Path("/etc/par")
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
# every character systemd's EnvironmentFile= syntax treats specially
TRICKY = 'a "b" \'c\' \\d $e ${f} `g` h=i #j\nk\\\n l  '


TABLE = Table(
    key="security",
    title="Security",
    intro="Each row is a way in that must stay closed: the TCP API without the token, the "
          "local socket for non-root users, an agent reaching PAR's files, another agent's "
          "or the daemon's, local users reading an agent's secrets, and secrets in pard's "
          "journal or answers. pard keeps its TCP token in `/etc/par` as installed.",
    module=__name__,
    cases=(
        Case("tcp-no-token", "every endpoint over TCP without `Authorization` (deploy, stop, "
             "delete with purge, prune, install-uv, list, metrics, an unknown path)",
             "401 `unauthorized` with `WWW-Authenticate: Bearer`, nothing else in the answer; "
             "no record, file or unit changes; the running agent untouched"),
        Case("tcp-bad-credentials", "a wrong token, the token with a suffix, its prefix, "
             "`Basic` with the token, `Bearer` alone, the token in the query string",
             "401 each; the right token gets 200"),
        Case("tcp-401-before-body", "a 2 MiB body without the token",
             "401 (not 413): the body is never read"),
        Case("tcp-token-and-file-urls", "TCP without / with a wrong token, `file://` over TCP",
             "401 and no deployment; 403 `local_only`",
             "tests/integration/test_pard.py::test_tcp_needs_the_token_and_refuses_file_urls"),
        Case("socket-root-only", "/run/par/par.sock, as root and as user `nobody`",
             "a socket, mode 0600, owned by root, in a folder only root may write; `nobody` "
             "cannot connect (EACCES)"),
        Case("agent-runs-unprivileged", "the agent's process",
             "a non-zero UID, a dynamic user `par-<id>`", f"{AGENT_TESTS}::test_hello_agent_unit"),
        Case("agent-sandbox-basics", "an agent writing /etc, /usr, its venv, PAR's state, "
             "/root, the source tree; reading the store; another agent reading its home",
             "all refused; its /tmp is private; listing PAR's venvs shows only its own",
             f"{AGENT_TESTS}::test_agent_sandbox"),
        Case("agent-sees-no-state", "the agent lists PAR's state folder, extracted/, venvs/, "
             "packages/, state/, the cache, and reads the store",
             "it sees `extracted` and `venvs` holding only its own package and venv; "
             "packages, the store and the cache are hidden"),
        Case("agent-other-agent", "agent a reads agent b's home, extracted package and venv",
             "refused or invisible"),
        Case("agent-etc-par", "the agent lists /etc/par and reads the TCP token there",
             "refused (`InaccessiblePaths=`)"),
        Case("agent-read-only-code", "the agent writes into its own package (src/main.py, "
             "par-agent.json, a new file) and its venv's site-packages", "refused (read-only)"),
        Case("agent-no-daemon", "the agent connects to /run/par/par.sock, lists /run/par, "
             "reads /proc/<pard>/environ, lists /proc",
             "refused; pard's process is invisible (`ProtectProc=invisible`)"),
        Case("unit-env-private", "user `nobody` reads the agent's unit (`systemctl show -p "
             "Environment`, /run/systemd/transient/) to find its request env and .env values",
             "no secret there (they go through a root-only EnvironmentFile); the agent still "
             "gets them, and PAR's own variables still win over the request's"),
        Case("package-private", "user `nobody` lists extracted/ and reads the agent's .env",
             "refused: extracted/ is root-only on the host; the agent reads its own package "
             "through its bind mount"),
        Case("no-secret-in-journal", "pard's journal after deploys with secrets, TCP requests "
             "with the token and with a wrong token, a refused deploy",
             "none of: the TCP token, the wrong token, request env values, .env values"),
        Case("no-secret-in-api", "every read endpoint (unix and TCP) and error answers about "
             "env", "no secret value; `request.env` values read `***`"),
        Case("agent-exposure", "`systemd-analyze security` of an agent unit",
             "exposure ≤ 2.0", f"{AGENT_TESTS}::test_security_exposure"),
        Case("par-service-exposure", "`systemd-analyze security par.service`",
             "reported (pard runs as root by design: it manages units and venvs)"),
    ),
)

PROBE = '''
import os, socket

def handler(ctx):
    op, path = ctx.get("op"), ctx.get("path")
    try:
        if op == "env":
            return {"ok": True, "value": os.environ.get(ctx["name"])}
        if op == "read":
            with open(path, "rb") as fh:
                fh.read(1)
            return {"ok": True}
        if op == "list":
            return {"ok": True, "entries": sorted(os.listdir(path))}
        if op == "write":
            with open(path, "w") as fh:
                fh.write("x")
            return {"ok": True}
        if op == "connect":
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(path)
            return {"ok": True}
        return {"ok": False, "error": "unknown op"}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc.strerror}"}
'''


def key(record: dict) -> str:
    """The folder name of a deployment's extracted package (par.layout)."""
    return layout.package_key(record["agentAppId"], record["version"], record["packageDigest"])

@dataclass
class World:
    """The module's pard, its two agents and the secrets it was given."""

    pard: Pard
    a: dict
    b: dict
    token_file: Path
    secrets: dict[str, str]  # what → value; none may leak
    cursor: str  # pard's journal from before the module

    def invoke(self, d: dict, **body: object) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{d['ports']['rest']}/invoke",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    @property
    def tcp(self) -> str:
        return self.pard.config_extra["listen"]["tcp"]

    def resident(self) -> Resident:
        return Resident("sc-a", self.a["deploymentId"], main_pid("par-agent@sc-a.service"),
                        self.a["ports"]["rest"])


@pytest.fixture(scope="module")
def etc_par() -> Iterator[Path]:
    """/etc/par holding the module's token file; what the module created is removed after."""
    created = not ETC_PAR.exists()
    ETC_PAR.mkdir(mode=0o755, exist_ok=True)
    token_file = ETC_PAR / f"rl-token-{secrets.token_hex(4)}"
    token_file.write_text(TEST_TOKEN + "\n")
    os.chmod(token_file, 0o600)
    try:
        yield token_file
    finally:
        token_file.unlink(missing_ok=True)
        if created:
            try:
                ETC_PAR.rmdir()
            except OSError:
                pass  # something else put files there meanwhile: theirs to keep


@pytest.fixture(scope="module")
def world(etc_par: Path) -> Iterator[World]:
    _, cursor = journal_since("par.service")
    found = {"request env": f"rl-env-{secrets.token_hex(8)}",
             "package .env": f"rl-dotenv-{secrets.token_hex(8)}",
             "TCP token": TEST_TOKEN,
             "wrong token": f"rl-wrong-{secrets.token_hex(8)}"}
    with running_pard("sc", token_file=etc_par) as pard:
        files = {"agent.yaml": "name: sc-a\nversion: 1.0.0\nentrypoint: main:handler\n",
                 "src/main.py": PROBE, ".env": f"RL_DOTENV_SECRET={found['package .env']}\n"}
        a = pard.deploy("sc-a", apkg_with(pard.root / "apkg", files),
                        env={"RL_API_KEY": found["request env"], "AGENT_APP_ID": "spoofed",
                             "RL_TRICKY": TRICKY})
        assert a["status"] == "healthy", a
        b = pard.deploy("sc-b", apkg_with(pard.root / "apkg", {
            "agent.yaml": "name: sc-b\nversion: 1.0.0\nentrypoint: main:handler\n",
            "src/main.py": PROBE}))
        assert b["status"] == "healthy", b
        yield World(pard, a, b, etc_par, found, cursor)


# ---------------------------------------------------------------- TCP

ENDPOINTS = (
    ("POST", "/deploy", json_body({"deploymentId": "sc-x", "agentAppId": "sc-x", "orgId": "",
                                   "version": "1.0.0", "packageUrl": "https://x/y.apkg"})),
    ("POST", "/deployments/sc-a/stop", None),
    ("DELETE", "/deployments/sc-a?purge=1", None),
    ("POST", "/venvs/prune", None),
    ("POST", "/installer/install-uv", None),
    ("GET", "/deployments", None),
    ("GET", "/deployments/sc-a", None),
    ("GET", "/agents", None),
    ("GET", "/health", None),
    ("GET", "/metrics", None),
    ("GET", "/no/such/path", None),
)


def assert_401(answer: Answer) -> None:
    assert answer.status == 401, answer
    assert answer.body == {"error": {"code": "unauthorized", "field": None,
                                     "message": answer.error.get("message")}}, answer.body
    assert answer.headers.get("www-authenticate", "").startswith("Bearer"), answer.headers


def test_tcp_no_token(world: World) -> None:
    before = Snapshot.take(world.pard.state)
    records = world.pard.client().deployments()
    resident = world.resident()
    for method, path, body in ENDPOINTS:
        assert_401(raw_request(method, path, body, tcp=world.tcp))
    assert world.pard.client().deployments() == records
    before.assert_same(world.pard.state)
    resident.assert_untouched()


def test_tcp_bad_credentials(world: World) -> None:
    basic = base64.b64encode(f"x:{TEST_TOKEN}".encode()).decode()
    wrong = {
        "wrong token": {"Authorization": f"Bearer {world.secrets['wrong token']}"},
        "token with a suffix": {"Authorization": f"Bearer {TEST_TOKEN}x"},
        "token prefix": {"Authorization": f"Bearer {TEST_TOKEN[:-1]}"},
        "Basic": {"Authorization": f"Basic {basic}"},
        "Bearer alone": {"Authorization": "Bearer"},
        "token as scheme": {"Authorization": TEST_TOKEN},
    }
    for what, headers in wrong.items():
        answer = raw_request("GET", "/deployments", headers=headers, tcp=world.tcp)
        assert answer.status == 401, (what, answer)
    assert_401(raw_request("GET", f"/deployments?token={TEST_TOKEN}", tcp=world.tcp))
    assert raw_request("GET", "/health", tcp=world.tcp, token=TEST_TOKEN).status == 200


def test_tcp_401_before_body(world: World) -> None:
    answer = raw_request("POST", "/deploy", b'{"x": "' + b"a" * (2 * 1024 * 1024) + b'"}',
                         tcp=world.tcp)
    assert_401(answer)


# ---------------------------------------------------------------- the local socket


def test_socket_root_only(world: World) -> None:
    sock = world.pard.socket
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == 0
    parent = sock.parent.stat()
    assert parent.st_uid == 0 and not parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    probe = subprocess.run([*NOBODY, "/usr/bin/python3", "-c",
                            "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                            "s.connect(sys.argv[1])", str(sock)],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr


# ---------------------------------------------------------------- what agents see


def refused(result: dict) -> bool:
    return result["ok"] is False and "Error" in result["error"]


def test_agent_sees_no_state(world: World) -> None:
    state = world.pard.state
    a = world.a
    see = world.invoke(a, op="list", path=str(state))
    assert see["ok"] and see["entries"] == ["extracted", "host", "venvs"], see
    # the agent host, compiled, read-only: the one copy this pard installed
    hosts = world.invoke(a, op="list", path=str(state / "host"))["entries"]
    pythonpath = world.invoke(a, op="env", name="PYTHONPATH")["value"]
    assert hosts == [Path(pythonpath).name] and Path(pythonpath).parent == state / "host", hosts
    assert refused(world.invoke(a, op="write", path=f"{pythonpath}/par_agent_host/x.py"))
    assert world.invoke(a, op="list", path=str(state / "extracted"))["entries"] == \
        [key(a)]
    assert world.invoke(a, op="list", path=str(state / "venvs"))["entries"] == \
        [".layers", a["venv"]]
    # of the shared layers of installed packages, only the one its venv links
    site = world.invoke(a, op="env", name="AGENT_VENV_PATH")["value"]
    layers = world.invoke(a, op="list", path=str(state / "venvs" / ".layers"))["entries"]
    assert len(layers) == 1 and (world.pard.state / "venvs" / ".layers" / layers[0]).is_dir()
    assert Path(site).name == a["venv"]
    for hidden in ("packages", "state", "state/par.db"):
        assert refused(world.invoke(a, op="list", path=str(state / hidden)))
    assert refused(world.invoke(a, op="read", path=str(state / "state" / "par.db")))
    cache = world.invoke(a, op="list", path=str(world.pard.root / "cache"))
    assert cache == {"ok": True, "entries": []} or refused(cache), cache


def test_agent_other_agent(world: World) -> None:
    a, b = world.a, world.b
    home_b = world.invoke(b, op="env", name="HOME")["value"]
    assert world.invoke(b, op="write", path=f"{home_b}/mine")["ok"]
    state = world.pard.state
    private_b = home_b.replace("/var/lib/", "/var/lib/private/", 1)
    for path in (f"{home_b}/mine", f"{private_b}/mine",
                 f"{state}/extracted/{key(b)}/src/main.py",
                 f"{state}/venvs/{b['venv']}/pyvenv.cfg"):
        assert refused(world.invoke(a, op="read", path=path)), path


def test_agent_etc_par(world: World) -> None:
    assert refused(world.invoke(world.a, op="list", path=str(ETC_PAR)))
    assert refused(world.invoke(world.a, op="read", path=str(world.token_file)))


def test_agent_read_only_code(world: World) -> None:
    a = world.a
    root = world.pard.state / "extracted" / key(a)
    venv = world.pard.state / "venvs" / a["venv"]
    site = next(venv.glob("lib/python3*/site-packages"))
    for path in (root / "src" / "main.py", root / "par-agent.json", root / "new.py",
                 site / "evil.pth"):
        assert refused(world.invoke(a, op="write", path=str(path))), path
    assert world.invoke(a, op="read", path=str(root / "src" / "main.py"))["ok"]


def test_agent_no_daemon(world: World) -> None:
    a = world.a
    assert refused(world.invoke(a, op="connect", path=str(world.pard.socket)))
    assert refused(world.invoke(a, op="list", path=str(world.pard.socket.parent)))
    pid = world.pard.main_pid()
    assert refused(world.invoke(a, op="read", path=f"/proc/{pid}/environ"))
    procs = world.invoke(a, op="list", path="/proc")
    assert str(pid) not in procs["entries"], procs


# ---------------------------------------------------------------- local users and secrets


def test_unit_env_private(world: World) -> None:
    a = world.a
    unit = "par-agent@sc-a.service"
    # the agent has its secrets, and PAR's own variables win over the request's
    assert world.invoke(a, op="env", name="RL_API_KEY")["value"] == world.secrets["request env"]
    assert world.invoke(a, op="env", name="RL_DOTENV_SECRET")["value"] == \
        world.secrets["package .env"]
    assert world.invoke(a, op="env", name="AGENT_APP_ID")["value"] == "sc-a"
    assert world.invoke(a, op="env", name="RL_TRICKY")["value"] == TRICKY
    shown = subprocess.run([*NOBODY, "systemctl", "show", unit, "-p", "Environment",
                            "-p", "EnvironmentFiles"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "AGENT_APP_ID=sc-a" in shown.stdout, shown
    transient = subprocess.run([*NOBODY, "cat", f"/run/systemd/transient/{unit}"],
                               capture_output=True, text=True, timeout=30).stdout
    for what in ("request env", "package .env"):
        value = world.secrets[what]
        assert value not in shown.stdout, f"{what} readable by any user through systemctl show"
        assert value not in transient, f"{what} readable by any user in the transient unit file"


def test_package_private(world: World) -> None:
    extracted = world.pard.state / "extracted"
    for argv in (["ls", str(extracted)], ["cat", str(extracted / key(world.a) / ".env")]):
        res = subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and world.secrets["package .env"] not in res.stdout, res
    # the agent itself still reads its package (and the host its .env)
    assert world.invoke(world.a, op="read",
                        path=str(extracted / key(world.a) / ".env"))["ok"]


def test_no_secret_in_journal(world: World) -> None:
    pard = world.pard
    # traffic that could log a secret: TCP with the token and with a wrong one, a refused
    # deploy carrying an env value, a conflicting re-send of a deploy with secrets
    raw_request("GET", "/deployments", tcp=world.tcp, token=TEST_TOKEN)
    raw_request("GET", "/deployments", tcp=world.tcp, token=world.secrets["wrong token"])
    raw_request("POST", "/deploy", json_body({"deploymentId": "sc-z", "agentAppId": "sc-z",
                                              "orgId": "", "version": "1.0.0",
                                              "packageUrl": "https://x/y.apkg",
                                              "env": {"K": world.secrets["request env"],
                                                      "BAD KEY": "x"}}))
    sent = pard.client().deployment(world.a["deploymentId"])["request"]
    conflict = raw_request("POST", "/deploy", json_body(
        {**sent, "env": {"RL_API_KEY": world.secrets["request env"] + "2"}}))
    assert conflict.status == 409
    text, _ = journal_since("par.service", world.cursor)
    assert "API request" in text and "Agent subprocess started" in text  # the right journal
    for what, value in world.secrets.items():
        assert value not in text, f"{what} in pard's journal"


def test_no_secret_in_api(world: World) -> None:
    a = world.a["deploymentId"]
    answers = [raw_request("GET", path) for path in (
        "/health", "/deployments", f"/deployments/{a}", f"/deployments/{a}/health",
        f"/deployments/{a}/events", "/agents", "/venvs")]
    answers.append(raw_request("GET", f"/deployments/{a}", tcp=world.tcp, token=TEST_TOKEN))
    answers.append(raw_request("POST", "/deploy", json_body(
        {"deploymentId": "sc-y", "agentAppId": "sc-y", "orgId": "", "version": "1.0.0",
         "packageUrl": "https://x/y.apkg", "env": {"K": 1, "S": world.secrets["request env"]}})))
    text = json.dumps([x.body for x in answers]) + world.pard.client().metrics()
    assert all(x.status in (200, 400) for x in answers), [x.status for x in answers]
    for what, value in world.secrets.items():
        assert value not in text, f"{what} in an API answer"
    record = answers[2].body
    assert record["request"]["env"] == {"RL_API_KEY": "***", "AGENT_APP_ID": "***",
                                        "RL_TRICKY": "***"}, record


def test_par_service_exposure(world: World) -> None:
    out = sh("systemd-analyze", "security", "par.service", "--no-pager", check=False).stdout
    line = [ln for ln in out.splitlines() if "Overall exposure level" in ln]
    assert line, out
    value, label = line[0].split(":", 1)[1].split()[:2]  # "9.6 UNSAFE 😨"
    measure("systemd-analyze security par.service", f"{value} {label}")
    assert 0.0 <= float(value) <= 10.0
