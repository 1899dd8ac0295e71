"""The front door's connections: a bounded number, and a deadline for a request's headers.

aiohttp times out idle keep-alive connections (`keepalive_timeout`) but not a
client that trickles its first request's headers; `GuardedServer` gives every
new connection `header_timeout_s` to send them (408 and close otherwise), and
answers 503 and closes once `max_connections` are open.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


def _canned(status: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer, written before any request was parsed (so aiohttp's
    response machinery is not there yet)."""
    body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n")
    return head.encode() + body


TOO_MANY = _canned("503 Service Unavailable", "too_many_connections",
                   "the front door has too many open connections")
TOO_SLOW = _canned("408 Request Timeout", "header_timeout", "request headers too slow")


@dataclass(frozen=True)
class Limits:
    """Per-connection limits."""

    max_connections: int = 1024
    header_timeout_s: float = 10.0


class _GuardedHandler(RequestHandler):
    """aiohttp's connection handler, counted and with a first-request deadline."""

    _guard: GuardedServer
    _deadline: asyncio.TimerHandle | None = None
    busy = 0  # requests being answered on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        guard.open += 1
        if guard.open > guard.limits.max_connections:
            transport.write(TOO_MANY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._deadline = asyncio.get_running_loop().call_later(
            guard.limits.header_timeout_s, self._too_slow, transport)

    def _too_slow(self, transport: asyncio.BaseTransport) -> None:
        if not transport.is_closing():
            transport.write(TOO_SLOW)  # type: ignore[attr-defined]
            transport.close()

    def request_seen(self) -> None:
        """The first request's headers arrived: from now on aiohttp's keep-alive timeout
        bounds waits between requests."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.open -= 1
        self.request_seen()
        super().connection_lost(exc)


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections are `_GuardedHandler`s, drained
    gently on stop (aiohttp's own shutdown cancels requests being answered)."""

    def __init__(self, handler: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(self._seen(handler), **kwargs)
        self.limits = limits
        self.open = 0
        self.draining = False

    def _seen(self, handler: Any) -> Any:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            if not isinstance(protocol, _GuardedHandler):
                return await handler(request)
            protocol.request_seen()
            protocol.busy += 1
            try:
                return await handler(request)
            finally:
                protocol.busy -= 1
                if self.draining:
                    protocol.close()  # after this answer (aiohttp says Connection: close)
        return handle

    async def drain(self, grace_s: float, idle_grace_s: float = 0.5) -> None:
        """Stop gently; call once the listener is closed.  For `idle_grace_s` every
        connection still gets its next request answered, with Connection: close, so a
        client between two requests reconnects cleanly (to the next process, through the
        socket systemd holds); then idle connections are closed and busy ones after their
        answer, waiting up to `grace_s`; then whatever is left is closed."""
        self.draining = True
        await asyncio.sleep(idle_grace_s)
        deadline = self._loop.time() + grace_s
        while True:
            busy = False
            for conn in self.connections:
                if isinstance(conn, _GuardedHandler) and conn.busy:
                    conn.close()
                    busy = True
                elif conn.transport is not None:
                    conn.transport.close()
            if not busy or self._loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        await self.shutdown(0.1)

    def __call__(self) -> RequestHandler:
        proto = _GuardedHandler(self, loop=self._loop, **self._kwargs)
        proto._guard = self
        return proto
