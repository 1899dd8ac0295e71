"""Just enough HTTP/1.x for the host's own routes: one bounded request, one JSON answer.

`http.server` would do, but importing it (with `email` and `http.client`)
costs more than the rest of a stdlib agent's start; the host routes need only
a request line, headers and a Content-Length body.  Every connection carries
one request and is closed after the answer (as http.server does by default).
"""

from __future__ import annotations

import json
import socketserver
import time
from collections.abc import Callable
from http import HTTPStatus

MAX_LINE_BYTES = 65536
MAX_HEADERS = 100
SOCKET_TIMEOUT_S = 30.0  # a client that stalls mid-request is dropped, not waited on forever


class HttpError(Exception):
    """A request the host refuses: answered with `status` and a JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """A parsed request: method, target (path and query), lower-cased headers, body."""

    __slots__ = ("method", "target", "version", "headers", "body")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = b""


def _line(rfile, what: str, too_long: int) -> bytes:
    line = rfile.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES:
        raise HttpError(too_long, f"{what} longer than {MAX_LINE_BYTES} bytes")
    return line


def read_head(rfile) -> Request | None:
    """The request line and headers; None when the client closed without sending one."""
    line = _line(rfile, "request line", 414)
    if not line:
        return None
    parts = line.decode("latin-1").rstrip("\r\n").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"bad request line {line[:100]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    while True:
        raw = _line(rfile, "header line", 431)
        if raw in (b"\r\n", b"\n", b""):
            break
        if len(headers) >= MAX_HEADERS:
            raise HttpError(431, f"more than {MAX_HEADERS} headers")
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"bad header line {raw[:100]!r}")
        headers[name.lower()] = value.strip()
    return Request(method, target, version, headers)


def read_body(request: Request, rfile, wfile, max_bytes: int) -> bytes:
    """The body announced by Content-Length (chunked bodies are refused)."""
    if "transfer-encoding" in request.headers:
        raise HttpError(411, "send the body with a Content-Length, not chunked")
    raw = request.headers.get("content-length", "0") or "0"
    if not raw.isdigit():
        raise HttpError(400, f"bad Content-Length {raw[:40]!r}")
    length = int(raw)
    if length > max_bytes:
        raise HttpError(413, "body too large")
    if length and request.headers.get("expect", "").lower() == "100-continue":
        wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = rfile.read(length) if length else b""
    if len(body) != length:
        raise ConnectionError("client closed before sending the whole body")
    return body


def write_json(wfile, status: int, body: object, server: str) -> None:
    """Send `body` as a JSON answer and announce that the connection closes."""
    data = json.dumps(body, default=str).encode()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"Server: {server}\r\nDate: {date}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    wfile.write(head.encode("latin-1") + data)


# (request, read_body) -> (status, JSON body); raises HttpError for a refused request
App = Callable[[Request, Callable[[int], bytes]], tuple[int, object]]


def handler_class(app: App, server_name: str) -> type[socketserver.StreamRequestHandler]:
    """A socketserver handler that reads one request and answers it with `app`.

    `app(request, read_body)` gets the head; it calls `read_body(max_bytes)`
    when its route takes a body.
    """

    class Handler(socketserver.StreamRequestHandler):
        timeout = SOCKET_TIMEOUT_S

        def handle(self) -> None:
            try:
                request = read_head(self.rfile)
                if request is None:
                    return
                status, body = app(
                    request, lambda limit: read_body(request, self.rfile, self.wfile, limit)
                )
            except HttpError as exc:
                status, body = exc.status, {"ok": False, "error": exc.message}
            except (OSError, ValueError):
                return  # the client went away or stalled: nobody to answer
            try:
                write_json(self.wfile, status, body, server_name)
            except OSError:
                pass

    return Handler
