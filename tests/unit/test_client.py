"""par.client against a fake pard: a stdlib HTTP server on a unix socket in a temp dir.

`FakePard` and the docs/api.md-shaped payloads below are also used by test_cli.py.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from par.client import ApiError, Client, DaemonUnreachable, UnixHTTPConnection

# -- the fake daemon -----------------------------------------------------------


@dataclass
class Seen:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


Reply = tuple[int, Any]  # (status, dict/list -> JSON | str -> text | bytes -> raw)
Responder = Callable[[Seen, re.Match], Reply]


class _Server(ThreadingHTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True

    def __init__(self, path: Path, fake: FakePard) -> None:
        self.fake = fake
        super().__init__(str(path), _Handler)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        # HTTPServer.server_bind wants (host, port); a unix socket has a path.
        socketserver.UnixStreamServer.server_bind(self)  # type: ignore[arg-type]
        self.server_name, self.server_port = "fake-pard", 0

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up is what some tests want


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        seen = Seen(self.command, url.path, dict(parse_qsl(url.query)),
                    {k.lower(): v for k, v in self.headers.items()},
                    json.loads(raw) if raw else None)
        status, payload = self.server.fake.dispatch(seen)
        if isinstance(payload, bytes):
            data, ctype = payload, "application/octet-stream"
        elif isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; version=0.0.4"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep test output clean


class FakePard:
    """Answers canned replies per (method, path regex) and records every request."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.requests: list[Seen] = []
        self._routes: list[tuple[str, re.Pattern[str], Responder]] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None

    def on(self, method: str, pattern: str, *replies: Reply | Responder) -> None:
        """Route `method pattern`: one function, or replies given in turn (the last repeats)."""
        if len(replies) == 1 and callable(replies[0]):
            responder = replies[0]
        else:
            queue = list(replies)

            def responder(_seen: Seen, _match: re.Match) -> Reply:
                return queue.pop(0) if len(queue) > 1 else queue[0]

        # newest first, so a test can override a default route
        self._routes.insert(0, (method, re.compile(pattern), responder))

    def dispatch(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            for method, pattern, responder in self._routes:
                match = pattern.fullmatch(seen.path)
                if method == seen.method and match:
                    return responder(seen, match)
        return 404, error("not_found", f"no route {seen.method} {seen.path}")

    def calls(self, method: str | None = None) -> list[str]:
        """`METHOD /path?query` of every request, in order."""
        out = []
        for s in self.requests:
            if method in (None, s.method):
                q = "&".join(f"{k}={v}" for k, v in s.query.items())
                out.append(f"{s.method} {s.path}" + (f"?{q}" if q else ""))
        return out

    def start(self) -> FakePard:
        self._server = _Server(self.socket_path, self)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# -- docs/api.md-shaped payloads -------------------------------------------------

PHASES = ("downloading", "loading", "starting")
STATUSES = ("pending", "downloading", "loading", "starting", "healthy")


def error(code: str, message: str, field: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "field": field}}


def record(status: str = "healthy", *, agent: str = "hello", deployment_id: str = "hello-d1",
           version: str = "1.0.0", **over: Any) -> dict:
    """A deployment record; phases before `status` are finished, `status`'s own has started."""
    phases: dict[str, dict] = {}
    t = 1764200000.0
    seconds = {"downloading": 0.1, "loading": 3.2, "starting": 0.8}
    reached = STATUSES.index(status) if status in STATUSES else len(STATUSES)
    for name in PHASES:
        index = STATUSES.index(name)
        if index < reached:
            phases[name] = {"start": t, "end": t + seconds[name], "seconds": seconds[name]}
            t += seconds[name]
        elif index == reached:
            phases[name] = {"start": t, "end": None, "seconds": None}
    rec = {
        "deploymentId": deployment_id, "agentAppId": agent, "orgId": "", "version": version,
        "status": status, "current": status == "healthy", "desiredState": "running",
        "error": None, "unit": f"par-agent@{agent}.service", "venv": f"{agent}_1a2b3c4",
        "venvReused": False, "ports": {"rest": 8100, "a2a": 50100, "ui": 3100},
        "phases": phases, "createdAt": 1764200000.0, "updatedAt": t,
        "request": {"deploymentId": deployment_id, "agentAppId": agent},
    }
    rec.update(over)
    return rec


def unit(active: str = "active", restarts: int = 0) -> dict:
    return {"unit": "par-agent@hello.service", "loadState": "loaded", "activeState": active,
            "subState": "running" if active == "active" else "dead", "mainPid": 4242,
            "nRestarts": restarts, "result": "success", "execMainStatus": 0,
            "since": time.time() - 3725, "statusText": ""}


