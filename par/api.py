"""The HTTP API of docs/api.md, on the unix socket and (optionally) TCP.

Transport only: a request is authenticated, size-checked, decoded and routed
here; the `Service` (the daemon) does the work and returns plain dicts.  Ids in
paths and query strings are checked with `par.ids` before the service sees them.

Choices worth knowing:
- HTTP/1.1 with keep-alive.  Every answer carries Content-Length; after an
  answer sent without reading the body (401, 411, 413, bad Content-Length) the
  connection is closed so the unread bytes are never taken for a request.
  An idle or slow connection is dropped after `IDLE_TIMEOUT_S`.
- TCP checks the bearer token before anything else (also for unknown paths,
  which therefore answer 401, not 404) and before reading a single body byte.
- Bodies without Content-Length (chunked) are refused with 411; a body larger
  than `listen.max_body_bytes` is refused with 413 by its Content-Length, unread.
  `Expect: 100-continue` is honoured only once the body will really be read.
- JSON must be UTF-8, one object, no duplicate keys, no NaN/Infinity.
- Ids in paths are percent-decoded per segment, never normalized: `..%2fx`
  and `x.service` reach `par.ids` as they are and get 400 `invalid_id`.
- A `ParError` from the service keeps its status and envelope; any other
  exception is a 500 `internal`, its traceback logged, never returned.
- One JSON log line per request (method, path without query, status, ms);
  never the body or the Authorization header.
- The service is called from several request threads at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import socket
import socketserver
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from par import ids
from par.config import Config
from par.deploy_request import DeployRequest, parse_deploy_request
from par.errors import ParError
from par.log import event

IDLE_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1  # how quickly serve_forever notices shutdown()
# After answering without reading the body, drop at most this much of it (for at
# most LINGER_S) before closing: closing on unread data sends a TCP reset, which
# can destroy our answer before the client reads it.
LINGER_S = 2.0
LINGER_BYTES = 4 * 1024 * 1024
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = frozenset(
    "pending downloading loading starting healthy failed stopping stopped removed".split()
)
ACTIONS = ("stop", "start", "restart")
MAX_EVENTS_LIMIT = 100_000
# The longest a GET /deployments/{id}?wait=S may hold its answer back.
MAX_WAIT_S = 60.0
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


class Service(Protocol):
    """What the API needs from the daemon; every method may raise ParError."""

    def deploy(self, req: DeployRequest) -> tuple[int, dict]: ...
    def list_deployments(self, agent_app_id: str | None, status: str | None) -> list[dict]: ...
    def get_deployment(self, deployment_id: str, wait: float | None = None,
                       since: float | None = None) -> dict: ...
    def deployment_health(self, deployment_id: str) -> dict: ...
    def deployment_events(self, deployment_id: str, limit: int | None) -> list[dict]: ...
    def action(self, deployment_id: str, name: str) -> dict: ...
    def delete(self, deployment_id: str, purge: bool) -> dict: ...
    def agents(self, include_all: bool = False) -> list[dict]: ...
    def daemon_health(self) -> dict: ...
    def metrics(self) -> str: ...
    def venvs(self) -> list[dict]: ...
    def prune_venvs(self) -> dict: ...
    def prewarm(self, requirements: str) -> dict: ...
    def install_uv(self) -> dict: ...


@dataclass(frozen=True)
class Request:
    """One decoded request, as the route functions see it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    local: bool
    params: tuple[str, ...] = ()  # path parameters, already validated


@dataclass(frozen=True)
class Response:
    """What goes back: a JSON-able body (dict) or text (metrics)."""

    status: int
    body: dict | str
    headers: tuple[tuple[str, str], ...] = ()


class MethodNotAllowed(ParError):
    """405, carrying the methods the path accepts (for the Allow header)."""

    def __init__(self, allowed: str) -> None:
        super().__init__("method_not_allowed", f"method not allowed here; use {allowed}", None, 405)
        self.allowed = allowed


class Unauthorized(ParError):
    """401 on TCP: no or a wrong bearer token."""

    def __init__(self) -> None:
        message = "a valid Authorization: Bearer token is required"
        super().__init__("unauthorized", message, None, 401)


def error_response(err: ParError) -> Response:
    """The one error envelope, `{"error": {"code", "message", "field"}}`, with err's status."""
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(err, Unauthorized):
        headers = (("WWW-Authenticate", 'Bearer realm="par"'),)
    elif isinstance(err, MethodNotAllowed):
        headers = (("Allow", err.allowed),)
    return Response(err.status, {"error": err.to_dict()}, headers)


# ---- routes: (method, pattern) → function(service, request) -> Response --------------

