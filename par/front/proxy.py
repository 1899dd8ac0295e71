"""Forwarding one request: `/agents/{id}/{path}` → the agent's port, prefix stripped.

A request for an agent that is being replaced, restarted or restarted by
systemd waits instead of failing: a refused connection, or one reset before
any answer, is tried again with a short backoff, the route read again each
time, until `hold_s`.  Ports are inherited across deploys, so the retry lands
on whichever process serves next.  Only bodies the front door still holds
(small ones, read before forwarding) are sent twice; a large streamed body is
retried only when the connection was refused before any of it went out.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import (
    ClientConnectorError,
    ClientOSError,
    ClientPayloadError,
    ClientResponse,
    ClientSession,
    ServerDisconnectedError,
    web,
)
from multidict import CIMultiDict
from yarl import URL

from par.front.routes import Resolution, RoutesFile
from par.loopback import agent_address

PREFIX = "/agents/"
# agentAppId or deploymentId (par.ids: a deploymentId pattern covers both)
IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Bodies up to this size are read before forwarding, so they can be sent again.
REPLAY_MAX_BYTES = 1024 * 1024
# Answers of a known length up to this size are read whole before the client gets any
# of them, so an agent that dies in the middle of one is asked again.
SMALL_ANSWER_BYTES = 256 * 1024
# Hop-by-hop headers (RFC 9110 7.6.1) are the front door's own, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "expect",
})
FIRST_BACKOFF_S = 0.02
MAX_BACKOFF_S = 0.25
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Settings:
    """The front door's limits (from par.yaml `front.*`, passed on its command line)."""

    hold_s: float = 30.0
    max_body_bytes: int = 10 * 1024 * 1024
    body_timeout_s: float = 30.0
    upstream_host: str = "127.0.0.1"
    connect_timeout_s: float = 2.0
    # agents.isolate_loopback: each agent listens on its own address (par.loopback),
    # derived from its REST port; the sessions connect from front.source_address
    isolate_loopback: bool = False


