"""The REST surface of an agent that declares no `rest.entry`: stdlib only.

Serves the host routes (/health, /meta, POST /invoke) on REST_PORT so every
agent has a health check and can be invoked, whatever its venv holds.
"""

from __future__ import annotations

import json

from .api import HostApi, call_handler_sync, invoke_error
from .httpserver import HttpSurface, QuietHandler

MAX_BODY_BYTES = 10 * 1024 * 1024


def _handler_class(api: HostApi) -> type[QuietHandler]:
    class RestHandler(QuietHandler):
        server_version = "par-agent-host"

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            route = api.route(self.path)
            if route == "/health":
                self._send(*api.health.report())
            elif route == "/meta":
                self._send(200, api.meta())
            elif route == "/invoke":
                self._send(405, {"ok": False, "error": "use POST"})
            else:
                self._send(404, {"ok": False, "error": "not found"})

        def do_POST(self) -> None:
            if api.route(self.path) != "/invoke":
                self._send(404, {"ok": False, "error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._send(413, {"ok": False, "error": "body too large"})
                return
            raw = self.rfile.read(length) if length else b""
            try:
                context = json.loads(raw) if raw.strip() else {}
            except ValueError as exc:
                self._send(400, {"ok": False, "error": f"body is not JSON: {exc}"})
                return
            try:
                result = call_handler_sync(api.handler, context)
            except Exception as exc:  # the agent's handler failed: 500, host keeps serving
                self._send(500, invoke_error(exc))
                return
            self._send(200, result)

    return RestHandler


def surface(api: HostApi) -> HttpSurface:
    return HttpSurface(
        "rest",
        api.env.bind_address,
        api.env.ports.rest,
        _handler_class(api),
        probe_path="/meta",
    )