Handler = Callable[[Service, Request], Response]


def _json_body(req: Request) -> dict:
    if not req.body:
        raise ParError("bad_json", "the request body is empty: expected a JSON object")
    try:
        value = json.loads(
            req.body.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and the hooks' refusals; the parser's
        # message (line, column) helps and holds none of the body.
        detail = str(exc) if isinstance(exc, ValueError) else "not UTF-8 or nested too deep"
        raise ParError("bad_json", f"the request body is not valid JSON: {detail}") from exc
    if not isinstance(value, dict):
        raise ParError("not_object", "the request body must be a JSON object")
    return value


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # Parsers disagree on which duplicate wins; refusing them leaves no ambiguity.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _query_agent(req: Request) -> str | None:
    value = req.query.get("agentAppId")
    return ids.agent_id(value, "agentAppId") if value else None


def _query_status(req: Request) -> str | None:
    value = req.query.get("status")
    if not value:
        return None
    if value not in STATUSES:
        raise ParError(
            "invalid_field", f"status must be one of {', '.join(sorted(STATUSES))}", "status"
        )
    return value


def _query_limit(req: Request) -> int | None:
    value = req.query.get("limit")
    if not value:
        return None
    if not value.isdecimal() or not 1 <= int(value) <= MAX_EVENTS_LIMIT:
        raise ParError(
            "invalid_field", f"limit must be an integer from 1 to {MAX_EVENTS_LIMIT}", "limit"
        )
    return int(value)


def _query_flag(req: Request, name: str) -> bool:
    value = req.query.get(name, "").lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ParError("invalid_field", f"{name} must be 1 or 0", name)


def _deploy(svc: Service, req: Request) -> Response:
    body = _json_body(req)
    parsed = parse_deploy_request(
        body, local=req.local, idempotency_key=req.headers.get("idempotency-key")
    )
    status, answer = svc.deploy(parsed)
    return Response(status, answer)


def _list(svc: Service, req: Request) -> Response:
    rows = svc.list_deployments(_query_agent(req), _query_status(req))
    return Response(200, {"deployments": rows})


def _query_number(req: Request, name: str) -> float | None:
    """A query value as a number (NaN when it is not one), or None when absent."""
    value = req.query.get(name)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return math.nan


def _query_wait(req: Request) -> float | None:
    seconds = _query_number(req, "wait")
    if seconds is not None and not 0 < seconds <= MAX_WAIT_S:  # NaN fails this too
        raise ParError("invalid_field", f"wait must be a number of seconds, above 0 and at "
                       f"most {MAX_WAIT_S:g}", "wait")
    return seconds


def _query_since(req: Request) -> float | None:
    since = _query_number(req, "since")
    if since is not None and not math.isfinite(since):
        raise ParError("invalid_field", "since must be a record's updatedAt (a number)", "since")
    return since


def _get(svc: Service, req: Request) -> Response:
    # ?wait=S[&since=updatedAt]: answer once the record differs from the one the client
    # holds (or after S seconds): a client follows a deploy's phases without polling
    return Response(200, svc.get_deployment(req.params[0], _query_wait(req), _query_since(req)))


def _health(svc: Service, req: Request) -> Response:
    return Response(200, svc.deployment_health(req.params[0]))


def _events(svc: Service, req: Request) -> Response:
    return Response(200, {"events": svc.deployment_events(req.params[0], _query_limit(req))})


def _action(svc: Service, req: Request) -> Response:
    return Response(200, svc.action(req.params[0], req.params[1]))


def _delete(svc: Service, req: Request) -> Response:
    return Response(200, svc.delete(req.params[0], _query_flag(req, "purge")))


def _agents(svc: Service, req: Request) -> Response:
    return Response(200, {"agents": svc.agents(include_all=_query_flag(req, "all"))})


def _daemon_health(svc: Service, req: Request) -> Response:
    return Response(200, svc.daemon_health())


def _metrics(svc: Service, req: Request) -> Response:
    return Response(200, svc.metrics())


def _venvs(svc: Service, req: Request) -> Response:
    return Response(200, {"venvs": svc.venvs()})


def _prune(svc: Service, req: Request) -> Response:
    return Response(200, svc.prune_venvs())


def _prewarm(svc: Service, req: Request) -> Response:
    body = _json_body(req)
    text = body.get("requirements")
    if text is None:
        raise ParError("missing_field", "requirements is required", "requirements")
    if not isinstance(text, str):
        raise ParError("invalid_field", "requirements must be a string", "requirements")
    return Response(200, svc.prewarm(text))


def _install_uv(svc: Service, req: Request) -> Response:
    return Response(200, svc.install_uv())


@dataclass(frozen=True)
class Route:
    """A path pattern: literal segments, "{id}" (a deploymentId) or "{action}"."""

    method: str
    pattern: tuple[str, ...]
    handler: Handler
    needs_body: bool = False


ROUTES: tuple[Route, ...] = (
    Route("POST", ("deploy",), _deploy, needs_body=True),
    Route("GET", ("deployments",), _list),
    Route("GET", ("deployments", "{id}"), _get),
    Route("DELETE", ("deployments", "{id}"), _delete),
    Route("GET", ("deployments", "{id}", "health"), _health),
    Route("GET", ("deployments", "{id}", "events"), _events),
    Route("POST", ("deployments", "{id}", "{action}"), _action),
    Route("GET", ("agents",), _agents),
    Route("GET", ("health",), _daemon_health),
    Route("GET", ("metrics",), _metrics),
    Route("GET", ("venvs",), _venvs),
    Route("POST", ("venvs", "prune"), _prune),
    Route("POST", ("venvs", "prewarm"), _prewarm, needs_body=True),
    Route("POST", ("installer", "install-uv"), _install_uv),
)


def _matches(pattern: tuple[str, ...], segments: list[str]) -> bool:
    if len(pattern) != len(segments):
        return False
    for want, got in zip(pattern, segments, strict=True):
        if want == "{id}":
            continue  # validated after matching, so a bad id is a 400, not a 404
        if want == "{action}":
            if got not in ACTIONS:
                return False
        elif want != got:
            return False
    return True


def split_path(raw_path: str) -> list[str]:
    """Path segments, each percent-decoded on its own (`..%2fx` stays one segment)."""
    path = urlsplit(raw_path).path
    return [unquote(part, errors="strict") for part in path.split("/")[1:]]


def resolve(method: str, raw_path: str) -> tuple[Route, tuple[str, ...]]:
    """The route for `method` and path, with its validated path parameters.

    Raises ParError: 404 unknown path, 405 (with the allowed methods) wrong
    method, 400 invalid_id for a deployment id in the path that breaks its pattern.
    """
    try:
        segments = split_path(raw_path)
    except UnicodeDecodeError as exc:
        raise ParError("bad_request", "the path is not valid UTF-8", None, 400) from exc
    candidates = [r for r in ROUTES if _matches(r.pattern, segments)]
    if not candidates:
        raise ParError("not_found", "no such endpoint (see docs/api.md)", None, 404)
    for route in candidates:
        if route.method == method:
            params = []
            for want, got in zip(route.pattern, segments, strict=True):
                if want == "{id}":
                    params.append(ids.deployment_id(got, "deploymentId"))
                elif want == "{action}":
                    params.append(got)
            return route, tuple(params)
    allowed = ", ".join(sorted({r.method for r in candidates}))
    raise MethodNotAllowed(allowed)


# ---- transport --------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What a request handler needs, attached to its server."""

    service: Service
    logger: logging.Logger
    max_body: int
    local: bool
    token: bytes | None = field(default=None, repr=False)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer on TCP; request threads are daemons (shutdown never waits on them)."""

    daemon_threads = True
    # socketserver's default backlog is 5: a 6th client connecting while the accept loop is
    # busy gets EAGAIN at once on the unix socket (a connect with a timeout does not wait).
    request_queue_size = socket.SOMAXCONN

    def __init__(self, address: str | tuple[str, int], settings: _Settings) -> None:
        self.settings = settings
        if isinstance(address, tuple) and ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

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

    def server_bind(self) -> None:
        path = Path(self.server_address)
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

    def parse_request(self) -> bool:
        self._t0 = time.monotonic()
        return super().parse_request()

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
        route, params = resolve(self.command, self.path)
        body = self._read_body(settings.max_body, route.needs_body)
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
            params=params,
        )
        return route.handler(settings.service, req)

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
        event(self.server.settings.logger, "API request", **fields)

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


class ApiServer:
    """Serves the API for `service` on a unix socket and/or TCP, each in its own thread."""

    def __init__(self, service: Service, cfg: Config, logger: logging.Logger) -> None:
        self._service = service
        self._max_body = cfg.listen.max_body_bytes
        self._logger = logger
        self._servers: list[tuple[_Server, threading.Thread]] = []
        self._tcp: _Server | None = None
        self._unix_path: Path | None = None

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
        settings = _Settings(self._service, self._logger, self._max_body, local=True)
        server = _UnixServer(str(path), settings)
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
            self._service, self._logger, self._max_body, local=False, token=token.encode("utf-8")
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


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True