def health(healthy: bool = True) -> dict:
    return {"status": "healthy" if healthy else "failed", "healthy": healthy,
            "message": "" if healthy else "REST /health answered 503",
            "details": unit("active" if healthy else "failed", restarts=0 if healthy else 3),
            "surfaces": {"rest": healthy}, "ports": {"rest": 8100, "a2a": 50100, "ui": 3100}}


def daemon_health() -> dict:
    return {"ok": True, "version": "0.1.0", "agents": {"healthy": 2},
            "disk": {"path": "/var/lib/pixell-runtime", "freeBytes": 10 * 1024**3,
                     "totalBytes": 50 * 1024**3},
            "capacity": {}, "installer": {"kind": "uv", "version": "0.4.30",
                                          "path": "/var/lib/pixell-runtime/tools/uv"}}


# -- the client ----------------------------------------------------------------


def test_every_method_calls_its_endpoint_and_returns_the_answer(pard: FakePard) -> None:
    pard.on("GET", "/deployments", (200, {"deployments": [record()]}))
    pard.on("GET", "/deployments/[^/]+", (200, record()))
    pard.on("GET", "/deployments/[^/]+/health", (200, health()))
    pard.on("GET", "/deployments/[^/]+/events", (200, {"events": []}))
    pard.on("POST", "/deployments/[^/]+/(stop|start|restart)", (200, record("stopped")))
    pard.on("DELETE", "/deployments/[^/]+", (200, {"deleted": "hello-d1", "purged": []}))
    pard.on("GET", "/agents", (200, {"agents": []}))
    pard.on("GET", "/health", (200, daemon_health()))
    pard.on("GET", "/metrics", (200, 'par_deployments{status="healthy"} 3\n'))
    pard.on("GET", "/venvs", (200, {"venvs": []}))
    pard.on("POST", "/venvs/prune", (200, {"evicted": ["old_1234567"]}))
    pard.on("POST", "/venvs/prewarm", (200, {"seconds": 1.2}))
    pard.on("POST", "/installer/install-uv", (200, {"path": "/x/uv", "version": "0.4.30"}))
    c = Client(pard.socket_path, timeout=5)

    assert c.deployments(agent_app_id="hello") == {"deployments": [record()]}
    assert c.deployment("hello-d1")["status"] == "healthy"
    assert c.deployment("hello-d1", wait=30)["status"] == "healthy"
    assert c.deployment("hello-d1", wait=30, since=1764200000.25)["status"] == "healthy"
    assert c.health("hello-d1")["healthy"] is True
    assert c.events("hello-d1", limit=5) == {"events": []}
    for name in ("stop", "start", "restart"):
        assert c.action("hello-d1", name)["status"] == "stopped"
    assert c.delete("hello-d1") == {"deleted": "hello-d1", "purged": []}
    c.delete("hello-d1", purge=True)
    assert c.agents() == {"agents": []}
    assert c.daemon_health()["installer"]["kind"] == "uv"
    assert c.metrics() == 'par_deployments{status="healthy"} 3\n'
    assert c.venvs() == {"venvs": []}
    assert c.prune_venvs() == {"evicted": ["old_1234567"]}
    assert c.prewarm("requests==2.31.0\n") == {"seconds": 1.2}
    assert c.install_uv()["version"] == "0.4.30"

    assert pard.calls() == [
        "GET /deployments?agentAppId=hello",
        "GET /deployments/hello-d1",
        "GET /deployments/hello-d1?wait=30",
        "GET /deployments/hello-d1?wait=30&since=1764200000.25",
        "GET /deployments/hello-d1/health",
        "GET /deployments/hello-d1/events?limit=5",
        "POST /deployments/hello-d1/stop",
        "POST /deployments/hello-d1/start",
        "POST /deployments/hello-d1/restart",
        "DELETE /deployments/hello-d1",
        "DELETE /deployments/hello-d1?purge=1",
        "GET /agents",
        "GET /health",
        "GET /metrics",
        "GET /venvs",
        "POST /venvs/prune",
        "POST /venvs/prewarm",
        "POST /installer/install-uv",
    ]
    assert pard.requests[16].body == {"requirements": "requests==2.31.0\n"}


