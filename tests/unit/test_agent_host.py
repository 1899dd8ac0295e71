"""The agent host (par/agent_host/par_agent_host), run as the unit runs it but without systemd.

Each test writes a tiny agent into a temp dir, starts `python -m par_agent_host`
with PYTHONPATH holding only the host folder, and plays systemd's part: a unix
datagram socket as NOTIFY_SOCKET (abstract address, like systemd's), signals.
The FastAPI and gRPC cases use a venv built once per session from the offline
wheelhouse (skipped without it, failed under CI=true).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from par.agent_host.par_agent_host import dotenv, exitcodes, notify
from par.agent_host.par_agent_host import spec as host_spec
from par.agent_host.par_agent_host.loader import EntryRef
from par.agent_host.par_agent_host.surfaces import Health

REPO = Path(__file__).resolve().parents[2]
HOST_PATH = REPO / "par" / "agent_host"
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
UV = REPO / ".cache" / "tools" / "bin" / "uv"
SYSTEM_PYTHON = "/usr/bin/python3"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# What the host must never import: PAR itself and PAR's dependencies.
FORBIDDEN = {"par", "yaml", "requests", "pystemd", "sdnotify", "psutil", "click"}

# A stand-in gRPC server (stdlib): listens only once $GATE_FILE exists, then answers
# the HTTP/2 preface with a SETTINGS frame, which is what the host's probe asks for.
FAKE_GRPC = """
import os, socket, threading, time
from pathlib import Path

SETTINGS = b"\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x00\\x00"


class FakeServer:
    def __init__(self, port):
        self.port = port
        self.sock = None

    def start(self):
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        gate = Path(os.environ["GATE_FILE"])
        while not gate.exists():
            time.sleep(0.02)
        self.sock = socket.create_server(("127.0.0.1", self.port))
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)
                conn.sendall(SETTINGS)

    def stop(self, grace):
        if self.sock:
            self.sock.close()
        done = threading.Event()
        done.set()
        return done


def create_grpc_server(port):
    return FakeServer(port)
"""


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_agent(root: Path, files: dict[str, str], **spec: object) -> Path:
    """Write the agent's files under root/pkg and its spec JSON; return the spec path."""
    pkg = root / "pkg"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    pkg.mkdir(parents=True, exist_ok=True)
    data = {"name": "hello", "version": "1.2.3", "package_root": str(pkg), **spec}
    spec_path = root / "par-agent.json"
    spec_path.write_text(json.dumps(data))
    return spec_path


def request(
    port: int, method: str, path: str, body: object = None, timeout: float = 5
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get_json(port: int, path: str) -> tuple[int, dict]:
    status, data = request(port, "GET", path)
    return status, json.loads(data)


class NotifySocket:
    """What systemd listens on: an abstract unix datagram socket; keeps every message."""

    def __init__(self) -> None:
        self.name = f"par-test-{uuid.uuid4().hex[:12]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: list[str] = []

    @property
    def address(self) -> str:
        return "@" + self.name

    def poll(self, timeout: float) -> None:
        """Receive whatever arrives within `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return

    def wait_for(self, line: str, timeout: float = 15) -> str:
        """The first message holding `line` (one of its newline-separated states)."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages:
                if line in msg.split("\n"):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} within {timeout} s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def states(self) -> list[str]:
        return [line for msg in self.messages for line in msg.split("\n")]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Agent:
    """A running host process, with its output in files (no pipe can fill up)."""

    proc: subprocess.Popen
    out: Path
    err: Path
    notify: NotifySocket
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def rest(self) -> int:
        return self.ports["rest"]

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def ready(self, timeout: float = 15) -> str:
        try:
            return self.notify.wait_for("READY=1", timeout)
        except AssertionError:
            raise AssertionError(
                f"not ready; rc={self.proc.poll()} stdout={self.stdout()!r} "
                f"stderr={self.stderr()[-3000:]!r} notify={self.notify.messages}"
            ) from None

    def terminate(self, timeout: float = 5) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds it took)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - started


