"""par.api over a real unix socket and real TCP (127.0.0.1:0), against a fake Service."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from par.api import ApiServer
from par.client import UnixHTTPConnection
from par.config import Config
from par.deploy_request import DeployRequest
from par.errors import NotFound, ParError
from tests.unit.logs import captured_logger
from tests.unit.test_deploy_request import BAD_CASES, INJECTION_IDS, base_request, mutate

TOKEN = "t0ken-for-tests"
SECRET_ENV = "s3cret-value"  # an env value in base_request(): must never reach logs or answers
RECORD = {"deploymentId": "d-1", "agentAppId": "hello", "status": "pending"}


@dataclass
class FakeService:
    """Records every call; `fail[name]` makes that method raise."""

    calls: list[tuple] = field(default_factory=list)
    fail: dict[str, BaseException] = field(default_factory=dict)

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def deploy(self, req: DeployRequest) -> tuple[int, dict]:
        self._call("deploy", req)
        return 202, {"status": "accepted", "deploymentId": req.deployment_id, "deployment": RECORD}

    def list_deployments(self, agent_app_id: str | None, status: str | None) -> list[dict]:
        self._call("list_deployments", agent_app_id, status)
        return [RECORD]

    def get_deployment(self, deployment_id: str, wait: float | None = None,
                       since: float | None = None) -> dict:
        self._call("get_deployment", deployment_id, wait, since)
        return RECORD

    def deployment_health(self, deployment_id: str) -> dict:
        self._call("deployment_health", deployment_id)
        return {"status": "healthy", "healthy": True}

    def deployment_events(self, deployment_id: str, limit: int | None) -> list[dict]:
        self._call("deployment_events", deployment_id, limit)
        return [{"ts": 1.0, "event": "created", "message": "", "fields": {}}]

    def action(self, deployment_id: str, name: str) -> dict:
        self._call("action", deployment_id, name)
        return RECORD

    def delete(self, deployment_id: str, purge: bool) -> dict:
        self._call("delete", deployment_id, purge)
        return {"deleted": deployment_id, "purged": [Path("/x/packages/hello@1.apkg")]}

    def agents(self, include_all: bool = False) -> list[dict]:
        self._call("agents", include_all)
        return [{"agentAppId": "hello"}]

    def daemon_health(self) -> dict:
        self._call("daemon_health")
        return {"ok": True}

    def metrics(self) -> str:
        self._call("metrics")
        return 'par_deployments{status="healthy"} 1\n'

    def venvs(self) -> list[dict]:
        self._call("venvs")
        return [{"name": "hello_1a2b3c4"}]

    def prune_venvs(self) -> dict:
        self._call("prune_venvs")
        return {"evicted": []}

    def prewarm(self, requirements: str) -> dict:
        self._call("prewarm", requirements)
        return {"seconds": 0.1}

    def install_uv(self, version: str | None = None) -> dict:
        self._call("install_uv", version)
        return {"path": "/x/uv", "version": "0.5"}

    def set_env(self, deployment_id: str, values: dict[str, str], unset: list[str],
                restart: bool) -> tuple[int, dict]:
        self._call("set_env", deployment_id, values, unset, restart)
        if restart:
            return 202, {"status": "accepted", "deploymentId": "hello-env-1", "deployment": RECORD}
        return 200, {"deployment": RECORD, "restart": "pending"}

    def env_names(self, deployment_id: str) -> dict:
        self._call("env_names", deployment_id)
        return {"deploymentId": deployment_id, "names": ["A"]}


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    text: str

    def json(self) -> dict:
        return json.loads(self.text)

    def error(self) -> tuple[int, str, str | None]:
        err = self.json()["error"]
        return self.status, err["code"], err["field"]


@dataclass
class Env:
    service: FakeService
    server: ApiServer
    sock: Path
    port: int
    logs: io.StringIO

    def unix(self, method: str, path: str, body: object = None, headers: dict | None = None,
             raw: bytes | None = None) -> Reply:
        return self._send(UnixHTTPConnection(self.sock, 5.0), method, path, body, headers, raw)

    def tcp(self, method: str, path: str, body: object = None, headers: dict | None = None,
            token: str | None = TOKEN, raw: bytes | None = None) -> Reply:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        return self._send(conn, method, path, body, headers, raw)

    @staticmethod
    def _send(conn: http.client.HTTPConnection, method: str, path: str, body: object,
              headers: dict | None, raw: bytes | None) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read().decode())
        finally:
            conn.close()

    def raw_unix(self, data: bytes) -> bytes:
        """Send raw bytes on a fresh connection; return everything until the server closes."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture(scope="module")
