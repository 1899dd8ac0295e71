"""The A2A (gRPC) surface: the agent's own server, from its `create_grpc_server`.

`a2a.service` is `module:function` (a bare module means
`module:create_grpc_server`).  The function is called with A2A_PORT (or with
no argument if it takes none) and returns a gRPC server: the host starts it
unless it is already started, and stops it with a grace period on SIGTERM.
Returning None means the function started a server itself; the host only
probes the port.  Both `grpc.server` and `grpc.aio.server` work: the factory,
`start` and `stop` all run on a private event loop thread, so an aio server
finds its loop and a sync one is unaffected.

The host never imports grpc itself; the agent's venv has the grpcio it pinned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Callable
from typing import Any

from . import log
from .exitcodes import EXIT_BAD_ENTRY, EXIT_SURFACE_FAILED, HostError
from .loader import EntryRef
from .surfaces import Surface, h2_answers, probe_host


class A2aSurface(Surface):
    name = "a2a"

    def __init__(
        self,
        factory: Callable[..., Any],
        ref: EntryRef,
        bind_address: str,
        port: int,
        start_timeout: float,
    ) -> None:
        self.port = port
        self._factory = factory
        self._ref = ref
        self._bind = bind_address
        self._start_timeout = start_timeout
        self._server: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="par-a2a", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._create_and_start(), self._loop)
        try:
            future.result(timeout=self._start_timeout)
        except HostError:
            raise
        except concurrent.futures.TimeoutError:
            raise HostError(
                EXIT_SURFACE_FAILED,
                f"a2a service {self._ref} did not return within {self._start_timeout:g} s",
            ) from None
        except Exception as exc:
            log.exception(exc)
            raise HostError(
                EXIT_SURFACE_FAILED,
                f"a2a service {self._ref} raised {type(exc).__name__}: {exc}",
            ) from exc

    async def _create_and_start(self) -> None:
        try:
            takes_port = bool(inspect.signature(self._factory).parameters)
        except (TypeError, ValueError):
            takes_port = True
        server = self._factory(self.port) if takes_port else self._factory()
        if inspect.isawaitable(server):
            server = await server
        if server is None:
            return
        if not callable(getattr(server, "start", None)) or not callable(
            getattr(server, "stop", None)
        ):
            raise HostError(
                EXIT_BAD_ENTRY,
                f"a2a service {self._ref} returned a {type(server).__name__}; "
                "expected a gRPC server (with start() and stop()) or None",
            )
        self._server = server
        try:
            started = server.start()
            if inspect.isawaitable(started):
                await started
        except (ValueError, RuntimeError) as exc:
            # grpc: "Cannot start already-started server!": the factory started it; fine.
            if "already" not in str(exc).lower():
                raise

    async def _stop_server(self, grace: float) -> None:
        stopped = self._server.stop(grace)
        if inspect.isawaitable(stopped):
            await stopped
        elif hasattr(stopped, "wait"):  # grpc.server.stop returns a threading.Event
            stopped.wait(grace + 1)

    def probe(self) -> bool:
        return h2_answers(probe_host(self._bind), self.port)

    def alive(self) -> bool:
        return self._stopping or self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        self._stopping = True
        if not self._thread.is_alive():
            return
        if self._server is not None:
            future = asyncio.run_coroutine_threadsafe(self._stop_server(timeout), self._loop)
            try:
                future.result(timeout + 2)
            except Exception as exc:  # a failing stop must not keep the host from exiting
                log.exception(exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(1)