@pytest.fixture
def start_agent(tmp_path: Path):
    """start_agent(spec_path, python=..., env=..., args=...) -> Agent; killed at teardown."""
    running: list[Agent] = []

    def start(
        spec_path: Path,
        *,
        python: str = SYSTEM_PYTHON,
        env: dict[str, str] | None = None,
        ports: dict[str, int] | None = None,
        args: tuple[str, ...] = (),
    ) -> Agent:
        ports = ports or {"rest": free_port()}
        sock = NotifySocket()
        n = len(running)
        out, err = tmp_path / f"stdout{n}", tmp_path / f"stderr{n}"
        child_env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(HOST_PATH),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PAR_AGENT_SPEC": str(spec_path),
            "NOTIFY_SOCKET": sock.address,
            "AGENT_APP_ID": "hello-app",
            "DEPLOYMENT_ID": "dep-1",
            "ORG_ID": "org-1",
            "PAR_STOP_TIMEOUT": "5",
            **{f"{name.upper()}_PORT": str(port) for name, port in ports.items()},
            **(env or {}),
        }
        with out.open("wb") as fo, err.open("wb") as fe:
            # cwd is a temp dir: `python -m` puts the cwd on sys.path, and the
            # repository's `par` package must not be importable from there.
            proc = subprocess.Popen(
                [python, *args, "-m", "par_agent_host"],
                env=child_env,
                cwd=tmp_path,
                stdout=fo,
                stderr=fe,
            )
        agent = Agent(proc, out, err, sock, ports)
        running.append(agent)
        return agent

    yield start
    for agent in running:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(5)
        agent.notify.close()