class ProxyError(Exception):
    """An answer of the front door's own: status, stable code, message (JSON envelope)."""

    def __init__(self, status: int, code: str, message: str,
                 extra: dict[str, object] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra = extra or {}
        self.headers = headers or {}

    def response(self) -> web.Response:
        """The JSON answer (same envelope as pard's API)."""
        body = {"error": {"code": self.code, "message": self.message, "field": None},
                **self.extra}
        return web.Response(status=self.status, text=json.dumps(body),
                            content_type="application/json", headers=self.headers)


@dataclass(frozen=True)
class Target:
    """Where a request goes: the id it names, the surface, the path below the prefix."""

    ident: str
    surface: str  # "rest" or "ui"
    prefix: str  # what was stripped: /agents/{id} or /agents/{id}/ui
    path: str  # raw (still percent-encoded) path for the agent, starting with "/"
    query: str


def parse_target(raw_target: str) -> Target | str:
    """The target of a request, or the URL to redirect to (a missing trailing slash);
    raises ProxyError 404/400 for a path outside /agents/ or one that tries to leave its
    agent (`..`, `.` segments, encoded slashes or backslashes, control characters)."""
    path, _, query = raw_target.partition("?")
    if not path.startswith(PREFIX):
        raise ProxyError(404, "not_found", "the front door serves /agents/{agentAppId}/... only")
    ident, slash, sub = path[len(PREFIX):].partition("/")
    if not IDENT_RE.fullmatch(ident):
        raise ProxyError(400, "bad_path", "not a valid agent or deployment id in the path")
    suffix = f"?{query}" if query else ""
    if not slash:
        return f"{PREFIX}{ident}/{suffix}"
    lowered = sub.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in sub:
        raise ProxyError(400, "bad_path", "encoded slashes and backslashes are refused")
    decoded = unquote(sub)
    if any(ord(c) < 0x20 or c == "\x7f" for c in decoded):
        raise ProxyError(400, "bad_path", "control characters in the path are refused")
    if any(seg in (".", "..") for seg in decoded.split("/")):
        raise ProxyError(400, "bad_path", "'.' and '..' path segments are refused")
    if sub == "ui":
        return f"{PREFIX}{ident}/ui/{suffix}"
    if sub.startswith("ui/"):
        return Target(ident, "ui", f"{PREFIX}{ident}/ui", "/" + sub[3:], query)
    return Target(ident, "rest", f"{PREFIX}{ident}", "/" + sub, query)


def forward_headers(request: web.BaseRequest, prefix: str) -> CIMultiDict[str]:
    """The request's end-to-end headers plus X-Forwarded-For/-Proto/-Host/-Prefix."""
    named = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in request.headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in named or low in ("host", "content-length") \
                or low.startswith("x-forwarded-"):
            continue
        out.add(key, value)
    previous = request.headers.get("X-Forwarded-For")
    peer = request.remote or ""
    # the front door is the edge: the client's own X-Forwarded-For is kept in front of
    # the address it came from, the other X-Forwarded-* are the front door's
    out["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
    out["X-Forwarded-Proto"] = request.scheme
    out["X-Forwarded-Host"] = request.host
    out["X-Forwarded-Prefix"] = prefix
    return out


def answer_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """An agent's answer headers without the hop-by-hop ones."""
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in HOP_BY_HOP:
            out.add(key, value)
    return out


def unavailable(res: Resolution, message: str) -> ProxyError:
    """503 naming the agent's status, with Retry-After."""
    return ProxyError(503, "agent_unavailable", message,
                      {"agentAppId": res.agent, "deploymentId": res.deployment_id,
                       "status": res.status},
                      {"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class Body:
    """A request body on its way: read whole (replayable) or streamed once."""

    data: bytes | None = None
    streamed: bool = False
    started: bool = False  # a streamed body's first bytes went out
    error: ProxyError | None = None  # too large, or the client too slow


@dataclass
class Proxy:
    """The front door's request handler (aiohttp low-level server)."""

    routes: RoutesFile
    settings: Settings
    session: ClientSession  # keep-alive pool to the agents
    fresh: ClientSession  # new connections only: for bodies that cannot be sent twice
    # True while the front door stops: answers then say Connection: close
    draining: Callable[[], bool] = lambda: False

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request."""
        try:
            target = parse_target(request.raw_path)
            if isinstance(target, str):
                raise web.HTTPPermanentRedirect(target)
            if _upgrade(request):
                from par.front.websocket import proxy_websocket

                return await proxy_websocket(self, request, target)
            return await self._forward(request, target)
        except ProxyError as exc:
            return exc.response()

    async def resolve_port(self, target: Target) -> tuple[Resolution, int | None]:
        """The route for `target` now; its port, or None when there is none (yet)."""
        res = self.routes.resolve(target.ident)
        if res.kind == "unknown":
            raise ProxyError(404, "agent_not_found", f"no agent or deployment {target.ident!r}")
        if res.kind == "down":
            raise unavailable(res, f"agent {res.agent} is {res.status}")
        if res.kind == "hold" or not res.ports:
            return res, None
        return res, res.ports.get(target.surface) or res.ports.get("rest")

    async def attempts(self, target: Target) -> AsyncIterator[tuple[Resolution, URL]]:
        """The route and the agent's URL for each try at `target` (HTTP or WebSocket): the
        next one only after a pause that doubles each time, while the route is held or the
        agent does not answer; the 503 once `hold_s` is spent, 404/503 at once from the
        routes."""
        deadline = asyncio.get_running_loop().time() + self.settings.hold_s
        delay = FIRST_BACKOFF_S
        while True:
            res, port = await self.resolve_port(target)
            if port is not None:
                yield res, self.url(res, port, target)
            delay = await self.hold(deadline, delay, res)

    async def hold(self, deadline: float, delay: float, res: Resolution | None) -> float:
        """Sleep before the next try, or raise the 503 once `hold_s` is spent."""
        loop = asyncio.get_running_loop()
        if loop.time() + delay > deadline:
            res = res or Resolution("hold")
            raise unavailable(res, f"agent {res.agent} did not answer within "
                                   f"{self.settings.hold_s:g} s (status {res.status})")
        await asyncio.sleep(delay)
        return min(delay * 2, MAX_BACKOFF_S)

    def url(self, res: Resolution, port: int, target: Target) -> URL:
        """Where `target` goes on the agent `res` routes to (`port`: the surface's)."""
        host = self.settings.upstream_host
        if self.settings.isolate_loopback and res.ports and "rest" in res.ports:
            host = agent_address(res.ports["rest"])
        return URL.build(scheme="http", host=host, port=port,
                         path=target.path, query_string=target.query, encoded=True)

    async def _forward(self, request: web.BaseRequest, target: Target) -> web.StreamResponse:
        body = await self._body(request)
        headers = forward_headers(request, target.prefix)
        async for _, url in self.attempts(target):
            session = self.fresh if body.streamed else self.session
            data = self._stream(request, body) if body.streamed else body.data
            upstream: ClientResponse | None = None
            try:
                upstream = await session.request(request.method, url, headers=headers,
                                                 data=data, allow_redirects=False)
                length = upstream.content_length
                if length is not None and length <= SMALL_ANSWER_BYTES \
                        and request.method != "HEAD" and upstream.status not in (204, 304):
                    # read whole before answering: an agent killed in the middle of
                    # it is retried like one that refused the connection
                    whole = await upstream.read()
                    return await self._relay(request, upstream, whole)
            except (TimeoutError, ClientConnectorError, ClientOSError,
                    ServerDisconnectedError, ClientPayloadError):
                if upstream is not None:
                    upstream.close()
                if body.error is not None:
                    raise body.error from None
                if body.started:  # part of a body that cannot be sent again went out
                    raise ProxyError(502, "agent_reset",
                                     "the agent closed the connection while the request "
                                     "body was being sent") from None
            else:
                return await self._relay(request, upstream)
        raise AssertionError("attempts() ends only by raising")  # pragma: no cover

    async def _body(self, request: web.BaseRequest) -> Body:
        """Read a small body whole (it can be sent again); leave a large or chunked one to
        stream.  413 beyond front.max_body_bytes."""
        limit = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise ProxyError(413, "body_too_large", f"request body over {limit} bytes")
        if not request.body_exists:
            return Body()
        if length is None or length > REPLAY_MAX_BYTES:
            return Body(streamed=True)
        chunks = []
        body = Body()
        async for chunk in self._chunks(request, body):
            chunks.append(chunk)
        if body.error:
            raise body.error
        return Body(data=b"".join(chunks))

    async def _chunks(self, request: web.BaseRequest, body: Body) -> AsyncIterator[bytes]:
        """The body's pieces as they come; stops with `body.error` set when the client is
        too slow or sends too much."""
        total = 0
        while True:
            try:
                chunk = await asyncio.wait_for(request.content.readany(),
                                               self.settings.body_timeout_s)
            except TimeoutError:
                body.error = ProxyError(408, "body_timeout", "request body too slow")
                return
            if not chunk:
                return
            total += len(chunk)
            if total > self.settings.max_body_bytes:
                body.error = ProxyError(413, "body_too_large",
                                        f"request body over {self.settings.max_body_bytes} bytes")
                return
            yield chunk

    async def _stream(self, request: web.BaseRequest, body: Body) -> AsyncIterator[bytes]:
        async for chunk in self._chunks(request, body):
            body.started = True
            yield chunk
        if body.error is not None:
            # abort the upstream request: the agent must not see a cut body as complete
            raise ConnectionAbortedError(body.error.message)

    async def _relay(self, request: web.BaseRequest, upstream: ClientResponse,
                     whole: bytes | None = None) -> web.StreamResponse:
        """Pass the agent's answer on: `whole` if it was read already, else as it comes
        (SSE and streams are not buffered)."""
        headers = answer_headers(upstream.headers)
        if whole is not None:
            upstream.release()
            # one write: headers and body (its Content-Length is the agent's own)
            answer = web.Response(status=upstream.status, reason=upstream.reason,
                                  headers=headers)
            answer.body = whole
            if self.draining():
                answer.force_close()
            return answer
        try:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
            if self.draining():
                resp.force_close()
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        except BaseException:
            upstream.close()  # a half-read answer: that connection is not reused
            raise
        upstream.release()
        return resp


def _upgrade(request: web.BaseRequest) -> bool:
    """Whether the request asks for a protocol upgrade (401/400 for other than WebSocket
    are answered by the WebSocket module)."""
    connection = request.headers.get("Connection", "").lower()
    return "upgrade" in connection and "Upgrade" in request.headers
