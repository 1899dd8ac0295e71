"""The agent host's own HTTP: the stdlib REST surface's request handling and the server
that stops at once.  Real sockets, in-process (the host is stdlib only)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from par.agent_host.par_agent_host import minihttp, stdlib_rest
from par.agent_host.par_agent_host.api import HostApi
from par.agent_host.par_agent_host.httpserver import DrainingServer, HttpSurface
from par.agent_host.par_agent_host.spec import AgentSpec, HostEnv, Ports
from par.agent_host.par_agent_host.surfaces import Health, http_answers

HOST_DIR = Path(minihttp.__file__).resolve().parent.parent


def head(raw: bytes) -> minihttp.Request | None:
    return minihttp.read_head(io.BytesIO(raw))


def test_read_head_parses_request_line_and_headers():
    req = head(b"POST /invoke?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nX-Y:  z \r\n\r\n{}")
    assert (req.method, req.target, req.version) == ("POST", "/invoke?x=1", "HTTP/1.1")
    assert req.headers == {"host": "a", "content-length": "2", "x-y": "z"}
    assert head(b"") is None  # the client connected and closed


@pytest.mark.parametrize("raw, status", [
    (b"GET /\r\n\r\n", 400),                                # HTTP/0.9
    (b"GET / HTTP/2.0\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n folded: header\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nBig: " + b"v" * 70000 + b"\r\n\r\n", 431),
])
def test_read_head_refuses_malformed_requests(raw: bytes, status: int):
    with pytest.raises(minihttp.HttpError) as info:
        head(raw)
    assert info.value.status == status


@pytest.mark.parametrize("headers, status", [
    ({"transfer-encoding": "chunked"}, 411),
    ({"content-length": "-1"}, 400),
    ({"content-length": "12x"}, 400),
    ({"content-length": str(11 * 1024 * 1024)}, 413),
])
def test_read_body_refusals(headers: dict, status: int):
    req = minihttp.Request("POST", "/invoke", "HTTP/1.1", headers)
    with pytest.raises(minihttp.HttpError) as info:
        minihttp.read_body(req, io.BytesIO(b""), io.BytesIO(), 10 * 1024 * 1024)
    assert info.value.status == status


def test_read_body_answers_expect_continue_and_spots_a_short_body():
    req = minihttp.Request("POST", "/invoke", "HTTP/1.1",
                           {"content-length": "4", "expect": "100-continue"})
    out = io.BytesIO()
    assert minihttp.read_body(req, io.BytesIO(b"abcd"), out, 100) == b"abcd"
    assert out.getvalue() == b"HTTP/1.1 100 Continue\r\n\r\n"
    with pytest.raises(ConnectionError):
        minihttp.read_body(minihttp.Request("POST", "/", "HTTP/1.1", {"content-length": "9"}),
                           io.BytesIO(b"abc"), io.BytesIO(), 100)


# ---------------------------------------------------------------- live surface

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rest(tmp_path: Path):
    """The stdlib REST surface of an agent whose handler echoes (or fails on "fail")."""
    def handler(context):
        if context.get("fail"):
            raise RuntimeError("boom")
        return {"echo": context}

    port = _free_port()
    spec = AgentSpec(name="t", version="1.0", package_root=tmp_path)
    env = HostEnv(ports=Ports(rest=port), spec_path=tmp_path / "s.json", base_path="/agents/t")
    api = HostApi(spec, env, Health(("rest",)), handler)
    surface = stdlib_rest.surface(api)
    surface.start()
    api.health.update({"rest": True})
    yield port
    surface.stop(5)


def exchange(port: int, raw: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes, read the whole answer (the server closes): status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_routes_methods_and_errors_answer_json(rest: int):
    status, headers, body = exchange(rest, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body) == {"ok": True, "surfaces": {"rest": True}}
    assert headers["Content-Type"] == "application/json" and headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    assert exchange(rest, b"GET /agents/t/meta HTTP/1.0\r\n\r\n")[0] == 200  # below BASE_PATH
    payload = b'{"a": 1}'
    status, _, body = exchange(rest, b"POST /invoke HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(payload), payload))
    assert status == 200 and json.loads(body) == {"echo": {"a": 1}}
    cases = [
        (b"POST /invoke HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}", 400, "not JSON"),
        (b'POST /invoke HTTP/1.1\r\nContent-Length: 13\r\n\r\n{"fail": true}'[:-1], 400, ""),
        (b'POST /invoke HTTP/1.1\r\nContent-Length: 14\r\n\r\n{"fail": true}', 500, "boom"),
        (b"GET /invoke HTTP/1.1\r\n\r\n", 405, "POST"),
        (b"POST /health HTTP/1.1\r\n\r\n", 405, "GET"),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404, "not found"),
        (b"DELETE /health HTTP/1.1\r\n\r\n", 501, "DELETE"),
        (b"POST /invoke HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411,
         "Content-Length"),
        (b"garbage\r\n\r\n", 400, "request line"),
    ]
    for raw, want, words in cases:
        status, _, body = exchange(rest, raw)
        assert status == want, (raw, body)
        answer = json.loads(body)
        assert answer["ok"] is False and words in answer["error"], (raw, answer)


def test_a_client_that_sends_nothing_does_not_hold_the_server(rest: int):
    idle = socket.create_connection(("127.0.0.1", rest), timeout=5)
    try:
        assert exchange(rest, b"GET /health HTTP/1.1\r\n\r\n")[0] == 200
        assert http_answers("127.0.0.1", rest, "/meta")
        assert not http_answers("127.0.0.1", rest, "/nope")  # the probe wants a 200
    finally:
        idle.close()


def test_shutdown_ends_the_accept_loop_without_waiting_for_a_poll():
    """serve_forever has no poll timeout: shutdown() must wake it (else this hangs)."""
    server = DrainingServer(("127.0.0.1", 0), minihttp.handler_class(lambda r, b: (200, {}), "t"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    port = server.server_address[1]
    server.server_close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_surface_stop_releases_the_port_for_a_successor():
    port = _free_port()
    handler = minihttp.handler_class(lambda r, b: (200, {"ok": True}), "t")
    first = HttpSurface("rest", "127.0.0.1", port, handler, probe_path="/")
    first.start()
    assert first.probe()
    first.stop(5)
    second = HttpSurface("rest", "127.0.0.1", port, handler, probe_path="/")
    second.start()  # the same port at once (SO_REUSEADDR, as the old http.server had)
    try:
        assert second.probe()
    finally:
        second.stop(5)


def _held_listener() -> socket.socket:
    """A listening socket, as systemd's socket unit holds it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_a_surface_serves_a_passed_socket_and_leaves_it_listening():
    """With systemd holding the socket, a stopped surface closes only its own copy:
    a connection made meanwhile waits in the backlog for the next process."""
    held = _held_listener()  # systemd's copy
    port = held.getsockname()[1]
    handler = minihttp.handler_class(lambda request, read_body: (200, {"ok": True}), "t")
    surface = HttpSurface("rest", "127.0.0.1", port, handler, probe_path="/",
                          listener=socket.socket(fileno=os.dup(held.fileno())))
    surface.start()
    assert surface.probe()
    surface.stop(1)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as waiting:
        successor = HttpSurface("rest", "127.0.0.1", port, handler, probe_path="/",
                                listener=socket.socket(fileno=os.dup(held.fileno())))
        successor.start()
        try:
            waiting.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert waiting.recv(100).startswith(b"HTTP/1.")
        finally:
            successor.stop(1)
    held.close()


def test_listen_fds_are_taken_by_port_and_removed_from_the_environment():
    held = _held_listener()
    port = held.getsockname()[1]
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(HOST_DIR)!r})
        os.environ["LISTEN_PID"] = str(os.getpid())
        from par_agent_host import listen_fds
        socks = listen_fds.take()
        assert list(socks) == [{port}], socks
        assert socks[{port}].get_inheritable() is False
        assert not [k for k in os.environ if k.startswith("LISTEN_")]
        os.environ.update(LISTEN_PID="1", LISTEN_FDS="1")
        assert listen_fds.take() == {{}}  # another process's fds
        print("ok")
    """)

    def to_fd3() -> None:
        os.dup2(held.fileno(), 3)

    out = subprocess.run([sys.executable, "-c", code], env={"LISTEN_FDS": "1"},
                         preexec_fn=to_fd3, close_fds=False, capture_output=True, text=True,
                         timeout=30)
    held.close()
    assert out.stdout.strip() == "ok", out.stderr