def server() -> Iterator[Env]:
    # Short folder under /tmp: unix socket paths are limited to 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="par-api-", dir="/tmp"))
    logger, stream = captured_logger("api")
    service = FakeService()
    api = ApiServer(service, Config(), logger)
    sock = folder / "par.sock"
    api.serve_unix(sock)
    port = api.serve_tcp("127.0.0.1", 0, TOKEN)
    yield Env(service, api, sock, port, stream)
    api.shutdown()
    shutil.rmtree(folder)


@pytest.fixture()
def env(server: Env) -> Env:
    server.service.calls.clear()
    server.service.fail.clear()
    server.logs.seek(0)
    server.logs.truncate()
    return server


# ---- routing ---------------------------------------------------------------------

# (method, path, body, expected call, expected status, a key of the answer)
ROUTES = [
    ("GET", "/deployments", None, ("list_deployments", None, None), 200, "deployments"),
    ("GET", "/deployments?agentAppId=hello&status=healthy", None,
     ("list_deployments", "hello", "healthy"), 200, "deployments"),
    ("GET", "/deployments?agentAppId=&status=", None, ("list_deployments", None, None), 200,
     "deployments"),
    ("GET", "/deployments/d-1", None, ("get_deployment", "d-1", None, None), 200,
     "deploymentId"),
    ("GET", "/deployments/d-1?wait=2.5", None, ("get_deployment", "d-1", 2.5, None), 200,
     "deploymentId"),
    ("GET", "/deployments/d-1?wait=30&since=1764200000.25", None,
     ("get_deployment", "d-1", 30.0, 1764200000.25), 200, "deploymentId"),
    ("GET", "/deployments/d-1/health", None, ("deployment_health", "d-1"), 200, "healthy"),
    ("GET", "/deployments/d-1/events", None, ("deployment_events", "d-1", None), 200, "events"),
    ("GET", "/deployments/d-1/events?limit=5", None, ("deployment_events", "d-1", 5), 200,
     "events"),
    ("POST", "/deployments/d-1/stop", None, ("action", "d-1", "stop"), 200, "deploymentId"),
    ("POST", "/deployments/d-1/start", None, ("action", "d-1", "start"), 200, "deploymentId"),
    ("POST", "/deployments/d-1/restart", None, ("action", "d-1", "restart"), 200, "deploymentId"),
    ("DELETE", "/deployments/d-1", None, ("delete", "d-1", False), 200, "deleted"),
    ("DELETE", "/deployments/d-1?purge=1", None, ("delete", "d-1", True), 200, "purged"),
    ("GET", "/agents", None, ("agents", False), 200, "agents"),
    ("GET", "/agents?all=1", None, ("agents", True), 200, "agents"),
    ("GET", "/health", None, ("daemon_health",), 200, "ok"),
    ("GET", "/venvs", None, ("venvs",), 200, "venvs"),
    ("POST", "/venvs/prune", None, ("prune_venvs",), 200, "evicted"),
    ("POST", "/venvs/prewarm", {"requirements": "requests==2.28.1\n"},
     ("prewarm", "requests==2.28.1\n"), 200, "seconds"),
    ("POST", "/installer/install-uv", None, ("install_uv", None), 200, "version"),
    ("POST", "/installer/install-uv", {"version": "0.13.9"}, ("install_uv", "0.13.9"), 200,
     "version"),
    ("POST", "/deployments/d-1/env", {"set": {"A": "1"}, "unset": ["B"]},
     ("set_env", "d-1", {"A": "1"}, ["B"], True), 202, "deploymentId"),
    ("POST", "/deployments/d-1/env", {"set": {"A": "1"}, "restart": False},
     ("set_env", "d-1", {"A": "1"}, [], False), 200, "restart"),
    ("GET", "/deployments/d-1/env", None, ("env_names", "d-1"), 200, "names"),
]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize(("method", "path", "body", "call", "status", "key"), ROUTES,
                         ids=[f"{r[0]} {r[1]}" for r in ROUTES])