def test_deploy_sends_json_with_the_idempotency_key(pard: FakePard) -> None:
    pard.on("POST", "/deploy", lambda seen, _m: (202, {
        "status": "accepted", "deploymentId": seen.body["deploymentId"],
        "deployment": record("pending", deployment_id=seen.body["deploymentId"])}))
    body = {"deploymentId": "hello-d9", "agentAppId": "hello", "orgId": "", "version": "1.0.0",
            "packageUrl": "https://example.com/hello.apkg"}

    answer = Client(pard.socket_path).deploy(body)

    assert answer["status"] == "accepted" and answer["deploymentId"] == "hello-d9"
    (seen,) = pard.requests
    assert seen.body == body
    assert seen.headers["idempotency-key"] == "hello-d9"
    assert seen.headers["content-type"] == "application/json"


def test_ids_are_quoted_into_one_path_segment(pard: FakePard) -> None:
    pard.on("GET", "/deployments/[^/]+", (200, record()))
    Client(pard.socket_path).deployment("../agents")
    assert pard.requests[0].path == "/deployments/..%2Fagents"


def test_error_envelope_becomes_api_error(pard: FakePard) -> None:
    pard.on("POST", "/deploy",
            (400, error("invalid_field", "memoryMB must be an integer", "memoryMB")))
    with pytest.raises(ApiError) as info:
        Client(pard.socket_path).deploy({"deploymentId": "d"})
    err = info.value
    assert (err.status, err.code, err.message, err.field) == (
        400, "invalid_field", "memoryMB must be an integer", "memoryMB")


def test_unknown_id_is_a_404_api_error(pard: FakePard) -> None:
    with pytest.raises(ApiError) as info:
        Client(pard.socket_path).deployment("ghost")
    assert info.value.status == 404 and info.value.code == "not_found"


def test_error_without_envelope_still_becomes_api_error(pard: FakePard) -> None:
    pard.on("GET", "/agents", (502, "<html>Bad Gateway</html>"))
    with pytest.raises(ApiError) as info:
        Client(pard.socket_path).agents()
    assert info.value.status == 502
    assert info.value.code == "http_502"
    assert "Bad Gateway" in info.value.message


def test_answer_that_is_not_a_json_object_is_an_error(pard: FakePard) -> None:
    pard.on("GET", "/agents", (200, "not json"))
    pard.on("GET", "/venvs", (200, [1, 2]))
    c = Client(pard.socket_path)
    with pytest.raises(Exception) as info:
        c.agents()
    assert getattr(info.value, "code", None) == "bad_response"
    with pytest.raises(Exception) as info:
        c.venvs()
    assert getattr(info.value, "code", None) == "bad_response"


def test_missing_socket_is_daemon_unreachable_with_the_hint(sockdir: Path) -> None:
    path = sockdir / "par.sock"
    with pytest.raises(DaemonUnreachable) as info:
        Client(path).agents()
    assert str(info.value) == (
        f"pard is not running (no socket at {path}): start it with `systemctl start par`")


def test_refused_connection_is_daemon_unreachable(sockdir: Path) -> None:
    # A socket file nobody listens on: what a crashed pard leaves behind.
    path = sockdir / "par.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(DaemonUnreachable) as info:
        Client(path).daemon_health()
    assert "refuses connections" in info.value.message
    assert "systemctl start par" in info.value.message


def test_permission_denied_is_daemon_unreachable(sockdir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, for whom a 0600 socket is always open: simulate the refusal.
    def refuse(self: UnixHTTPConnection) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(UnixHTTPConnection, "connect", refuse)
    with pytest.raises(DaemonUnreachable) as info:
        Client(sockdir / "par.sock").agents()
    assert "permission denied" in info.value.message and "root-only" in info.value.message
    assert "systemctl start par" not in info.value.message  # starting pard would not help


def test_slow_daemon_times_out_as_unreachable(pard: FakePard) -> None:
    def slow(_seen: Seen, _m: re.Match) -> Reply:
        time.sleep(0.3)
        return 200, {"agents": []}

    pard.on("GET", "/agents", slow)
    with pytest.raises(DaemonUnreachable) as info:
        Client(pard.socket_path, timeout=0.05).agents()
    assert "did not answer" in info.value.message


def test_a_waiting_request_gets_more_than_the_client_timeout(pard: FakePard) -> None:
    """pard may hold GET ...?wait=S back for S seconds: that is no timeout."""
    def held(_seen: Seen, _m: re.Match) -> Reply:
        time.sleep(0.3)
        return 200, record()

    pard.on("GET", "/deployments/[^/]+", held)
    assert Client(pard.socket_path, timeout=0.05).deployment("hello-d1", wait=1)["status"] == \
        "healthy"


def test_unknown_action_is_refused_before_sending(pard: FakePard) -> None:
    with pytest.raises(ValueError):
        Client(pard.socket_path).action("hello-d1", "kill")
    assert pard.requests == []
