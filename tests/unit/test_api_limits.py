"""The API transport under a flood of slow clients (attack 5): per-listener and
per-address connection caps, a deadline for a whole request, separate budgets for
TCP and the unix socket.  The same attack against a real pard is in
tests/integration/test_attacks.py."""

from __future__ import annotations

import http.client
import io
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from par.client import UnixHTTPConnection
from par.config import Config
from par.http_limits import ConnectionLimits
from par.http_server import HttpServer
from par.http_types import Endpoint, Response
from tests.unit.logs import captured_logger

TOKEN = "t0ken"


def resolve(method: str, path: str) -> Endpoint:
    return Endpoint(lambda req: Response(200, {"ok": True}))


@pytest.fixture()
def served() -> Iterator[tuple[HttpServer, Path, int, io.StringIO]]:
    folder = Path(tempfile.mkdtemp(prefix="par-lim-", dir="/tmp"))
    logger, stream = captured_logger("limits")
    server = HttpServer(resolve, Config().listen.max_body_bytes, logger,
                        unix_limits=ConnectionLimits(4, None, 1.0),
                        tcp_limits=ConnectionLimits(6, 3, 1.0))
    server.serve_unix(folder / "par.sock")
    port = server.serve_tcp("127.0.0.1", 0, TOKEN)
    yield server, folder / "par.sock", port, stream
    server.shutdown()
    shutil.rmtree(folder)


def slow_client(port: int, source: str) -> socket.socket:
    """A client that sends a request line and a header, then nothing more."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
    return s


def tcp_get(port: int, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3,
                                      source_address=(source, 0))
    try:
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {TOKEN}"})
        return conn.getresponse().status
    finally:
        conn.close()


def unix_get(path: Path) -> int:
    conn = UnixHTTPConnection(path, 3.0)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_clients_of_one_address_leave_others_and_the_socket_served(served) -> None:
    server, sock, port, stream = served
    attackers = [slow_client(port, "127.0.0.2") for _ in range(20)]
    try:
        time.sleep(0.2)
        # three held (the per-address cap), the rest closed at once
        cut = sum(closed_by_server(s, 0.02) for s in attackers)
        assert cut == 17
        assert tcp_get(port) == 200  # another client address is served
        assert unix_get(sock) == 200  # the unix socket has a budget of its own
        assert "API connection refused: too many" in stream.getvalue()
    finally:
        for s in attackers:
            s.close()


def test_a_request_that_never_completes_is_cut_at_its_deadline(served) -> None:
    _, _, port, _ = served
    s = slow_client(port, "127.0.0.3")
    try:
        started = time.monotonic()
        while time.monotonic() - started < 3:  # trickle a byte every 0.2 s: never idle
            s.sendall(b"x")
            time.sleep(0.2)
            s.settimeout(0.01)
            try:
                if s.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        took = time.monotonic() - started
        assert 0.9 <= took < 2.5, took  # the 1 s deadline, plus the reaper's tick
    finally:
        s.close()


def test_the_listener_cap_holds_across_addresses(served) -> None:
    _, _, port, _ = served
    held = [slow_client(port, f"127.0.0.{10 + i // 3}") for i in range(6)]
    try:
        time.sleep(0.2)
        assert not any(closed_by_server(s, 0.1) for s in held)
        extra = slow_client(port, "127.0.0.30")
        assert closed_by_server(extra, 0.5)  # six held: the listener is full
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert tcp_get(port) == 200  # released as the slow ones went


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_request_line_and_headers_are_capped(served) -> None:
    _, _, port, _ = served
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    just = b"GET /" + b"a" * (8192 - 20) + b" HTTP/1.1\r\n"
    assert len(just) <= 8192
    assert raw_exchange(port, just + auth + b"Host: x\r\nConnection: close\r\n\r\n") \
        .startswith(b"HTTP/1.1 200")
    over = b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n"
    answer = raw_exchange(port, over + auth + b"Host: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414") and b'"code": "uri_too_long"' in answer
    big = b"".join(f"X-H{i}: {'v' * 1000}\r\n".encode() for i in range(40))  # ~41 KB
    answer = raw_exchange(port, b"GET /health HTTP/1.1\r\n" + auth + big + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431") and b"headers_too_large" in answer


def test_json_depth_is_capped() -> None:
    from par.api import _json_body
    from par.errors import ParError
    from par.http_types import Request

    def req(body: str) -> Request:
        return Request("POST", "/deploy", {}, {}, body.encode(), True, max_json_depth=4)

    assert _json_body(req('{"a": {"b": {"c": [1]}}}'))["a"]  # depth 4: accepted
    with pytest.raises(ParError) as info:
        _json_body(req('{"a": {"b": {"c": [[1]]}}}'))
    assert info.value.code == "bad_json" and "listen.max_json_depth" in info.value.message
    with pytest.raises(ParError):  # far deeper than Python's recursion limit
        _json_body(req('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"))