def test_every_endpoint_routes(env: Env, transport: str, method: str, path: str, body: object,
                               call: tuple, status: int, key: str) -> None:
    reply = getattr(env, transport)(method, path, body)
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"] == "application/json"
    assert key in reply.json()
    assert env.service.calls == [call]


@pytest.mark.parametrize(("body", "field"), [
    ({"set": {"A": 1}}, "set"), ({"set": []}, "set"), ({"unset": "B"}, "unset"),
    ({"unset": [1]}, "unset"), ({"restart": "no"}, "restart")])
def test_env_change_refuses_bad_fields(env: Env, body: dict, field: str) -> None:
    reply = env.unix("POST", "/deployments/d-1/env", body)
    assert reply.status == 400 and reply.json()["error"]["field"] == field
    assert env.service.calls == []


def test_deploy_routes_with_the_parsed_request(env: Env) -> None:
    reply = env.unix("POST", "/deploy", base_request(), {"Idempotency-Key": "d-1"})
    assert reply.status == 202
    assert reply.json()["status"] == "accepted" and reply.json()["deploymentId"] == "d-1"
    [(name, req)] = env.service.calls
    assert name == "deploy" and isinstance(req, DeployRequest)
    assert req.env["API_KEY"] == SECRET_ENV and req.ports == {"rest": 8100, "a2a": 50100}


def test_deploy_answers_with_the_services_status(env: Env) -> None:
    # The same deploymentId again: the service answers 200 with the existing record.
    env.service.deploy = lambda req: (200, {"deployment": RECORD})  # type: ignore[method-assign]
    try:
        assert env.unix("POST", "/deploy", base_request()).status == 200
    finally:
        del env.service.deploy


def test_metrics_are_prometheus_text(env: Env) -> None:
    reply = env.unix("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'par_deployments{status="healthy"} 1' in reply.text


def test_deploy_over_tcp_with_requests(env: Env) -> None:
    url = f"http://127.0.0.1:{env.port}/deploy"
    reply = requests.post(url, json=base_request(), timeout=5,
                          headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "d-1"})
    assert reply.status_code == 202
    assert [c[0] for c in env.service.calls] == ["deploy"]


def test_unknown_path_and_wrong_method(env: Env) -> None:
    for path in ("/nope", "/deployments/d-1/bogus", "/deployments/d-1/health/x", "/", "/deploy/x"):
        assert env.unix("GET", path).error() == (404, "not_found", None)
    reply = env.unix("GET", "/deploy")
    assert reply.error() == (405, "method_not_allowed", None)
    assert reply.headers["Allow"] == "POST"
    reply = env.unix("PUT", "/deployments/d-1")
    assert reply.status == 405 and reply.headers["Allow"] == "DELETE, GET"
    assert env.unix("HEAD", "/health").status == 405
    assert env.service.calls == []


# ---- authentication on TCP -------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "},
    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
])
@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/deploy", base_request()), ("GET", "/deployments", None),
    ("DELETE", "/deployments/d-1", None), ("POST", "/venvs/prune", None), ("GET", "/nope", None),
])
def test_tcp_without_the_token_is_401_with_no_side_effect(
    env: Env, headers: dict, method: str, path: str, body: object
) -> None:
    reply = env.tcp(method, path, body, headers, token=None)
    assert reply.error() == (401, "unauthorized", None)
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert env.service.calls == []


def test_token_never_logged_and_scheme_is_case_insensitive(env: Env) -> None:
    reply = env.tcp("GET", "/health", headers={"Authorization": f"bearer {TOKEN}"}, token=None)
    assert reply.status == 200
    env.tcp("GET", "/health", token="wrong-guess")
    assert TOKEN not in env.logs.getvalue() and "wrong-guess" not in env.logs.getvalue()


def test_serve_tcp_refuses_an_empty_token() -> None:
    api = ApiServer(FakeService(), Config(), logging.getLogger("par.test.api.token"))
    for token in ("", "   ", "two words"):
        with pytest.raises(ParError) as info:
            api.serve_tcp("127.0.0.1", 0, token)
        assert info.value.code == "token_missing"
    assert api.tcp_port is None


