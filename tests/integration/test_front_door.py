"""The front door under real systemd: every agent at /agents/{id}/ on one port.

Routing, prefix strip, forwarded headers, 404/503 answers, a streamed SSE answer,
bad input; and the promise that a change of deployment (redeploy, restart, kill -9
of the agent, a failed redeploy, a restart of the front door itself) refuses no
request: 8 clients send requests for 20 s through each change and every one of them
gets the agent's answer.  Agent ids start with `fd-`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for
from tests.integration.pard import (
    TEST_TOKEN,
    Pard,
    apkg_with,
    running_pard,
    sh,
)
from tests.reliability_cases import measure

AGENT = "fd-echo"
LOAD_S = 20.0
CLIENTS = 8
THINK_S = 0.02  # each client's pause between requests: bounded load on a 2-core machine

API = '''
import asyncio
import os

from fastapi import Request
from fastapi.responses import StreamingResponse

VERSION = "{version}"


def mount(app):
    @app.get("/api/ping")
    async def ping():
        return {{"version": VERSION, "pid": os.getpid(),
                "deploymentId": os.environ["DEPLOYMENT_ID"]}}

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await request.body()
        return {{"version": VERSION, "len": len(body)}}

    @app.get("/echo/{{rest:path}}")
    async def echo(rest: str, request: Request):
        return {{"path": request.url.path, "query": request.url.query,
                "fwd": {{k: v for k, v in request.headers.items()
                        if k.startswith("x-forwarded-")}}}}

    @app.get("/api/stream")
    async def stream():
        async def events():
            for i in range(4):
                yield f"data: {{i}}\\n\\n"
                await asyncio.sleep(0.8)
        return StreamingResponse(events(), media_type="text/event-stream")
'''


def agent_files(version: str, broken: bool = False) -> dict[str, str]:
    """A FastAPI agent answering /api/ping with its version; `broken`: fails at import."""
    api = API.format(version=version)
    if broken:
        api = "raise RuntimeError('this version cannot start')\n" + api
    return {
        "agent.yaml": f"name: {AGENT}\nversion: {version}\nentrypoint: main:handler\n"
                      "rest:\n  entry: api:mount\n",
        "requirements.txt": "fastapi\nuvicorn\n",
        "src/main.py": "def handler(context):\n    return {'ok': True}\n",
        "src/api.py": api,
    }


@pytest.fixture(scope="module")
def pard() -> Iterator[Pard]:
    """A pard whose front door waits up to 30 s and has short client timeouts."""
    with running_pard("front", {
            "front": {"hold_s": 30.0, "header_timeout_s": 2.0, "body_timeout_s": 2.0,
                      "max_body_bytes": 1024 * 1024},
            # Sandboxes share the host's network and other test pards allocate from 18100
            # up: while this agent restarts, one of theirs could take its free port.
            "ports": {"rest": [28100, 28199], "a2a": [58100, 58199], "ui": [23100, 23199]}}) as p:
        yield p


@pytest.fixture(scope="module")
def deployed(pard: Pard) -> dict:
    d = pard.deploy(AGENT, apkg_with(pard.root / "apkg", agent_files("1.0.0")), version="1.0.0")
    assert d["status"] == "healthy", d
    return d


def front(pard: Pard) -> tuple[str, int]:
    host, _, port = pard.front_url.removeprefix("http://").rpartition(":")
    return host, int(port)


def request(pard: Pard, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 40) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*front(pard), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(pard: Pard, path: str, **kw) -> tuple[int, dict]:
    status, _, body = request(pard, "GET", path, **kw)
    return status, json.loads(body)


def raw(pard: Pard, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send `data` as is and read what comes back until the server closes or `wait_s`."""
    with socket.create_connection(front(pard), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def unit_deployment(agent: str) -> str:
    """The DEPLOYMENT_ID the agent's unit runs with (what `systemctl status` shows)."""
    env = sh("systemctl", "show", "-P", "Environment", f"par-agent@{agent}.service").stdout
    return next((w.split("=", 1)[1] for w in env.split() if w.startswith("DEPLOYMENT_ID=")), "")


# ---------------------------------------------------------------- routing


def test_routes_by_agent_and_deployment_id(pard: Pard, deployed: dict) -> None:
    status, body = get_json(pard, f"/agents/{AGENT}/api/ping")
    assert status == 200 and body["version"] == "1.0.0"
    assert body["deploymentId"] == deployed["deploymentId"]
    status, body = get_json(pard, f"/agents/{deployed['deploymentId']}/api/ping")
    assert status == 200 and body["deploymentId"] == deployed["deploymentId"]


def test_prefix_stripped_and_forwarded_headers(pard: Pard, deployed: dict) -> None:
    status, body = get_json(pard, f"/agents/{AGENT}/echo/a/b%20c?x=1&y=2",
                            headers={"X-Forwarded-For": "203.0.113.7", "Host": "example.test"})
    assert status == 200, body
    assert body["path"] == "/echo/a/b c" and body["query"] == "x=1&y=2"
    fwd = body["fwd"]
    assert fwd["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert fwd["x-forwarded-proto"] == "http"
    assert fwd["x-forwarded-host"] == "example.test"
    assert fwd["x-forwarded-prefix"] == f"/agents/{AGENT}"


def test_unknown_agent_is_json_404(pard: Pard, deployed: dict) -> None:
    status, body = get_json(pard, "/agents/fd-nobody/api/ping")
    assert status == 404 and body["error"]["code"] == "agent_not_found"
    status, body = get_json(pard, "/somewhere/else")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_post_bodies_chunked_and_plain(pard: Pard, deployed: dict) -> None:
    status, _, body = request(pard, "POST", f"/agents/{AGENT}/api/chat", body=b"x" * 5000,
                              headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and json.loads(body)["len"] == 5000
    chunks = iter([b"a" * 3000, b"b" * 3000])
    conn = http.client.HTTPConnection(*front(pard), timeout=10)
    conn.request("POST", f"/agents/{AGENT}/api/chat", body=chunks, encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["len"] == 6000
    conn.close()


def test_sse_first_event_arrives_before_the_stream_ends(pard: Pard, deployed: dict) -> None:
    conn = http.client.HTTPConnection(*front(pard), timeout=10)
    started = time.monotonic()
    conn.request("GET", f"/agents/{AGENT}/api/stream")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    first = resp.readline()
    first_at = time.monotonic() - started
    rest = resp.read()
    ended_at = time.monotonic() - started
    conn.close()
    assert first == b"data: 0\n"
    assert rest.count(b"data: ") == 3
    print(f"\nSSE: first event after {first_at * 1000:.0f} ms, stream ended after "
          f"{ended_at * 1000:.0f} ms")
    assert first_at < 0.5 and ended_at > 2.0


def test_websocket_upgrade_to_an_agent_without_websocket_is_4xx(pard: Pard,
                                                                deployed: dict) -> None:
    status, _, body = request(pard, "GET", f"/agents/{AGENT}/api/ping", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert 400 <= status < 500, (status, body)
    assert json.loads(body)["error"]["code"] == "not_websocket"
    status, _, body = request(pard, "GET", f"/agents/{AGENT}/api/ping",
                              headers={"Connection": "Upgrade", "Upgrade": "h2c"})
    assert status == 400 and json.loads(body)["error"]["code"] == "upgrade_refused"


# ---------------------------------------------------------------- bad input


# ids: the rows of docs/reliability.md's front door table (test_reliability_front_door.py)
PATH_CASES = ["dotdot", "encoded-dotdot", "encoded-slash", "encoded-backslash", "into-pard",
              "encoded-name"]


@pytest.mark.parametrize("path", [
    f"/agents/{AGENT}/../fd-other/api/ping",
    f"/agents/{AGENT}/%2e%2e/fd-other/api/ping",
    f"/agents/{AGENT}/api%2F..%2Fping",
    f"/agents/{AGENT}/api/%5c..%5cping",
    "/agents/..%2Fpar.sock/health",
    "/agents/%66d-echo/api/ping",
], ids=PATH_CASES)
def test_paths_that_try_to_leave_their_agent_are_400(pard: Pard, deployed: dict,
                                                     path: str) -> None:
    reply = raw(pard, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b'"bad_path"' in reply


def test_oversized_headers_and_bodies_are_4xx(pard: Pard, deployed: dict) -> None:
    status, _, _ = request(pard, "GET", f"/agents/{AGENT}/api/ping",
                           headers={"X-Big": "a" * 20000})
    assert status == 400
    status, _, body = request(pard, "POST", f"/agents/{AGENT}/api/chat",
                              body=b"x" * (1024 * 1024 + 1))
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    conn = http.client.HTTPConnection(*front(pard), timeout=10)
    chunks = iter([b"y" * 300_000] * 4)
    conn.request("POST", f"/agents/{AGENT}/api/chat", body=chunks, encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 413
    conn.close()


def test_slow_clients_time_out_and_others_are_untouched(pard: Pard, deployed: dict) -> None:
    started = time.monotonic()
    reply = raw(pard, b"GET /agents/fd-echo/api/ping HTTP/1.1\r\nHost: x\r\n", wait_s=6)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < 5
    # a body that stops coming: 408 after body_timeout_s
    reply = raw(pard, b"POST /agents/fd-echo/api/chat HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 100\r\n\r\nonly-part", wait_s=6)
    assert b" 408 " in reply.split(b"\r\n", 1)[0], reply[:200]
    assert get_json(pard, f"/agents/{AGENT}/api/ping")[0] == 200


def test_stopped_agent_is_json_503_with_retry_after(pard: Pard, deployed: dict) -> None:
    other = "fd-stop"
    d = pard.deploy(other, apkg_with(pard.root / "apkg", agent_files("1.0.0")), version="1.0.0")
    assert d["status"] == "healthy"
    assert get_json(pard, f"/agents/{other}/api/ping")[0] == 200
    pard.client().action(other, "stop")
    status, headers, body = request(pard, "GET", f"/agents/{other}/api/ping")
    assert status == 503 and headers.get("Retry-After")
    assert json.loads(body)["error"]["code"] == "agent_unavailable"
    # the routes follow the store within milliseconds: "stopping", then "stopped"
    wait_for(lambda: json.loads(request(pard, "GET", f"/agents/{other}/api/ping")[2])
             .get("status") == "stopped", timeout=5)
    assert get_json(pard, f"/agents/{AGENT}/api/ping")[0] == 200  # others untouched
    pard.client().delete(other, purge=True)


def test_front_door_is_sandboxed_and_its_routes_hold_no_secret(pard: Pard,
                                                               deployed: dict) -> None:
    show = sh("systemctl", "show", "par-front.service", "-p", "User", "-p", "DynamicUser",
              "-p", "ProtectSystem", "-p", "NoNewPrivileges", "-p", "PrivateTmp",
              "-p", "MainPID").stdout
    props = dict(line.split("=", 1) for line in show.split())
    assert props["User"] == "par-front" and props["DynamicUser"] == "yes"
    assert props["ProtectSystem"] == "strict" and props["NoNewPrivileges"] == "yes"
    assert props["PrivateTmp"] == "yes"
    uid = int(Path(f"/proc/{props['MainPID']}/status").read_text().split("Uid:")[1].split()[0])
    assert uid != 0
    routes = (pard.state / "front" / "routes.json").read_text()
    assert TEST_TOKEN not in routes and "env" not in json.loads(routes)["agents"][AGENT]
    assert sh("systemctl", "is-active", "par-front.socket").stdout.strip() == "active"


# ---------------------------------------------------------------- no refused request


@dataclass
class LoadReport:
    """What the clients saw."""

    ok: int = 0
    errors: list[str] = field(default_factory=list)
    stale_retries: int = 0  # a reused keep-alive connection closed under a request
    longest_s: float = 0.0
    versions: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client(pard: Pard, deadline: float, report: LoadReport, n: int) -> None:
    host, port = front(pard)
    conn: http.client.HTTPConnection | None = None
    i = 0
    while time.monotonic() < deadline:
        i += 1
        post = (i + n) % 4 == 0
        method, path = ("POST", f"/agents/{AGENT}/api/chat") if post else \
            ("GET", f"/agents/{AGENT}/api/ping")
        body = b"z" * 2048 if post else None
        started = time.monotonic()
        for attempt in (1, 2):
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=60)
            try:
                conn.request(method, path, body=body)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                conn = None
                # what HTTP clients do (urllib3, browsers): a reused keep-alive connection
                # the server closed before answering is opened again, once
                if reused and attempt == 1:
                    with report.lock:
                        report.stale_retries += 1
                    continue
                with report.lock:
                    report.errors.append(f"{method} {path}: {exc!r}")
                break
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = None
                with report.lock:
                    report.errors.append(f"{method} {path}: {exc!r}")
                break
            took = time.monotonic() - started
            with report.lock:
                report.longest_s = max(report.longest_s, took)
                if resp.status == 200:
                    report.ok += 1
                    report.versions.add(json.loads(data)["version"])
                else:
                    report.errors.append(f"{method} {path}: {resp.status} {data[:200]!r}")
            break
        time.sleep(THINK_S)
    if conn is not None:
        conn.close()


def under_load(pard: Pard, change: Callable[[], None], label: str) -> LoadReport:
    """Run `change` 3 s into LOAD_S seconds of CLIENTS clients; every request must succeed."""
    report = LoadReport()
    deadline = time.monotonic() + LOAD_S
    threads = [threading.Thread(target=_client, args=(pard, deadline, report, n), daemon=True)
               for n in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(3)
    began = time.monotonic()
    change()
    changed_s = time.monotonic() - began
    for t in threads:
        t.join(LOAD_S + 90)
    print(f"\n{label}: {report.ok} answers, {len(report.errors)} errors, longest wait "
          f"{report.longest_s * 1000:.0f} ms, change took {changed_s:.1f} s, reconnects of "
          f"closed keep-alive connections {report.stale_retries}, versions "
          f"{sorted(report.versions)}")
    measure(f"front door, longest wait across {label}",
            f"{report.longest_s * 1000:.0f} ms ({report.ok} answers, 0 errors)"
            if not report.errors else f"{len(report.errors)} errors")
    assert not report.errors, report.errors[:10]
    assert report.ok > CLIENTS * 10
    return report


def _deploy(pard: Pard, version: str, broken: bool = False) -> dict:
    return pard.deploy(AGENT, apkg_with(pard.root / "apkg", agent_files(version, broken)),
                       version=version)


def test_zero_refused_across_a_redeploy(pard: Pard, deployed: dict) -> None:
    done: dict = {}
    report = under_load(pard, lambda: done.update(_deploy(pard, "2.0.0")), "redeploy")
    assert done["status"] == "healthy"
    assert "2.0.0" in report.versions
    assert unit_deployment(AGENT) == done["deploymentId"]
    assert get_json(pard, f"/agents/{AGENT}/api/ping")[1]["version"] == "2.0.0"


def test_zero_refused_across_parctl_restart(pard: Pard, deployed: dict) -> None:
    before = get_json(pard, f"/agents/{AGENT}/api/ping")[1]

    def restart() -> None:
        env = dict(os.environ, PARCTL_SOCKET=str(pard.socket))
        res = subprocess.run([sys.executable, "-m", "par.cli", "restart", AGENT],
                             capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 0, res.stderr

    under_load(pard, restart, "parctl restart")
    after = get_json(pard, f"/agents/{AGENT}/api/ping")[1]
    assert after["pid"] != before["pid"]
    assert unit_deployment(AGENT) == after["deploymentId"]


def test_zero_refused_across_sigkill_of_the_agent(pard: Pard, deployed: dict) -> None:
    before = get_json(pard, f"/agents/{AGENT}/api/ping")[1]

    def kill() -> None:
        sh("systemctl", "kill", "-s", "KILL", "--kill-who=main", f"par-agent@{AGENT}.service")
        wait_for(lambda: get_json(pard, f"/agents/{AGENT}/api/ping")[1]["pid"] != before["pid"],
                 timeout=30)

    under_load(pard, kill, "SIGKILL of the agent")
    assert unit_deployment(AGENT) == before["deploymentId"]


def test_zero_refused_across_a_failed_redeploy(pard: Pard, deployed: dict) -> None:
    before = get_json(pard, f"/agents/{AGENT}/api/ping")[1]
    done: dict = {}
    under_load(pard, lambda: done.update(_deploy(pard, "3.0.0", broken=True)), "failed redeploy")
    assert done["status"] == "failed"
    after = get_json(pard, f"/agents/{AGENT}/api/ping")[1]
    assert after["version"] == before["version"] and after["deploymentId"] == before["deploymentId"]
    assert unit_deployment(AGENT) == before["deploymentId"]


def test_zero_refused_across_a_restart_of_the_front_door(pard: Pard, deployed: dict) -> None:
    pid = sh("systemctl", "show", "-P", "MainPID", "par-front.service").stdout.strip()

    def restart() -> None:
        sh("systemctl", "restart", "par-front.service", timeout=60)

    under_load(pard, restart, "front door restart")
    assert sh("systemctl", "show", "-P", "MainPID", "par-front.service").stdout.strip() != pid


def test_restarting_pard_leaves_the_front_door_alone(pard: Pard, deployed: dict) -> None:
    pid = sh("systemctl", "show", "-P", "MainPID", "par-front.service").stdout.strip()
    pard.restart()
    assert sh("systemctl", "show", "-P", "MainPID", "par-front.service").stdout.strip() == pid
    assert get_json(pard, f"/agents/{AGENT}/api/ping")[0] == 200


def test_api_and_parctl_show_the_front_door_url(pard: Pard, deployed: dict) -> None:
    url = f"{pard.front_url}/agents/{AGENT}/"
    agents = {a["agentAppId"]: a for a in pard.client().agents()["agents"]}
    assert agents[AGENT]["frontUrl"] == url
    env = dict(os.environ, PARCTL_SOCKET=str(pard.socket))
    res = subprocess.run([sys.executable, "-m", "par.cli", "status", AGENT], capture_output=True,
                         text=True, timeout=60, env=env)
    assert url in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------- WebSocket

WS_API = '''
from fastapi import WebSocket


def mount(app):
    @app.websocket("/ws/echo")
    async def echo(ws: WebSocket):
        await ws.accept()
        async for text in ws.iter_text():
            await ws.send_text(ws.scope["path"] + " " + text)
'''


def test_websocket_through_the_front_door_to_a_uvicorn_agent(pard: Pard, deployed: dict) -> None:
    """A FastAPI agent's WebSocket route (uvicorn with websockets, as real agents run it),
    reached through the front door: upgrade, messages both ways, prefix stripped."""
    import asyncio

    import aiohttp

    agent = "fd-ws"
    d = pard.deploy(agent, apkg_with(pard.root / "apkg", {
        "agent.yaml": f"name: {agent}\nversion: 1.0.0\nentrypoint: main:handler\n"
                      "rest:\n  entry: api:mount\n",
        "requirements.txt": "fastapi\nuvicorn\nwebsockets\n",
        "src/main.py": "def handler(context):\n    return {'ok': True}\n",
        "src/api.py": WS_API}))
    assert d["status"] == "healthy", d

    async def talk() -> list[str]:
        replies = []
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{pard.front_url}/agents/{agent}/ws/echo") as ws:
            for i in range(3):
                await ws.send_str(f"m{i}")
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                replies.append(msg.data)
        return replies

    assert asyncio.run(talk()) == ["/ws/echo m0", "/ws/echo m1", "/ws/echo m2"]
    assert get_json(pard, f"/agents/{AGENT}/api/ping")[0] == 200  # the other agent untouched
    pard.client().delete(d["deploymentId"], purge=True)
