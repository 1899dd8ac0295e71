"""The front door without systemd: the routes table, path checks, and the proxy in one
event loop against an aiohttp agent (WebSocket echo, hold on a refused port, limits)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout, web

from par.deployment import Deployment
from par.front.main import agent_sessions
from par.front.proxy import Proxy, ProxyError, Settings, Target, parse_target
from par.front.routes import RoutesFile, build_table, render, resolve
from par.front.server import GuardedServer, Limits
from par.fsutil import atomic_write_bytes


def dep(did: str, agent: str, status: str = "healthy", current: bool = True,
        desired: str = "running", ports: dict[str, int] | None = None) -> Deployment:
    return Deployment(deployment_id=did, agent_app_id=agent, version="1.0.0",
                      package_url="https://x/p.apkg", status=status, current=current,
                      desired_state=desired, ports=ports or {"rest": 8100})


def test_table_resolves_agents_and_deployments() -> None:
    table = build_table(
        [dep("d1", "a"), dep("s1", "s", status="stopped", desired="stopped")],
        [dep("d2", "a", status="loading", current=False), dep("n1", "new", "starting", False),
         dep("f1", "bad", "failed", False), dep("d1", "a")])
    assert resolve(table, "a").kind == "forward" and resolve(table, "a").ports == {"rest": 8100}
    assert resolve(table, "d1").kind == "forward"
    assert resolve(table, "d2").kind == "hold"  # a deploy on its way
    assert resolve(table, "new").kind == "hold"  # a first deploy on its way
    assert (resolve(table, "s").kind, resolve(table, "s").status) == ("down", "stopped")
    assert (resolve(table, "bad").kind, resolve(table, "bad").status) == ("down", "failed")
    assert resolve(table, "nobody").kind == "unknown"
    restarting = build_table([dep("d1", "a", status="starting")], [])
    assert resolve(restarting, "a").kind == "forward"  # held only if refused
    assert b"env" not in render(table)


def test_routes_file_follows_renames(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    routes = RoutesFile(path, check_s=0)
    assert routes.resolve("a").kind == "unknown"
    atomic_write_bytes(path, render(build_table([dep("d1", "a")], [])))
    assert routes.resolve("a").kind == "forward"
    atomic_write_bytes(path, b"{broken")
    assert routes.resolve("a").kind == "forward"  # the last good table stays
    atomic_write_bytes(path, render(build_table([], [])))
    assert routes.resolve("a").kind == "unknown"


@pytest.mark.parametrize(("target", "expected"), [
    ("/agents/a/x/y?q=1", Target("a", "rest", "/agents/a", "/x/y", "q=1")),
    ("/agents/a/", Target("a", "rest", "/agents/a", "/", "")),
    ("/agents/a/ui/app.js", Target("a", "ui", "/agents/a/ui", "/app.js", "")),
    ("/agents/a/b%20c", Target("a", "rest", "/agents/a", "/b%20c", "")),
    ("/agents/a", "/agents/a/"),
    ("/agents/a/ui?x=1", "/agents/a/ui/?x=1"),
])
def test_parse_target(target: str, expected: object) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize("target", [
    "/agents/a/../b/x", "/agents/a/%2e%2e/b", "/agents/a/x%2Fy", "/agents/a/x%5cy",
    "/agents/a/x\\y", "/agents/..%2Fb/x", "/agents/a%2F/x", "/agents/a/./x", "/agents/a/%00",
    "/agents//x",
])
def test_parse_target_refuses_escapes(target: str) -> None:
    with pytest.raises(ProxyError) as exc:
        parse_target(target)
    assert exc.value.status == 400


def test_parse_target_outside_agents_is_404() -> None:
    with pytest.raises(ProxyError) as exc:
        parse_target("/health")
    assert exc.value.status == 404


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _agent(port: int) -> web.AppRunner:
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str("echo:" + msg.data)
        return sock

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path,
                                  "prefix": request.headers.get("X-Forwarded-Prefix")})

    async def headers(request: web.Request) -> web.Response:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/headers", headers)
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _front(routes: Path, limits: Limits, hold_s: float = 5.0):
    session, fresh = agent_sessions(ClientTimeout(total=None))
    proxy = Proxy(RoutesFile(routes, check_s=0), Settings(hold_s=hold_s), session, fresh)
    server = GuardedServer(proxy.handle, limits, auto_decompress=False, access_log=None)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]

    async def close() -> None:
        listener.close()
        await server.shutdown(0.1)
        await session.close()
        await fresh.close()
    return port, close


def test_proxy_websocket_hold_and_connection_limit(tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    agent_port = free_port()
    atomic_write_bytes(routes, render(build_table([dep("d1", "a", ports={"rest": agent_port})],
                                                  [])))

    async def scenario() -> None:
        port, close = await _front(routes, Limits(max_connections=3, header_timeout_s=5))
        base = f"http://127.0.0.1:{port}/agents/a"
        async with ClientSession() as client:
            # the agent is not up yet: the request waits for it
            pending = asyncio.ensure_future(client.get(f"{base}/x"))
            await asyncio.sleep(0.3)
            assert not pending.done()
            runner = await _agent(agent_port)
            resp = await pending
            assert resp.status == 200
            assert await resp.json() == {"path": "/x", "prefix": "/agents/a"}
            async with client.ws_connect(f"{base}/ws") as ws:
                await ws.send_str("hi")
                assert (await ws.receive()).data == "echo:hi"
            # beyond max_connections: 503, the others keep working
            readers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            r, _ = readers[-1]
            assert (await asyncio.wait_for(r.read(100), 2)).startswith(b"HTTP/1.1 503")
            for _, w in readers:
                w.close()
            await asyncio.sleep(0.1)
            async with client.get(f"{base}/y") as again:
                assert again.status == 200
        await close()
        await runner.cleanup()

    asyncio.run(scenario())


def test_proxy_forwards_the_callers_headers_and_adds_none_of_aiohttps(tmp_path: Path) -> None:
    """The agent sees the caller's headers as they were, plus X-Forwarded-*: none that
    aiohttp's client adds of its own (User-Agent, Accept, Accept-Encoding), on the pooled
    session and on the one for WebSocket upgrades and streamed bodies alike."""
    routes = tmp_path / "routes.json"
    agent_port = free_port()
    atomic_write_bytes(routes, render(build_table([dep("d1", "a", ports={"rest": agent_port})],
                                                  [])))
    own = {"user-agent", "accept", "accept-encoding"}

    async def scenario() -> None:
        runner = await _agent(agent_port)
        port, close = await _front(routes, Limits())
        url = f"http://127.0.0.1:{port}/agents/a/headers"
        async with ClientSession(skip_auto_headers=("User-Agent", "Accept",
                                                    "Accept-Encoding")) as bare:
            async with bare.get(url) as resp:
                seen = await resp.json()
            assert not own & set(seen), seen
            assert seen["x-forwarded-prefix"] == "/agents/a"
            assert seen["x-forwarded-for"] == "127.0.0.1"
            # a body of unknown length streams, through the session of fresh connections
            async def chunks() -> AsyncIterator[bytes]:
                yield b"x"
            async with bare.post(url, data=chunks()) as resp:
                seen = await resp.json()
            assert not own & set(seen), seen
            async with bare.get(url, headers={"User-Agent": "caller/1", "Accept": "text/plain",
                                              "Accept-Encoding": "br"}) as resp:
                seen = await resp.json()
            assert (seen["user-agent"], seen["accept"], seen["accept-encoding"]) == \
                ("caller/1", "text/plain", "br")
        await close()
        await runner.cleanup()

    asyncio.run(scenario())


def test_proxy_gives_up_after_hold_s_with_503(tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    atomic_write_bytes(routes, render(build_table([dep("d1", "a", ports={"rest": free_port()})],
                                                  [])))

    async def scenario() -> None:
        port, close = await _front(routes, Limits(), hold_s=0.5)
        async with ClientSession() as client, \
                client.get(f"http://127.0.0.1:{port}/agents/a/x") as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            body = json.loads(await resp.text())
            assert body["error"]["code"] == "agent_unavailable" and body["status"] == "healthy"
        await close()

    asyncio.run(scenario())