def test_tcp_on_ipv6_loopback() -> None:
    api = ApiServer(FakeService(), Config(), logging.getLogger("par.test.api.v6"))
    try:
        port = api.serve_tcp("[::1]", 0, TOKEN)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        reply = requests.get(f"http://[::1]:{port}/health", timeout=5,
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 200 and api.tcp_port == port
    finally:
        api.shutdown()
    assert api.tcp_port is None


# ---- local-only package URLs -----------------------------------------------------

@pytest.mark.parametrize("url", ["file:///srv/hello.apkg", "/srv/hello.apkg",
                                 {"signedUrl": "file:///srv/hello.apkg"}])
def test_local_package_urls_only_on_the_socket(env: Env, url: object) -> None:
    body = mutate("packageUrl", url)
    reply = env.tcp("POST", "/deploy", body)
    assert reply.status == 403 and reply.json()["error"]["code"] == "local_only"
    assert env.service.calls == []
    assert env.unix("POST", "/deploy", body).status == 202
    assert env.service.calls[0][1].package_is_local


# ---- bodies ----------------------------------------------------------------------

def test_huge_body_refused_by_content_length_before_reading(env: Env) -> None:
    # Headers only: the server must answer without waiting for the gigabyte.
    answer = env.raw_unix(
        b"POST /deploy HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n{"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in head
    assert json.loads(body)["error"] == {
        "code": "body_too_large", "message": json.loads(body)["error"]["message"],
        "field": "Content-Length"}
    assert env.service.calls == []


def test_body_one_byte_over_the_cap(env: Env) -> None:
    cap = Config().listen.max_body_bytes
    padded = base_request() | {"padding": "x" * cap}
    reply = env.tcp("POST", "/deploy", padded)
    assert reply.error() == (413, "body_too_large", "Content-Length")
    assert env.service.calls == []


@pytest.mark.parametrize("raw", [
    b"{", b"", b"\xff\xfe{}", b'{"a": NaN}', b'{"deploymentId": "d-1", "deploymentId": "d-2"}',
    b"[" * 100_000, b"{} {}",
])
def test_bad_json(env: Env, raw: bytes) -> None:
    reply = env.unix("POST", "/deploy", raw=raw, headers={"Content-Length": str(len(raw))})
    assert reply.error() == (400, "bad_json", None)
    assert env.service.calls == []


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"1", b"null", b"true"])
def test_json_not_an_object(env: Env, raw: bytes) -> None:
    assert env.unix("POST", "/deploy", raw=raw).error() == (400, "not_object", None)
    assert env.unix("POST", "/venvs/prewarm", raw=raw).error() == (400, "not_object", None)
    assert env.service.calls == []


