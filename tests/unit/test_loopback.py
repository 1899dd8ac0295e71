"""agents.isolate_loopback (attack 8's last point): the agent's own loopback address, its
unit's IPAddressAllow/Deny, and every path that reaches an agent (the front door, pard's
health check, the host's own probe) connecting from an address the unit accepts.
The firewall itself is systemd's: tests/integration/test_attacks.py tries it."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import ClientSession, ClientTimeout, web

from par import front_door, loopback
from par.agent_host.par_agent_host.surfaces import http_answers
from par.config import Agents, Config, ConfigError, Front, Ports, from_dict
from par.front.main import agent_sessions
from par.front.proxy import Proxy, Settings
from par.front.routes import RoutesFile, build_table, render
from par.front.server import GuardedServer, Limits
from par.fsutil import atomic_write_bytes
from par.service import _get_json
from tests.unit.test_agent_isolation import spec_props
from tests.unit.test_front import dep

ISOLATED = Config(agents=Agents(isolate_loopback=True))
V4, V6 = int(socket.AF_INET), int(socket.AF_INET6)


def entry(network: str) -> tuple[int, bytes, int]:
    address, _, prefix = network.partition("/")
    family = V6 if ":" in address else V4
    return (family, socket.inet_pton(family, address), int(prefix))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- addresses


def test_agent_address_is_its_rest_port_in_127_slash_8() -> None:
    assert loopback.agent_address(8100) == "127.31.164.1"
    assert loopback.agent_address(1024) == "127.4.0.1"
    assert loopback.agent_address(65535) == "127.255.255.1"
    for port in (1023, 0, 65536):
        with pytest.raises(ValueError):
            loopback.agent_address(port)
    assert loopback.is_agent_address("127.31.164.1")
    for other in ("127.0.0.1", "127.0.0.2", "127.0.0.53", "127.31.164.2", "10.4.0.1", "::1",
                  "x"):
        assert not loopback.is_agent_address(other), other


def test_bind_address_follows_the_option() -> None:
    ports = {"rest": 8100, "a2a": 50100}
    assert loopback.bind_address(Config(), ports) == "127.0.0.1"
    assert loopback.bind_address(ISOLATED, ports) == "127.31.164.1"
    assert loopback.source_address(Config()) is None
    assert loopback.source_address(ISOLATED) == "127.0.0.2"
    wildcard = Config(ports=Ports(bind_address="0.0.0.0"))
    assert loopback.connect_host(wildcard, ports) == "127.0.0.1"


def test_loopback_resolvers_keep_their_own_addresses_only() -> None:
    text = ("# systemd-resolved\nnameserver 127.0.0.53\nnameserver 127.0.0.53\n"
            "nameserver 10.0.0.2\nnameserver 127.0.0.1\nnameserver ::1\n"
            "nameserver fe80::1%eth0\nnameserver 127.31.164.1\noptions edns0\nnameserver\n"
            "nameserver not-an-ip\n")
    allowed, refused = loopback.loopback_resolvers(text)
    assert allowed == ["127.0.0.53"]  # 10.0.0.2 and fe80:: are not loopback: not touched
    assert refused == ["127.0.0.1", "::1", "127.31.164.1"]
    assert loopback.read_resolvers(Path("/nonexistent/resolv.conf")) == ([], [])


# ---------------------------------------------------------------- the unit


def test_isolated_unit_denies_loopback_and_allows_its_own_address(tmp_path: Path) -> None:
    cfg = dataclasses.replace(ISOLATED, agents=dataclasses.replace(
        ISOLATED.agents, loopback_allow=["127.0.9.0/24"]))
    props = spec_props(tmp_path, cfg)  # marshals every value with its D-Bus signature
    deny = props[b"IPAddressDeny"]
    for net in ("169.254.169.254/32", "fd00:ec2::254/128", "127.0.0.0/8", "::1/128"):
        assert entry(net) in deny, net  # type: ignore[operator]
    assert props[b"IPAddressAllow"] == [entry("127.31.164.1/32"), entry("127.0.0.2/32"),
                                        entry("127.0.9.0/24")]
    env = dict(e.split("=", 1) for e in props[b"Environment"])  # type: ignore[attr-defined]
    assert env["PAR_BIND_ADDRESS"] == "127.31.164.1"


def test_isolated_unit_keeps_loopback_resolvers(tmp_path: Path) -> None:
    from par import agent_unit
    from par.config import with_state_dir
    from par.units import _signature_array, properties
    from tests.unit.test_unit_spec import launch

    cfg = with_state_dir(ISOLATED, tmp_path)
    props = properties(agent_unit.unit_spec(cfg, launch(tmp_path), ["127.0.0.53", "::2"]))
    _signature_array(props)
    assert props[b"IPAddressAllow"] == [entry("127.31.164.1/32"), entry("127.0.0.2/32"),
                                        entry("127.0.0.53/32"), entry("::2/128")]


def test_without_the_option_nothing_changes(tmp_path: Path) -> None:
    props = spec_props(tmp_path)
    assert b"IPAddressAllow" not in props
    assert entry("127.0.0.0/8") not in props[b"IPAddressDeny"]  # type: ignore[operator]
    env = dict(e.split("=", 1) for e in props[b"Environment"])  # type: ignore[attr-defined]
    assert env["PAR_BIND_ADDRESS"] == "127.0.0.1"
    # with no metadata deny either, the option alone still denies loopback
    bare = Config(agents=Agents(ip_address_deny=[], isolate_loopback=True))
    assert spec_props(tmp_path, bare)[b"IPAddressDeny"] == [entry("127.0.0.0/8"),
                                                            entry("::1/128")]


@pytest.mark.parametrize("raw", [
    {"front": {"source_address": "127.0.0.1"}},
    {"front": {"source_address": "127.31.164.1"}},  # an agent's address
    {"front": {"source_address": "10.0.0.2"}},
    {"front": {"source_address": "::1"}},
    {"front": {"source_address": "localhost"}},
    {"agents": {"loopback_allow": ["not-an-ip"]}},
    {"agents": {"isolate_loopback": True}, "ports": {"bind_address": "0.0.0.0"}},
])
def test_bad_loopback_settings_are_config_errors(raw: dict) -> None:
    with pytest.raises(ConfigError):
        from_dict(raw)


def test_front_door_units_change_with_the_option() -> None:
    plain = front_door.service_spec(Config())
    isolated = front_door.service_spec(ISOLATED)
    assert "--isolate-loopback" not in plain.argv and "--source-address" not in plain.argv
    assert isolated.argv[-3:] == ["--isolate-loopback", "--source-address", "127.0.0.2"]
    other = dataclasses.replace(ISOLATED, front=Front(source_address="127.0.0.3"))
    prints = {front_door._fingerprint(c, front_door.service_spec(c))
              for c in (Config(), ISOLATED, other)}
    assert len(prints) == 3  # each re-creates the units


# ---------------------------------------------------------------- who connects, from where


@contextmanager
def peer_recorder(host: str, port: int) -> Iterator[list[str]]:
    """An HTTP/1.0 server on (host, port) answering 200 {"ok": true}; yields the peer
    addresses it saw."""
    seen: list[str] = []
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = srv.accept()
            except OSError:
                continue
            with conn:
                seen.append(peer[0])
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 12\r\n\r\n{\"ok\": true}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        srv.close()


def test_pard_health_check_connects_from_the_source_address() -> None:
    port = free_port()
    address = loopback.agent_address(port)
    with peer_recorder(address, port) as seen:
        assert _get_json(address, port, "/health", source="127.0.0.2") == (200, {"ok": True})
    assert seen == ["127.0.0.2"]


def test_host_probe_connects_from_its_own_address() -> None:
    port = free_port()
    address = loopback.agent_address(port)
    with peer_recorder(address, port) as seen:
        assert http_answers(address, port, "/health")
    assert seen == [address]  # the only source (besides the front door's) its unit accepts


def test_front_door_reaches_an_isolated_agent_from_its_source_address(tmp_path: Path) -> None:
    port = free_port()
    routes = tmp_path / "routes.json"
    atomic_write_bytes(routes, render(build_table([dep("d1", "a", ports={"rest": port})], [])))

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"peer": request.remote, "host": request.host})

    async def scenario() -> dict:
        app = web.Application()
        app.router.add_get("/{tail:.*}", whoami)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, loopback.agent_address(port), port).start()
        session, fresh = agent_sessions(ClientTimeout(total=None), "127.0.0.2")
        proxy = Proxy(RoutesFile(routes, check_s=0),
                      Settings(hold_s=2, isolate_loopback=True), session, fresh)
        server = GuardedServer(proxy.handle, Limits(16, 5), auto_decompress=False,
                               access_log=None)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        front = listener.sockets[0].getsockname()[1]
        try:
            async with ClientSession() as client, \
                    client.get(f"http://127.0.0.1:{front}/agents/a/x") as resp:
                assert resp.status == 200
                return await resp.json()
        finally:
            listener.close()
            await server.shutdown(0.1)
            await session.close()
            await fresh.close()
            await runner.cleanup()

    answer = asyncio.run(scenario())
    assert answer == {"peer": "127.0.0.2", "host": f"{loopback.agent_address(port)}:{port}"}
