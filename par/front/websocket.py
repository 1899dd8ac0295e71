"""WebSocket upgrades through the front door: the agent's side first, then the client's.

The agent's WebSocket is opened before the client's upgrade is answered, so an
agent that does not speak WebSocket gets the client a clear 4xx (not a 101
followed by a close), and a restarting agent is waited for like any request.
Other upgrades (h2c, ...) are refused with 400.
"""

from __future__ import annotations

import asyncio

from aiohttp import (
    ClientConnectorError,
    ClientOSError,
    ClientWebSocketResponse,
    ServerDisconnectedError,
    WSMsgType,
    WSServerHandshakeError,
    web,
)

from par.front.proxy import Proxy, ProxyError, Target, forward_headers

# Headers the WebSocket handshake sets itself, on each side.
HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                       "sec-websocket-protocol", "sec-websocket-accept"})


async def proxy_websocket(proxy: Proxy, request: web.BaseRequest,
                          target: Target) -> web.StreamResponse:
    """Relay a WebSocket between the client and the agent, message by message."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ProxyError(400, "upgrade_refused", "the front door upgrades to WebSocket only")
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    headers = {k: v for k, v in forward_headers(request, target.prefix).items()
               if k.lower() not in HANDSHAKE}
    upstream = await _connect(proxy, target, headers, protocols)
    client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   autoping=True)
    try:
        await client.prepare(request)
        await asyncio.gather(_pump(client, upstream), _pump(upstream, client))
    finally:
        await upstream.close()
        await client.close()
    return client


async def _connect(proxy: Proxy, target: Target, headers: dict[str, str],
                   protocols: list[str]) -> ClientWebSocketResponse:
    async for res, url in proxy.attempts(target):
        try:
            return await proxy.fresh.ws_connect(url, headers=headers, protocols=protocols,
                                                autoping=True)
        except WSServerHandshakeError as exc:
            # a plain answer (uvicorn without a WebSocket library answers 200): 400
            status = exc.status if exc.status >= 400 else 400
            status = 502 if status >= 500 else status
            raise ProxyError(status, "not_websocket",
                             f"agent {res.agent} did not accept a WebSocket at "
                             f"{target.path} (it answered {exc.status})") from None
        except (TimeoutError, ClientConnectorError, ClientOSError, ServerDisconnectedError):
            pass
    raise AssertionError("attempts() ends only by raising")  # pragma: no cover


async def _pump(source: web.WebSocketResponse | ClientWebSocketResponse,
                sink: web.WebSocketResponse | ClientWebSocketResponse) -> None:
    """Copy messages from `source` to `sink` until either side closes."""
    async for msg in source:
        if msg.type == WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        else:
            break
    await sink.close(code=source.close_code or 1000)