def _venv_or_skip(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bare_venv(tmp_path_factory) -> Path:
    """A venv with nothing installed, not even pip: none of PAR's dependencies."""
    path = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


@pytest.fixture(scope="session")
def web_venv(tmp_path_factory) -> Path:
    """A venv with fastapi, uvicorn and grpcio 1.73.1 from the offline wheelhouse."""
    if not UV.exists() or not WHEELHOUSE.is_dir():
        _venv_or_skip(f"{UV} or {WHEELHOUSE} missing: run scripts/install-deps")
    path = tmp_path_factory.mktemp("web") / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run(
        [
            str(UV),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            "--no-index",
            "--find-links",
            str(WHEELHOUSE),
            "fastapi",
            "uvicorn",
            "grpcio==1.73.1",
            "protobuf",
        ],
        check=True,
        env={**os.environ, "UV_NO_CONFIG": "1"},
    )
    return python


# ---------------------------------------------------------------- in-process units


def test_dotenv_parses_comments_export_and_quotes():
    text = """
        # a comment
        export A=1
        B = two words   # trailing comment
        C='literal $X # not a comment'
        D="line\\nbreak \\"q\\""
        E=http://x/#frag
        EMPTY=
    """
    assert dotenv.parse(textwrap.dedent(text)) == {
        "A": "1",
        "B": "two words",
        "C": "literal $X # not a comment",
        "D": 'line\nbreak "q"',
        "E": "http://x/#frag",
        "EMPTY": "",
    }
    for bad in ("NOEQUALS", "1X=2", "A='open", 'A="x" y'):
        with pytest.raises(dotenv.DotenvError):
            dotenv.parse(bad)


def test_dotenv_load_never_overrides(tmp_path: Path):
    env_file = tmp_path / ".env"
    env_file.write_text("KEEP=from-file\nNEW=added\n")
    environ = {"KEEP": "from-unit"}
    assert dotenv.load(env_file, environ) == ["NEW"]
    assert environ == {"KEEP": "from-unit", "NEW": "added"}
    assert dotenv.load(tmp_path / "missing.env", environ) == []


def test_spec_and_env_parsing(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    spec_path = tmp_path / "par-agent.json"
    spec_path.write_text(json.dumps({"name": "x", "package_root": "pkg", "future_key": 1}))
    agent, env = host_spec.load(
        {
            "PAR_AGENT_SPEC": str(spec_path),
            "REST_PORT": "8101",
            "BASE_PATH": "agents/x/",
            "MULTIPLEXED": "true",
        }
    )
    assert agent.package_root == pkg and agent.entrypoint == "main:handler"
    assert agent.surfaces == ("rest",)
    assert env.ports.rest == 8101 and env.bind_address == "127.0.0.1"
    assert env.base_path == "/agents/x" and env.multiplexed
    bad_envs = [
        {"PAR_AGENT_SPEC": str(spec_path)},  # no REST_PORT
        {"PAR_AGENT_SPEC": str(spec_path), "REST_PORT": "80x"},
        {"PAR_AGENT_SPEC": str(tmp_path / "nope.json"), "REST_PORT": "8101"},
        {"REST_PORT": "8101"},  # neither spec nor package path
    ]
    for environ in bad_envs:
        with pytest.raises(exitcodes.HostError) as err:
            host_spec.load(environ)
        assert err.value.exit_code == exitcodes.EXIT_BAD_SPEC
    spec_path.write_text(json.dumps({"name": "x", "package_root": "pkg", "a2a_service": "g"}))
    with pytest.raises(exitcodes.HostError, match="A2A_PORT"):
        host_spec.load({"PAR_AGENT_SPEC": str(spec_path), "REST_PORT": "8101"})


def test_entry_refs():
    assert str(EntryRef.parse("entrypoint", "main", "handler")) == "main:handler"
    assert str(EntryRef.parse("rest entry", "src.api:mount_it", "mount")) == "src.api:mount_it"
    assert str(EntryRef.parse("entrypoint", "mod:", "handler")) == "mod:handler"
    for bad in ("", "a b:c", "mod:1x", "../x:y", "x.:y"):
        with pytest.raises(exitcodes.HostError) as err:
            EntryRef.parse("entrypoint", bad, "handler")
        assert err.value.exit_code == exitcodes.EXIT_BAD_ENTRY


def test_exit_codes_are_distinct_and_permanent_ones_named():
    codes = [
        exitcodes.EXIT_OK,
        exitcodes.EXIT_BAD_SPEC,
        exitcodes.EXIT_IMPORT_ERROR,
        exitcodes.EXIT_BAD_ENTRY,
        exitcodes.EXIT_SURFACE_FAILED,
    ]
    assert len(set(codes)) == len(codes)
    assert exitcodes.EXIT_IMPORT_ERROR in exitcodes.PERMANENT
    assert exitcodes.EXIT_SURFACE_FAILED not in exitcodes.PERMANENT


def test_notifier_abstract_socket_and_noop():
    sock = NotifySocket()
    try:
        assert notify.Notifier({"NOTIFY_SOCKET": sock.address})("READY=1", "STATUS=x")
        sock.poll(0.5)
        assert sock.messages == ["READY=1\nSTATUS=x"]
    finally:
        sock.close()
    assert notify.Notifier({})("READY=1") is False
    # A dead socket is reported, never raised.
    assert notify.Notifier({"NOTIFY_SOCKET": "@par-test-nobody-listens"})("READY=1") is False


def test_watchdog_interval():
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    other = str(os.getpid() + 1)
    assert notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": other}) is None


def test_health_report():
    health = Health(("rest", "a2a"))
    assert health.report() == (503, {"ok": False})
    assert not health.update({"rest": True, "a2a": False})
    assert health.report()[0] == 503
    assert health.update({"rest": True, "a2a": True})
    assert health.report() == (200, {"ok": True, "surfaces": {"rest": True, "a2a": True}})


# ---------------------------------------------------------------- the stdlib host

HELLO_MAIN = """
import asyncio, os, sys

def handler(context):
    if context.get("modules"):
        return {"modules": sorted({m.split(".")[0] for m in sys.modules})}
    if context.get("fail"):
        raise RuntimeError("handler failed on purpose")
    return {"echo": context, "greeting": os.environ.get("GREETING"),
            "kept": os.environ.get("KEEP_ME"), "secret": os.environ.get("SECRET")}
"""


def test_ready_only_after_every_surface_answers(tmp_path: Path, start_agent):
    """READY=1 waits for the slowest surface; /health says 503 until then, 200 after."""
    gate = tmp_path / "gate"
    spec_path = write_agent(
        tmp_path, {"main.py": HELLO_MAIN, "fake_grpc.py": FAKE_GRPC}, a2a_service="fake_grpc"
    )
    ports = {"rest": free_port(), "a2a": free_port()}
    agent = start_agent(spec_path, env={"GATE_FILE": str(gate)}, ports=ports)

    agent.notify.wait_for(f"STATUS=starting rest={ports['rest']} a2a={ports['a2a']}")
    deadline = time.monotonic() + 10
    while True:  # the REST port comes up while A2A is still closed
        try:
            status, body = get_json(agent.rest, "/health")
            break
        except OSError:
            assert time.monotonic() < deadline, agent.stderr()
            time.sleep(0.05)
    assert status == 503 and body["ok"] is False
    agent.notify.poll(0.3)
    assert "READY=1" not in agent.notify.states()

    gate.touch()
    msg = agent.ready()
    # READY and STATUS arrive together; /health already says ok when they do.
    assert f"STATUS=serving rest={ports['rest']} a2a={ports['a2a']}" in msg.split("\n")
    status, body = get_json(agent.rest, "/health")
    assert (status, body) == (200, {"ok": True, "surfaces": {"rest": True, "a2a": True}})
    assert f"agent hello 1.2.3 listening rest={ports['rest']} a2a={ports['a2a']}" in agent.stdout()

    rc, took = agent.terminate()
    assert rc == 0 and took < 1.0
    agent.notify.wait_for("STOPPING=1", 1)


def test_stdlib_host_serves_health_meta_invoke_and_imports_nothing_of_par(
    tmp_path: Path, start_agent
):
    """Debian's python has PAR's deps installed: -X importtime shows the host uses none."""
    spec_path = write_agent(
        tmp_path,
        {
            "main.py": HELLO_MAIN,
            ".env": "export GREETING=\"hi there\" # comment\nKEEP_ME=from-file\nSECRET='s3'\n",
        },
    )
    agent = start_agent(
        spec_path,
        env={"KEEP_ME": "from-unit", "BASE_PATH": "/agents/hello-app"},
        args=("-X", "importtime"),
    )
    msg = agent.ready()
    assert f"STATUS=serving rest={agent.rest}" in msg.split("\n")

    assert get_json(agent.rest, "/health") == (200, {"ok": True, "surfaces": {"rest": True}})
    assert get_json(agent.rest, "/agents/hello-app/health")[0] == 200
    status, meta = get_json(agent.rest, "/meta")
    assert status == 200
    assert meta["name"] == "hello" and meta["version"] == "1.2.3"
    assert meta["agentAppId"] == "hello-app" and meta["deploymentId"] == "dep-1"
    assert meta["ports"] == {"rest": agent.rest, "a2a": None, "ui": None}

    status, body = request(agent.rest, "POST", "/invoke", {"q": 1})
    assert status == 200
    assert json.loads(body) == {
        "echo": {"q": 1},
        "greeting": "hi there",
        "kept": "from-unit",
        "secret": "s3",
    }
    status, body = request(agent.rest, "POST", "/invoke", {"fail": True})
    assert status == 500 and "handler failed on purpose" in json.loads(body)["error"]
    conn = http.client.HTTPConnection("127.0.0.1", agent.rest, timeout=5)
    conn.request("POST", "/invoke", body=b"{not json")
    assert conn.getresponse().status == 400
    conn.close()
    assert request(agent.rest, "GET", "/nope")[0] == 404

    status, body = request(agent.rest, "POST", "/invoke", {"modules": True})
    loaded = set(json.loads(body)["modules"])
    assert "par_agent_host" in loaded and not loaded & FORBIDDEN

    rc, took = agent.terminate()
    assert rc == 0 and took < 1.0
    imported = {
        m.group(1).strip().split(".")[0]
        for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", agent.stderr(), re.M)
    }
    assert "par_agent_host" in imported, agent.stderr()[-2000:]
    assert not imported & (FORBIDDEN | {"fastapi", "uvicorn", "pydantic", "grpc"})


def test_host_runs_in_a_venv_without_any_of_pars_dependencies(
    tmp_path: Path, start_agent, bare_venv: Path
):
    for module in FORBIDDEN - {"par"}:
        probe = subprocess.run([str(bare_venv), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} importable in the bare venv"
    async_main = """
    import asyncio, sys
    async def handler(context):
        await asyncio.sleep(0)
        return {"prefix": sys.prefix, "n": context["n"] + 1}
    """
    spec_path = write_agent(tmp_path, {"src/main.py": async_main})  # found via package/src
    agent = start_agent(spec_path, python=str(bare_venv))
    agent.ready()
    assert get_json(agent.rest, "/health")[0] == 200
    status, body = request(agent.rest, "POST", "/invoke", {"n": 41})
    assert status == 200
    assert json.loads(body) == {"prefix": str(bare_venv.parent.parent), "n": 42}
    assert agent.terminate()[0] == 0


def test_sigterm_drains_in_flight_request_and_closes_listener(tmp_path: Path, start_agent):
    slow_main = """
    import os, time
    from pathlib import Path
    def handler(context):
        Path(os.environ["MARK"]).touch()
        time.sleep(1.0)
        return {"done": True}
    """
    mark = tmp_path / "mark"
    agent = start_agent(write_agent(tmp_path, {"main.py": slow_main}), env={"MARK": str(mark)})
    agent.ready()
    result: dict = {}
    client = threading.Thread(
        target=lambda: result.update(r=request(agent.rest, "POST", "/invoke", {}))
    )
    client.start()
    deadline = time.monotonic() + 5
    while not mark.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    agent.proc.send_signal(signal.SIGTERM)
    refused = False
    while client.is_alive() and not refused:  # the listener closes before the request ends
        try:
            socket.create_connection(("127.0.0.1", agent.rest), timeout=0.2).close()
            time.sleep(0.02)
        except (ConnectionRefusedError, ConnectionResetError):  # reset: was in the closed backlog
            refused = True
    client.join(5)
    assert refused
    assert result["r"] == (200, b'{"done": true}')
    assert agent.wait(5) == 0
    agent.notify.wait_for("STOPPING=1", 1)


def test_watchdog_pings_while_healthy(tmp_path: Path, start_agent):
    agent = start_agent(
        write_agent(tmp_path, {"main.py": HELLO_MAIN}), env={"WATCHDOG_USEC": "200000"}
    )
    agent.ready()
    agent.notify.poll(0.8)
    assert agent.notify.states().count("WATCHDOG=1") >= 3
    status, body = request(agent.rest, "POST", "/invoke", {"q": 1})
    assert status == 200 and json.loads(body)["echo"] == {"q": 1}
    assert agent.terminate()[0] == 0


def test_watchdog_stops_and_health_degrades_when_a_surface_goes_silent(tmp_path: Path, start_agent):
    """The fake A2A server closes its listener on /invoke: no more pings, /health 503."""
    gate = tmp_path / "gate"
    gate.touch()
    breaker = """
    import fake_grpc
    def handler(context):
        for server in fake_grpc.SERVERS:
            server.sock.close()
        return {"closed": len(fake_grpc.SERVERS)}
    """
    fake = FAKE_GRPC.replace(
        "    return FakeServer(port)",
        "    SERVERS.append(FakeServer(port))\n    return SERVERS[-1]",
    ).replace("def create_grpc_server", "SERVERS = []\n\n\ndef create_grpc_server")
    spec_path = write_agent(
        tmp_path, {"main.py": breaker, "fake_grpc.py": fake}, a2a_service="fake_grpc"
    )
    ports = {"rest": free_port(), "a2a": free_port()}
    agent = start_agent(
        spec_path, ports=ports, env={"GATE_FILE": str(gate), "WATCHDOG_USEC": "200000"}
    )
    agent.ready()
    assert request(agent.rest, "POST", "/invoke", {}) == (200, b'{"closed": 1}')
    agent.notify.wait_for(f"STATUS=degraded, not answering: a2a={ports['a2a']}", 5)
    pings = agent.notify.states().count("WATCHDOG=1")
    agent.notify.poll(0.6)
    assert agent.notify.states().count("WATCHDOG=1") == pings
    status, body = get_json(agent.rest, "/health")
    assert (status, body) == (503, {"ok": False, "surfaces": {"rest": True, "a2a": False}})
    assert f"surfaces not answering: a2a={ports['a2a']}" in agent.stderr()
    assert agent.terminate()[0] == 0


def test_exits_even_if_the_agent_leaves_a_thread_running(tmp_path: Path, start_agent):
    lingering = """
    import threading, time
    threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
    def handler(context):
        return {}
    """
    agent = start_agent(write_agent(tmp_path, {"main.py": lingering}))
    agent.ready()
    rc, took = agent.terminate(timeout=10)
    assert rc == 0 and took < 4


# ---------------------------------------------------------------- failures


def _failed(agent: Agent, code: int) -> str:
    """The host's single line (after the agent's traceback, if any) of a host that
    exited with `code`; every stderr line is at priority err."""
    assert agent.wait(15) == code, agent.stderr()
    lines = agent.stderr().strip().splitlines()
    assert all(line.startswith("<3>") for line in lines), lines
    own = [line for line in lines if line.startswith("<3>par-agent-host: ")]
    assert len(own) == 1 and own[0] == lines[-1], lines
    agent.notify.poll(0.2)  # the datagram was sent before the exit
    assert "READY=1" not in agent.notify.states()
    assert f"STATUS={exitcodes.describe(code)}: {lines[-1][len('<3>par-agent-host: '):]}" \
        in agent.notify.states()
    return lines[-1]


def test_import_error_exits_with_named_code_and_names_the_module(tmp_path: Path, start_agent):
    spec_path = write_agent(tmp_path, {"main.py": "import not_installed_anywhere\n"})
    line = _failed(start_agent(spec_path), exitcodes.EXIT_IMPORT_ERROR)
    assert "'main'" in line and "ModuleNotFoundError" in line and "not_installed_anywhere" in line


def test_error_raised_inside_the_agent_says_where(tmp_path: Path, start_agent):
    files = {"main.py": "import helper\n", "helper.py": "x = 1\nraise RuntimeError('no db')\n"}
    agent = start_agent(write_agent(tmp_path, files))
    line = _failed(agent, exitcodes.EXIT_IMPORT_ERROR)
    assert "RuntimeError: no db" in line and "helper.py:2" in line
    # the whole traceback is there too, for the developer
    assert "Traceback (most recent call last):" in agent.stderr()
    assert 'helper.py", line 2, in <module>' in agent.stderr()


def test_error_raised_in_the_stdlib_names_the_agents_own_line(tmp_path: Path, start_agent):
    files = {"main.py": "import helper\n",
             "helper.py": "import json\n\nCONFIG = json.loads('{bad')\n"}
    line = _failed(start_agent(write_agent(tmp_path, files)), exitcodes.EXIT_IMPORT_ERROR)
    assert "JSONDecodeError" in line and "helper.py:3)" in line and "decoder.py" not in line


def test_missing_entry_function_is_a_bad_entry(tmp_path: Path, start_agent):
    spec_path = write_agent(tmp_path, {"main.py": "def other(c):\n    return c\n"})
    line = _failed(start_agent(spec_path), exitcodes.EXIT_BAD_ENTRY)
    assert "main:handler" in line and "'handler'" in line


def test_bad_spec_exits_2(tmp_path: Path, start_agent):
    spec_path = tmp_path / "par-agent.json"
    spec_path.write_text("{not json")
    line = _failed(start_agent(spec_path), exitcodes.EXIT_BAD_SPEC)
    assert "not valid JSON" in line


def test_ui_without_index_is_a_bad_entry(tmp_path: Path, start_agent):
    spec_path = write_agent(tmp_path, {"main.py": HELLO_MAIN, "ui/app.js": ""}, ui_path="ui")
    agent = start_agent(spec_path, ports={"rest": free_port(), "ui": free_port()})
    assert "index.html" in _failed(agent, exitcodes.EXIT_BAD_ENTRY)


def test_port_in_use_is_a_surface_failure(tmp_path: Path, start_agent):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        agent = start_agent(write_agent(tmp_path, {"main.py": HELLO_MAIN}), ports={"rest": port})
        line = _failed(agent, exitcodes.EXIT_SURFACE_FAILED)
    assert f"rest surface cannot listen on 127.0.0.1:{port}" in line


def test_surface_that_never_answers_times_out(tmp_path: Path, start_agent):
    spec_path = write_agent(
        tmp_path, {"main.py": HELLO_MAIN, "fake_grpc.py": FAKE_GRPC}, a2a_service="fake_grpc"
    )
    ports = {"rest": free_port(), "a2a": free_port()}
    agent = start_agent(
        spec_path,
        ports=ports,
        env={"GATE_FILE": str(tmp_path / "never"), "PAR_READY_TIMEOUT": "0.5"},
    )
    line = _failed(agent, exitcodes.EXIT_SURFACE_FAILED)
    assert f"a2a={ports['a2a']}" in line and "rest=" not in line


# ---------------------------------------------------------------- FastAPI, UI and gRPC

REST_API = """
from fastapi import APIRouter, FastAPI

def mount(app: FastAPI):
    @app.get("/hello")
    def hello():
        return {"hello": "world"}

    @app.get("/health")  # shadowed: the host's readiness gate comes first
    def agent_health():
        return {"agent": True}
"""

ASYNC_MAIN = """
async def handler(context):
    return {"got": context}
"""


def test_fastapi_rest_and_ui(tmp_path: Path, start_agent, web_venv: Path):
    spec_path = write_agent(
        tmp_path,
        {"main.py": ASYNC_MAIN, "api.py": REST_API, "ui/index.html": "<h1>hello ui</h1>\n"},
        rest_entry="api:mount",
        ui_path="ui",
    )
    ports = {"rest": free_port(), "ui": free_port()}
    agent = start_agent(spec_path, python=str(web_venv), ports=ports)
    msg = agent.ready()
    assert f"STATUS=serving rest={ports['rest']} ui={ports['ui']}" in msg.split("\n")

    assert get_json(agent.rest, "/hello") == (200, {"hello": "world"})
    assert get_json(agent.rest, "/health") == (
        200,
        {"ok": True, "surfaces": {"rest": True, "ui": True}},
    )
    status, meta = get_json(agent.rest, "/meta")
    assert status == 200
    assert meta["ports"] == {"rest": ports["rest"], "a2a": None, "ui": ports["ui"]}
    status, body = request(agent.rest, "POST", "/invoke", {"x": [1, 2]})
    assert (status, json.loads(body)) == (200, {"got": {"x": [1, 2]}})
    status, body = request(ports["ui"], "GET", "/")
    assert status == 200 and b"hello ui" in body

    rc, took = agent.terminate()
    assert rc == 0 and took < 1.0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports["rest"]), timeout=1)


def test_fastapi_entry_may_return_a_router(tmp_path: Path, start_agent, web_venv: Path):
    router_api = """
    from fastapi import APIRouter
    def routes():
        router = APIRouter()
        @router.get("/hello")
        def hello():
            return {"from": "router"}
        return router
    """
    spec_path = write_agent(
        tmp_path, {"main.py": ASYNC_MAIN, "api.py": router_api}, rest_entry="api:routes"
    )
    agent = start_agent(spec_path, python=str(web_venv))
    agent.ready()
    assert get_json(agent.rest, "/hello") == (200, {"from": "router"})
    assert agent.terminate()[0] == 0


def test_rest_entry_without_fastapi_is_an_import_error(
    tmp_path: Path, start_agent, bare_venv: Path
):
    spec_path = write_agent(tmp_path, {"main.py": ASYNC_MAIN, "api.py": REST_API}, rest_entry="api")
    line = _failed(start_agent(spec_path, python=str(bare_venv)), exitcodes.EXIT_IMPORT_ERROR)
    assert "api:mount" in line and "fastapi" in line


GRPC_SYNC = """
from concurrent import futures
import grpc

def create_grpc_server(port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server
"""

GRPC_AIO = """
import grpc

async def create_grpc_server(port):
    server = grpc.aio.server()
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server
"""

GRPC_MAIN = """
import grpc

def handler(context):
    return {"grpcio": grpc.__version__}
"""


@pytest.mark.parametrize("service", [GRPC_SYNC, GRPC_AIO], ids=["grpc.server", "grpc.aio"])
def test_grpc_a2a_surface_becomes_ready(tmp_path: Path, start_agent, web_venv: Path, service):
    spec_path = write_agent(
        tmp_path,
        {"main.py": GRPC_MAIN, "grpc_service.py": service},
        a2a_service="grpc_service:create_grpc_server",
    )
    ports = {"rest": free_port(), "a2a": free_port()}
    agent = start_agent(spec_path, python=str(web_venv), ports=ports)
    msg = agent.ready()
    assert f"STATUS=serving rest={ports['rest']} a2a={ports['a2a']}" in msg.split("\n")
    assert get_json(agent.rest, "/health") == (
        200,
        {"ok": True, "surfaces": {"rest": True, "a2a": True}},
    )
    status, body = request(agent.rest, "POST", "/invoke", {})
    # The agent's venv pins grpcio 1.73.1 whatever the test process has (here: none).
    assert (status, json.loads(body)) == (200, {"grpcio": "1.73.1"})
    assert "grpc" not in sys.modules

    rc, took = agent.terminate()
    assert rc == 0 and took < 1.0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports["a2a"]), timeout=1)
