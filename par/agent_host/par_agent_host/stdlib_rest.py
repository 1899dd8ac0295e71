"""The REST surface of an agent that declares no `rest.entry`: stdlib only.

Serves the host routes (/health, /meta, POST /invoke) on REST_PORT so every
agent has a health check and can be invoked, whatever its venv holds.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from .api import HostApi, call_handler_sync, invoke_error
from .httpserver import HttpSurface
from .minihttp import HttpError, Request, handler_class

MAX_BODY_BYTES = 10 * 1024 * 1024
SERVER_NAME = "par-agent-host"


def answer(api: HostApi, request: Request, read_body: Callable[[int], bytes]) -> tuple[int, object]:
    """(status, JSON body) for one request to the host routes."""
    route = api.route(request.target)
    if request.method not in ("GET", "POST"):
        raise HttpError(501, f"unsupported method {request.method}")
    if route is None:
        return 404, {"ok": False, "error": "not found"}
    if request.method == "GET":
        if route == "/health":
            return api.health.report()
        if route == "/meta":
            return 200, api.meta()
        return 405, {"ok": False, "error": "use POST"}
    if route != "/invoke":
        return 405, {"ok": False, "error": "use GET"}
    raw = read_body(MAX_BODY_BYTES)
    try:
        context = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        return 400, {"ok": False, "error": f"body is not JSON: {exc}"}
    try:
        return 200, call_handler_sync(api.handler, context)
    except Exception as exc:  # the agent's handler failed: 500, host keeps serving
        return 500, invoke_error(exc)


def surface(api: HostApi, listener: socket.socket | None = None) -> HttpSurface:
    """The REST surface; `listener`: REST_PORT's socket when systemd passed it."""
    handler = handler_class(lambda request, read_body: answer(api, request, read_body), SERVER_NAME)
    return HttpSurface("rest", api.env.bind_address, api.env.ports.rest, handler,
                       probe_path="/meta", listener=listener)
