"""The HTTP API of docs/api.md: the route table and what each route does.

A request reaches a route authenticated, size-checked and with its body read
(par.http_server, the transport); the route decodes it and calls the `Service`
(the daemon), which does the work and returns plain dicts.  Ids in paths and
query strings are checked with `par.ids` before the service sees them.

Choices worth knowing:
- JSON must be UTF-8, one object, no duplicate keys, no NaN/Infinity.
- Ids in paths are percent-decoded per segment, never normalized: `..%2fx`
  and `x.service` reach `par.ids` as they are and get 400 `invalid_id`.
- A path matching no route is a 404, a known path with another method a 405
  naming the allowed ones; a bad deployment id in a path is a 400, not a 404.
- The service is called from several request threads at once.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import unquote, urlsplit

from par import ids
from par.config import Config
from par.deploy_request import DeployRequest, parse_deploy_request
from par.errors import ParError
from par.http_limits import ConnectionLimits
from par.http_server import HttpServer
from par.http_types import Endpoint, MethodNotAllowed, Request, Response
from par.store import STATUSES

ACTIONS = ("stop", "start", "restart")
MAX_EVENTS_LIMIT = 100_000
# The longest a GET /deployments/{id}?wait=S may hold its answer back.
MAX_WAIT_S = 60.0


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
    def set_env(self, deployment_id: str, values: dict[str, str], unset: list[str],
                restart: bool) -> tuple[int, dict]: ...
    def env_names(self, deployment_id: str) -> dict: ...
    def agents(self, include_all: bool = False) -> list[dict]: ...
    def daemon_health(self) -> dict: ...
    def metrics(self) -> str: ...
    def venvs(self) -> list[dict]: ...
    def prune_venvs(self) -> dict: ...
    def prewarm(self, requirements: str) -> dict: ...
    def install_uv(self, version: str | None = None) -> dict: ...


# ---- routes: (method, pattern) → function(service, request) -> Response -------

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
    if _depth(value) > req.max_json_depth:
        raise ParError("bad_json", f"the request body nests objects and arrays more than "
                       f"{req.max_json_depth} deep (listen.max_json_depth)")
    return value


def _depth(value: object) -> int:
    """How deep objects and arrays nest in a parsed JSON value (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return deepest


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


def _env_set(svc: Service, req: Request) -> Response:
    body = _json_body(req)
    values = body.get("set", {})
    unset = body.get("unset", [])
    restart = body.get("restart", True)
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        raise ParError("invalid_field", "set must be an object of string to string", "set")
    if not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
        raise ParError("invalid_field", "unset must be a list of names", "unset")
    if not isinstance(restart, bool):
        raise ParError("invalid_field", "restart must be true or false", "restart")
    status, answer = svc.set_env(req.params[0], values, unset, restart)
    return Response(status, answer)


def _env_names(svc: Service, req: Request) -> Response:
    return Response(200, svc.env_names(req.params[0]))


def _install_uv(svc: Service, req: Request) -> Response:
    version = _json_body(req).get("version") if req.body else None
    if version is not None and (not isinstance(version, str)
                                or not re.fullmatch(r"[0-9]+(\.[0-9]+){1,3}", version)):
        raise ParError("invalid_field", "version must be a uv release like 0.13.9", "version")
    return Response(200, svc.install_uv(version))


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
    Route("POST", ("deployments", "{id}", "env"), _env_set, needs_body=True),
    Route("GET", ("deployments", "{id}", "env"), _env_names),
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


def endpoint(service: Service, method: str, raw_path: str,
             max_json_depth: int = 32) -> Endpoint:
    """The route for `method` and path as an `Endpoint` calling `service` (see `resolve`)."""
    route, params = resolve(method, raw_path)
    return Endpoint(
        answer=lambda req: route.handler(
            service, replace(req, params=params, max_json_depth=max_json_depth)),
        needs_body=route.needs_body,
    )


class ApiServer(HttpServer):
    """Serves the API for `service` on a unix socket and/or TCP, each in its own thread."""

    def __init__(self, service: Service, cfg: Config, logger: logging.Logger) -> None:
        lim = cfg.listen
        super().__init__(
            functools.partial(endpoint, service, max_json_depth=lim.max_json_depth),
            lim.max_body_bytes, logger,
            unix_limits=ConnectionLimits(lim.max_unix_connections, None, lim.request_deadline_s,
                                         lim.max_request_line_bytes, lim.max_header_bytes),
            tcp_limits=ConnectionLimits(lim.max_tcp_connections, lim.max_tcp_connections_per_ip,
                                        lim.request_deadline_s, lim.max_request_line_bytes,
                                        lim.max_header_bytes))
