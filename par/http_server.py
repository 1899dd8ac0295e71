"""The HTTP transport of PAR's API: listeners, connections, auth, bodies, answers.

What is served is not known here: a `Resolver` maps a request line to an
`Endpoint` (par.api holds the route table), which turns a `Request` into a
`Response`.  This module reads, checks and writes; it never interprets a body.

Choices worth knowing:
- HTTP/1.1 with keep-alive.  Every answer carries Content-Length; after an
  answer sent without reading the body (401, 411, 413, bad Content-Length) the
  connection is closed so the unread bytes are never taken for a request.
  An idle or slow connection is dropped after `IDLE_TIMEOUT_S`, and a request
  must arrive whole (line, headers, body) within its deadline: a reaper thread
  shuts down connections past it, however slowly they trickle bytes.
- Connections are capped per listener and per TCP address, the request line and
  the headers by size (par.http_limits): beyond a cap, closed or 414/431 at once.
- TCP checks the bearer token before anything else (also for unknown paths,
  which therefore answer 401, not 404) and before reading a single body byte.
- Bodies without Content-Length (chunked) are refused with 411; a body larger
  than the server's `max_body` is refused with 413 by its Content-Length, unread.
  `Expect: 100-continue` is honoured only once the body will really be read.
- A `ParError` keeps its status and envelope; any other exception is a 500
  `internal`, its traceback logged, never returned.  One log line per request,
  never with the body or the Authorization header.  Endpoints run in many threads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import socketserver
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from par.errors import ParError
from par.http_limits import (
    TCP_DEFAULTS,
    UNIX_DEFAULTS,
    ConnectionLimits,
    Connections,
    oversized,
)
from par.http_types import (
    Request,
    Resolver,
    Response,
    Unauthorized,
    error_response,
)
from par.log import event

IDLE_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1  # how quickly serve_forever notices shutdown()
REAP_INTERVAL_S = 0.25  # how often late requests are looked for
# After answering without reading the body, drop at most this much of it (for at
# most LINGER_S) before closing: closing on unread data sends a TCP reset, which
# can destroy our answer before the client reads it.
LINGER_S = 2.0
LINGER_BYTES = 4 * 1024 * 1024
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LOGGED_PATH = 200
_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    411: "length_required",
    413: "body_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    500: "internal",
    501: "not_implemented",
    505: "http_version_not_supported",
}


# ---- servers and connections ---------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What a request handler needs, attached to its server."""

    resolve: Resolver
    logger: logging.Logger
    max_body: int
    local: bool
    limits: ConnectionLimits = ConnectionLimits()
    token: bytes | None = field(default=None, repr=False)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer on TCP; request threads are daemons (shutdown never waits on them)."""

    daemon_threads = True
    # socketserver's default backlog is 5: a 6th client connecting while the accept loop is
    # busy gets EAGAIN at once on the unix socket (a connect with a timeout does not wait).
    request_queue_size = socket.SOMAXCONN

    def __init__(self, address: str | tuple[str, int], settings: _Settings) -> None:
        self.settings = settings
        self.connections = Connections(settings.limits)
        if isinstance(address, tuple) and ":" in address[0]:
            self.address_family = socket.AF_INET6
        # typeshed types TCPServer's address as (host, port); _UnixServer passes a path
        super().__init__(address, _Handler)  # type: ignore[arg-type]

    def process_request(self, request: Any, client_address: Any) -> None:
        # Over a cap: closed before a thread is spent on it (a flood of slow clients
        # must not take every thread and file descriptor pard has).
        if not self.connections.admit(request, str(client_address[0])):
            event(self.settings.logger, "API connection refused: too many", logging.WARNING,
                  client=str(client_address[0]), local=self.settings.local)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release(request, str(client_address[0]))


    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN, which can stall on DNS at boot.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-answer is not our bug: one log line, no stderr traceback.
        exc = sys.exc_info()[1]
        event(self.settings.logger, "API connection error", logging.WARNING, error=repr(exc))


class _UnixServer(_Server):
    """The same server on an AF_UNIX socket, bound atomically with mode 0600.

    The socket is bound under a temporary name in the target folder, chmod-ed
    to 0600, then renamed over the final path: there is no moment where the
    final path is a socket with a wider mode, and no umask change (which would
    affect every thread of the process).
    """

    address_family = socket.AF_UNIX

    def __init__(self, path: Path, settings: _Settings) -> None:
        self.path = path
        super().__init__(str(path), settings)

    def server_bind(self) -> None:
        path = self.path
        # Short on purpose: unix socket paths are limited to 107 bytes.
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        self.socket.bind(str(tmp))
        try:
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.bound_inode = path.stat().st_ino
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, _ = self.socket.accept()
        # AF_UNIX peers have no address ('' from accept); handlers expect a tuple.
        return conn, ("unix", 0)


class _Handler(BaseHTTPRequestHandler):
    """Reads, checks and routes one request; writes JSON; logs one line per request."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S  # socket timeout: drops idle keep-alive and slow clients
    server: _Server

    # http.server calls do_<METHOD>; every method we know goes through one path.
    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    # HEAD included: it gets the 405 (no route allows it), answered without a body.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET  # noqa: N815

    def version_string(self) -> str:
        return "pard"

    def handle_one_request(self) -> None:
        self.server.connections.arm(self.connection)
        super().handle_one_request()

    def parse_request(self) -> bool:
        self._t0 = time.monotonic()
        if not super().parse_request():
            return False
        refused = oversized(getattr(self, "raw_requestline", b""), self.headers,
                            self.server.connections.limits)
        if refused is not None:
            self.send_error(*refused)
        return refused is None

    def handle_expect_100(self) -> bool:
        # http.server would say "100 Continue" before auth and the size check; _read_body
        # says it only when the body will really be read.
        return True

    def _handle(self) -> None:
        settings = self.server.settings
        self._body_read = False
        try:
            response = self._process(settings)
        except ParError as err:
            response = error_response(err)
        except Exception:
            event(
                settings.logger,
                "API internal error",
                logging.ERROR,
                method=self.command,
                path=self._logged_path(),
                traceback=traceback.format_exc(),
            )
            response = error_response(
                ParError("internal", "internal error; the pard journal has the details", None, 500)
            )
        self._send(response)

    def _process(self, settings: _Settings) -> Response:
        if settings.token is not None:
            self._authorize(settings.token)
        endpoint = settings.resolve(self.command, self.path)
        body = self._read_body(settings.max_body, endpoint.needs_body)
        self.server.connections.disarm(self.connection)
        raw_query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        query = {key: values[-1] for key, values in raw_query.items()}
        req = Request(
            method=self.command,
            path=urlsplit(self.path).path,
            query=query,
            # Credentials stay in the transport.
            headers={k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"},
            body=body,
            local=settings.local,
        )
        return endpoint.answer(req)

    def _authorize(self, token: bytes) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # Digests first, so compare_digest also hides the length of the token.
        given_digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
        ok = hmac.compare_digest(given_digest, hashlib.sha256(token).digest())
        if scheme.lower() != "bearer" or not ok:
            raise Unauthorized()

    def _read_body(self, max_body: int, needs_body: bool) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ParError(
                "length_required", "send the body with a Content-Length", "Content-Length", 411
            )
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            if needs_body:
                self.close_connection = True
                raise ParError(
                    "length_required", "this endpoint needs a body with a Content-Length",
                    "Content-Length", 411,
                )
            self._body_read = True
            return b""
        if len(set(lengths)) != 1 or not re.fullmatch(r"[0-9]{1,18}", lengths[0].strip()):
            self.close_connection = True
            raise ParError(
                "bad_request", "Content-Length must be one whole number", "Content-Length"
            )
        length = int(lengths[0])
        if length > max_body:
            self.close_connection = True
            raise ParError(
                "body_too_large", f"the body is larger than {max_body} bytes", "Content-Length", 413
            )
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        try:
            body = self.rfile.read(length)
        except OSError as exc:  # TimeoutError included: a client that stalls mid-body
            self.close_connection = True
            raise ParError("timeout", "the body did not arrive in time", None, 408) from exc
        self._body_read = True
        if len(body) != length:
            self.close_connection = True
            raise ParError(
                "bad_request", "the body is shorter than its Content-Length", "Content-Length"
            )
        return body

    def _send(self, response: Response) -> None:
        response, payload, ctype = self._encode(response)
        # Logged before writing: once the client has the answer, its log line exists.
        self._log_request(response)
        pending = self._body_pending()
        if pending:
            # Answered without reading the body: its bytes must not be parsed as the next request.
            self.close_connection = True
        self.send_response(response.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        if pending:
            self._linger()

    def _encode(self, response: Response) -> tuple[Response, bytes, str]:
        """The body's bytes and type, made before the status line: a bad body is a clean 500."""
        if isinstance(response.body, str):
            return response, response.body.encode("utf-8"), METRICS_TYPE
        try:
            text = json.dumps(response.body, default=_json_default)
        except (TypeError, ValueError):
            event(
                self.server.settings.logger, "API internal error", logging.ERROR,
                method=self.command, path=self._logged_path(), traceback=traceback.format_exc(),
            )
            response = error_response(ParError("internal", "internal error", None, 500))
            text = json.dumps(response.body)
        return response, (text + "\n").encode("utf-8"), JSON_TYPE

    def _log_request(self, response: Response) -> None:
        fields: dict[str, object] = {
            "method": self.command,
            "path": self._logged_path(),
            "status": response.status,
            "ms": round((time.monotonic() - getattr(self, "_t0", time.monotonic())) * 1000, 1),
            "local": self.server.settings.local,
        }
        if isinstance(response.body, dict) and isinstance(response.body.get("error"), dict):
            fields["error"] = response.body["error"].get("code")
        # reads (long polls included) are routine: debug; changes and errors stay visible
        level = logging.DEBUG if self.command == "GET" and response.status < 400 else logging.INFO
        event(self.server.settings.logger, "API request", level, **fields)

    def _linger(self) -> None:
        """Push our answer out, then drop what the client still sends (bounded) before closing."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            left = LINGER_BYTES
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(min(65536, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # the client went away: nothing left to protect

    def _body_pending(self) -> bool:
        if getattr(self, "_body_read", False) or not hasattr(self, "headers"):
            return False
        length = (self.headers.get("Content-Length") or "0").strip()
        return bool(self.headers.get("Transfer-Encoding")) or length not in ("", "0")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unknown method...) in our JSON envelope."""
        self.close_connection = True
        err = ParError(_STATUS_CODES.get(code, "bad_request"), message or "bad request", None, code)
        if not hasattr(self, "command"):
            self.command = None  # type: ignore[assignment]
        # A malformed request line leaves http.server in HTTP/0.9 mode (no status line): answer 1.1.
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = self.protocol_version
        self._send(error_response(err))

    def _logged_path(self) -> str:
        # The path only: a query string or body never reaches the log.
        path = urlsplit(getattr(self, "path", "") or "").path
        return path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "..."

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass  # _send logs one structured line instead

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        event(self.server.settings.logger, "API transport", logging.DEBUG, detail=format % args)

    def address_string(self) -> str:
        return str(self.client_address[0])


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class HttpServer:
    """Serves what `resolve` routes to on a unix socket and/or TCP, each in its own thread.

    `max_body`: the largest request body read, in bytes (larger ones get 413, unread).
    `unix_limits`, `tcp_limits`: each listener's own connection budget and deadline.
    """

    def __init__(self, resolve: Resolver, max_body: int, logger: logging.Logger,
                 unix_limits: ConnectionLimits = UNIX_DEFAULTS,
                 tcp_limits: ConnectionLimits = TCP_DEFAULTS) -> None:
        self._resolve = resolve
        self._max_body = max_body
        self._logger = logger
        self._unix_limits = unix_limits
        self._tcp_limits = tcp_limits
        self._servers: list[tuple[_Server, threading.Thread]] = []
        self._tcp: _Server | None = None
        self._unix_path: Path | None = None
        self._stop_reaper = threading.Event()
        self._reaper: threading.Thread | None = None

    def serve_unix(self, path: Path) -> None:
        """Listen on the unix socket `path` (mode 0600: root only when pard runs as root).

        The parent folder is created with mode 0700 when missing; an existing
        one is kept (systemd's RuntimeDirectory makes /run/par 0755, fine since
        the socket itself is 0600) but refused when group- or world-writable,
        where someone else could swap the socket.  A stale socket is replaced;
        a live one (another pard answering) is refused with `socket_in_use`.
        """
        path = Path(path)
        parent = path.parent
        if len(os.fsencode(path.with_name(f".{path.name}.tmp"))) > UNIX_PATH_MAX:
            raise ParError(
                "socket_path_too_long", f"{path} is too long for a unix socket", "listen.socket"
            )
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
        mode = parent.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ParError(
                "socket_dir_unsafe", f"{parent} is writable by group or others; use 0755 or 0700",
                "listen.socket",
            )
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ParError(
                    "socket_path_taken", f"{path} exists and is not a socket", "listen.socket"
                )
            if _socket_answers(path):
                raise ParError(
                    "socket_in_use", f"{path} is in use: is another pard running?", "listen.socket"
                )
        settings = _Settings(self._resolve, self._logger, self._max_body, local=True,
                             limits=self._unix_limits)
        server = _UnixServer(path, settings)
        self._unix_path = path
        self._start(server, "par-api-unix")
        event(self._logger, "API listening", socket=str(path))

    def serve_tcp(self, host: str, port: int, token: str) -> int:
        """Listen on TCP `host:port`, every request needing `Authorization: Bearer <token>`.

        Refuses (ParError `token_missing`) an empty token.  `host` may be an
        IPv6 address, bracketed or not.  Returns the bound port (useful with port 0).
        """
        if not token or not token.strip() or any(c.isspace() for c in token):
            raise ParError(
                "token_missing",
                "the TCP listener needs a non-empty token without whitespace (listen.token_file)",
                "listen.token_file",
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # "[::1]" as written in "HOST:PORT"
        settings = _Settings(
            self._resolve, self._logger, self._max_body, local=False, limits=self._tcp_limits,
            token=token.encode("utf-8"),
        )
        server = _Server((host, port), settings)
        self._tcp = server
        self._start(server, "par-api-tcp")
        event(self._logger, "API listening", host=host, port=server.server_port)
        return server.server_port

    @property
    def tcp_port(self) -> int | None:
        """The bound TCP port, or None when not listening on TCP."""
        return self._tcp.server_port if self._tcp else None

    def _start(self, server: _Server, name: str) -> None:
        thread = threading.Thread(
            target=server.serve_forever, args=(POLL_INTERVAL_S,), name=name, daemon=True
        )
        thread.start()
        self._servers.append((server, thread))
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="par-api-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Cut late requests, a few times a second (a deadline is seconds long)."""
        while not self._stop_reaper.wait(REAP_INTERVAL_S):
            for server, _ in list(self._servers):
                server.connections.cut_overdue()

    def shutdown(self) -> None:
        """Stop accepting, close the listeners, remove our socket; in-flight requests may finish."""
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            if isinstance(server, _UnixServer) and self._unix_path is not None:
                # Only our own socket: a newer pard may already have replaced it.
                try:
                    if self._unix_path.stat().st_ino == server.bound_inode:
                        self._unix_path.unlink()
                except FileNotFoundError:
                    pass
        self._servers.clear()
        self._tcp = None
        self._stop_reaper.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True