def test_missing_content_length_is_411(env: Env) -> None:
    answer = env.raw_unix(b"POST /deploy HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411")
    chunked = env.raw_unix(
        b"POST /deploy HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    assert chunked.startswith(b"HTTP/1.1 411")
    assert b'"length_required"' in chunked
    assert env.service.calls == []


@pytest.mark.parametrize("length", ["-1", "abc", "1, 2", "99999999999999999999"])
def test_bad_content_length(env: Env, length: str) -> None:
    answer = env.raw_unix(
        f"POST /deploy HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}".encode()
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["field"] == "Content-Length"
    assert env.service.calls == []


def test_expect_100_continue_only_for_a_body_that_will_be_read(env: Env) -> None:
    body = json.dumps(base_request()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(env.sock))
        s.sendall(b"POST /deploy HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        assert s.recv(65536).startswith(b"HTTP/1.1 202")
    # Too large: the answer is 413 at once, never an invitation to upload.
    answer = env.raw_unix(b"POST /deploy HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 999999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    assert [c[0] for c in env.service.calls] == ["deploy"]


def test_prewarm_needs_requirements_text(env: Env) -> None:
    assert env.unix("POST", "/venvs/prewarm", {}).error() == (400, "missing_field", "requirements")
    assert env.unix("POST", "/venvs/prewarm", {"requirements": ["x"]}).error() == (
        400, "invalid_field", "requirements")


@pytest.mark.parametrize(("path", "value", "status", "code", "field"), BAD_CASES,
                         ids=[f"{c[0]}={c[1]!r:.30}" for c in BAD_CASES])
def test_bad_deploy_fields_over_tcp(env: Env, path: str, value: object, status: int, code: str,
                                    field: str) -> None:
    reply = env.tcp("POST", "/deploy", mutate(path, value))
    assert reply.error() == (status, code, field)
    assert env.service.calls == []


def test_idempotency_key_mismatch(env: Env) -> None:
    reply = env.unix("POST", "/deploy", base_request(), {"Idempotency-Key": "d-2"})
    assert reply.error() == (400, "idempotency_mismatch", "Idempotency-Key")
    assert env.service.calls == []
    assert env.unix("POST", "/deploy", base_request(), {"Idempotency-Key": "d-1"}).status == 202


# ---- ids in paths, queries and bodies --------------------------------------------

@pytest.mark.parametrize("bad", INJECTION_IDS, ids=repr)
@pytest.mark.parametrize(("method", "template"), [
    ("GET", "/deployments/{}"), ("GET", "/deployments/{}/health"),
    ("GET", "/deployments/{}/events"), ("POST", "/deployments/{}/stop"),
    ("DELETE", "/deployments/{}"),
])
def test_injection_ids_in_paths_refused(env: Env, bad: str, method: str, template: str) -> None:
    reply = env.unix(method, template.format(quote(bad, safe="")))
    assert reply.error() == (400, "invalid_id", "deploymentId")
    assert env.service.calls == []


@pytest.mark.parametrize("path", ["/deployments/../x", "/deployments/a/b", "/deployments/./health",
                                  "/deployments/x%2F..%2F..%2Fetc/health",
                                  "/deployments/%2e%2e/stop", "/deployments/%ff"])
def test_unencoded_traversal_never_reaches_the_service(env: Env, path: str) -> None:
    reply = env.unix("GET" if "stop" not in path else "POST", path)
    assert reply.status in (400, 404)
    assert env.service.calls == []


@pytest.mark.parametrize("bad", ["../x", "x.service", "A", "a;b"])
def test_injection_ids_in_query_refused(env: Env, bad: str) -> None:
    reply = env.unix("GET", f"/deployments?agentAppId={quote(bad, safe='')}")
    assert reply.error() == (400, "invalid_id", "agentAppId")
    assert env.service.calls == []


@pytest.mark.parametrize("name", ["deploymentId", "agentAppId"])
@pytest.mark.parametrize("bad", INJECTION_IDS, ids=repr)
def test_injection_ids_in_the_deploy_body_refused(env: Env, name: str, bad: str) -> None:
    reply = env.tcp("POST", "/deploy", mutate(name, bad))
    assert reply.error() == (400, "invalid_id", name)
    assert env.service.calls == []


@pytest.mark.parametrize(("query", "field"), [
    ("/deployments?status=running", "status"), ("/deployments/d-1/events?limit=0", "limit"),
    ("/deployments/d-1/events?limit=-3", "limit"), ("/deployments/d-1/events?limit=x", "limit"),
    ("/deployments/d-1?wait=0", "wait"), ("/deployments/d-1?wait=61", "wait"),
    ("/deployments/d-1?wait=nan", "wait"), ("/deployments/d-1?wait=-1", "wait"),
    ("/deployments/d-1?wait=soon", "wait"), ("/deployments/d-1?wait=inf", "wait"),
    ("/deployments/d-1?wait=1&since=yesterday", "since"),
    ("/deployments/d-1?wait=1&since=nan", "since"),
])
def test_bad_query_values(env: Env, query: str, field: str) -> None:
    assert env.unix("GET", query).error() == (400, "invalid_field", field)
    assert env.unix("DELETE", "/deployments/d-1?purge=maybe").error() == (
        400, "invalid_field", "purge")
    assert env.service.calls == []


# ---- errors from the service -----------------------------------------------------

def test_par_error_from_the_service_keeps_its_status_and_envelope(env: Env) -> None:
    env.service.fail["get_deployment"] = NotFound("no deployment d-9", "deploymentId")
    assert env.unix("GET", "/deployments/d-9").json() == {
        "error": {"code": "not_found", "message": "no deployment d-9", "field": "deploymentId"}}
    env.service.fail["deploy"] = ParError("conflict", "d-1 exists with another body", None, 409)
    assert env.unix("POST", "/deploy", base_request()).error() == (409, "conflict", None)


def test_unexpected_exception_is_500_without_the_traceback(env: Env) -> None:
    env.service.fail["daemon_health"] = RuntimeError("secret-detail at /var/lib/x")
    reply = env.tcp("GET", "/health")
    assert reply.error() == (500, "internal", None)
    assert "secret-detail" not in reply.text and "Traceback" not in reply.text
    logged = [json.loads(line) for line in env.logs.getvalue().splitlines()]
    [internal] = [row for row in logged if row["event"] == "API internal error"]
    assert "RuntimeError: secret-detail" in internal["traceback"]
    # The server keeps serving.
    env.service.fail.clear()
    assert env.tcp("GET", "/health").status == 200


def test_unserializable_answer_is_a_clean_500(env: Env) -> None:
    env.service.agents = lambda: [object()]  # type: ignore[method-assign]
    try:
        assert env.unix("GET", "/agents").error() == (500, "internal", None)
    finally:
        del env.service.agents


# ---- logs and connections --------------------------------------------------------

def test_one_log_line_per_request_without_body_or_token(env: Env) -> None:
    env.tcp("POST", "/deploy", base_request())
    env.unix("GET", "/deployments/d-1?agentAppId=hello")
    env.unix("GET", "/nope")
    rows = [json.loads(line) for line in env.logs.getvalue().splitlines()]
    requests_logged = [row for row in rows if row["event"] == "API request"]
    assert [(r["method"], r["path"], r["status"], r["local"]) for r in requests_logged] == [
        ("POST", "/deploy", 202, False), ("GET", "/deployments/d-1", 200, True),
        ("GET", "/nope", 404, True)]
    assert all(isinstance(r["ms"], float) for r in requests_logged)
    assert requests_logged[2]["error"] == "not_found"
    text = env.logs.getvalue()
    assert SECRET_ENV not in text and TOKEN not in text and "API_KEY" not in text


def test_keep_alive_serves_several_requests_on_one_connection(env: Env) -> None:
    conn = UnixHTTPConnection(env.sock, 5.0)
    try:
        for path in ("/health", "/agents", "/deployments/d-1"):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()
    assert [c[0] for c in env.service.calls] == ["daemon_health", "agents", "get_deployment"]


def test_unread_body_closes_the_connection(env: Env) -> None:
    # A body sent to a path that is refused before reading must not be parsed as a request.
    smuggled = b"GET /venvs HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = env.raw_unix(
        b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
    )
    assert answer.startswith(b"HTTP/1.1 404") and answer.count(b"HTTP/1.1") == 1
    assert env.service.calls == []


def test_malformed_request_line_gets_the_json_envelope(env: Env) -> None:
    answer = env.raw_unix(b"GARBAGE\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.0 400")
    assert json.loads(body)["error"]["code"] == "bad_request"


# ---- the unix socket -------------------------------------------------------------

def test_socket_is_mode_0600(server: Env) -> None:
    mode = server.sock.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not list(server.sock.parent.glob(".*.tmp"))


@pytest.fixture()
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="par-s-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def _api() -> ApiServer:
    return ApiServer(FakeService(), Config(), logging.getLogger("par.test.api.socket"))


def test_stale_socket_is_replaced_and_removed_on_shutdown(folder: Path) -> None:
    path = folder / "par.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what a killed pard leaves
    api = _api()
    api.serve_unix(path)
    try:
        conn = UnixHTTPConnection(path, 5.0)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        api.shutdown()
    assert not path.exists()


def test_live_socket_and_non_socket_are_refused(folder: Path) -> None:
    path = folder / "par.sock"
    first = _api()
    first.serve_unix(path)
    try:
        with pytest.raises(ParError) as info:
            _api().serve_unix(path)
        assert info.value.code == "socket_in_use"
    finally:
        first.shutdown()
    path.write_text("not a socket")
    with pytest.raises(ParError) as info:
        _api().serve_unix(path)
    assert info.value.code == "socket_path_taken"
    assert path.read_text() == "not a socket"


def test_socket_folder_created_0700_and_unsafe_folder_refused(folder: Path) -> None:
    api = _api()
    api.serve_unix(folder / "run" / "par.sock")
    api.shutdown()
    assert stat.S_IMODE((folder / "run").stat().st_mode) == 0o700
    shared = folder / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ParError) as info:
        _api().serve_unix(shared / "par.sock")
    assert info.value.code == "socket_dir_unsafe"
    with pytest.raises(ParError) as info:
        _api().serve_unix(folder / ("x" * 120) / "par.sock")
    assert info.value.code == "socket_path_too_long"
