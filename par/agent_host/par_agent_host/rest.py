"""The REST surface of an agent that declares `rest.entry`: the venv's FastAPI, served by uvicorn.

Imported only for such agents (this module imports fastapi and uvicorn at the
top; the host turns a missing one into EXIT_IMPORT_ERROR).  No
`from __future__ import annotations` here: FastAPI reads the route
functions' annotations at runtime.

The entry is called as `mount(app)` with a FastAPI app (a function without
parameters is called as `mount()`).  It may return nothing (routes added to
`app`), a FastAPI app (served instead, with the host routes added) or an
APIRouter (included).  The host routes are placed first, so an agent's own
`/health` cannot hide the host's readiness gate.
"""

import asyncio
import inspect
import json
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from . import log
from .api import HostApi, invoke_error
from .exitcodes import EXIT_BAD_ENTRY, EXIT_SURFACE_FAILED, HostError
from .loader import EntryRef
from .surfaces import Surface, http_answers, probe_host


def _call_mount(mount: Callable[..., Any], app: FastAPI) -> Any:
    try:
        takes_app = bool(inspect.signature(mount).parameters)
    except (TypeError, ValueError):  # no signature (C callables): assume mount(app)
        takes_app = True
    result = mount(app) if takes_app else mount()
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def build_app(api: HostApi, mount: Callable[..., Any], ref: EntryRef) -> FastAPI:
    """The app to serve: the agent's routes plus the host routes in front."""
    app = FastAPI(title=api.spec.name, version=api.spec.version)
    try:
        result = _call_mount(mount, app)
    except Exception as exc:
        log.exception(exc)
        raise HostError(
            EXIT_SURFACE_FAILED, f"rest entry {ref} raised {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(result, FastAPI):
        app = result
    elif isinstance(result, APIRouter):
        app.include_router(result)
    elif result is not None:
        raise HostError(
            EXIT_BAD_ENTRY,
            f"rest entry {ref} returned a {type(result).__name__}; "
            "expected None, a FastAPI app or an APIRouter",
        )
    _add_host_routes(app, api)
    return app


def _add_host_routes(app: FastAPI, api: HostApi) -> None:
    handler = api.handler

    async def health() -> JSONResponse:
        status, body = api.health.report()
        return JSONResponse(body, status_code=status)

    async def meta() -> JSONResponse:
        return JSONResponse(api.meta())

    async def invoke(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            context = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            return JSONResponse({"ok": False, "error": f"body is not JSON: {exc}"}, 400)
        try:
            if inspect.iscoroutinefunction(handler):
                result = await handler(context)
            else:
                # A sync handler may block: keep it off the event loop.
                result = await run_in_threadpool(handler, context)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:  # the agent's handler failed: 500, host keeps serving
            return JSONResponse(invoke_error(exc), 500)
        return JSONResponse(jsonable_encoder(result))

    before = len(app.router.routes)
    for prefix in api.prefixes():
        app.add_api_route(prefix + "/health", health, methods=["GET"], include_in_schema=False)
        app.add_api_route(prefix + "/meta", meta, methods=["GET"], include_in_schema=False)
        app.add_api_route(prefix + "/invoke", invoke, methods=["POST"], include_in_schema=False)
    # Starlette matches routes in order: move ours in front of the agent's.
    ours = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = ours


class UvicornSurface(Surface):
    """uvicorn in a thread of its own (so it installs no signal handlers), on a socket we bind."""

    name = "rest"

    def __init__(self, app: FastAPI, bind_address: str, port: int, stop_timeout: float,
                 listener: socket.socket | None = None) -> None:
        """`listener`: REST_PORT's listening socket when systemd passed it, else None."""
        self.port = port
        self._listener = listener
        self._app = app
        self._bind = bind_address
        self._stop_timeout = stop_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        sock = self._listener or self._bind_port()
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(self._stop_timeout)),
        )
        self._server = uvicorn.Server(config)
        # uvicorn closes its copy of the socket on stop (never shutdown()): a socket
        # systemd holds keeps listening, and connections wait for the next process.
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="par-rest", daemon=True
        )
        self._thread.start()

    def _bind_port(self) -> socket.socket:
        """Binding here, not in uvicorn, turns "address in use" into a clear HostError now."""
        family = socket.AF_INET6 if ":" in self._bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._bind, self.port))
        except OSError as exc:
            sock.close()
            raise HostError(
                EXIT_SURFACE_FAILED,
                f"rest surface cannot listen on {self._bind}:{self.port}: {exc.strerror or exc}",
            ) from exc
        return sock

    def probe(self) -> bool:
        return http_answers(probe_host(self._bind), self.port, "/meta")

    def alive(self) -> bool:
        return self._stopping or (self._thread is not None and self._thread.is_alive())

    def stop(self, timeout: float) -> None:
        self._stopping = True
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True  # uvicorn closes the listener, then drains
        self._thread.join(timeout)
