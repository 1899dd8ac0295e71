"""par.agent_sockets: the socket units that hold agents' ports, on a FakeSystemd."""

from __future__ import annotations

import dataclasses
import socket

from par import agent_sockets
from par.agent_sockets import held_sockets, listen_address, port_bridge
from par.units import UnitSpec
from tests.unit.core_env import CoreEnv

AGENT = "agent-a"
SOCKET = "par-agent@agent-a.socket"


def _spec(**changes: object) -> UnitSpec:
    spec = UnitSpec(name="par-agent@agent-a.service", description="d", argv=["/bin/true"])
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def test_rest_and_ui_are_held_a2a_is_not(core_env: CoreEnv) -> None:
    held = held_sockets(core_env.cfg, AGENT, {"rest": 8101, "a2a": 50101, "ui": 3101}, _spec())
    assert held.name == SOCKET and held.ports == (8101, 3101)
    assert held.props["Listen"] == [("Stream", "127.0.0.1:8101"), ("Stream", "127.0.0.1:3101")]
    assert held.props["ReusePort"] is True and held.tag in str(held.props["Description"])


def test_the_fingerprint_follows_both_units(core_env: CoreEnv) -> None:
    cfg = core_env.cfg
    tag = held_sockets(cfg, AGENT, {"rest": 8101}, _spec()).tag
    assert held_sockets(cfg, AGENT, {"rest": 8101}, _spec()).tag == tag
    assert held_sockets(cfg, AGENT, {"rest": 8102}, _spec()).tag != tag
    assert held_sockets(cfg, AGENT, {"rest": 8101}, _spec(description="e")).tag != tag


def test_listen_address_spelling() -> None:
    assert listen_address("127.0.0.1", 80) == "127.0.0.1:80"
    assert listen_address("::1", 80) == "[::1]:80"
    assert listen_address("", 80) == "0.0.0.0:80"


def test_the_bridge_holds_a_port_no_plain_bind_can_take() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with port_bridge({("127.0.0.1", port)}) as held:
        assert held == [port]
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("127.0.0.1", port))
            raise AssertionError("bound a bridged port")
        except OSError:
            pass
        finally:
            other.close()
    free = socket.socket()
    free.bind(("127.0.0.1", port))  # let go afterwards
    free.close()


def test_a_deploy_holds_its_ports_in_a_socket_unit(core_env: CoreEnv) -> None:
    e = core_env
    d = e.deployed()
    props = e.fake.sockets()[SOCKET]
    assert props["Listen"] == [("Stream", f"127.0.0.1:{d.ports['rest']}")]


def test_a_restart_keeps_the_socket_and_starts_the_same_service(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    before = e.fake.sockets()
    assert e.actions.act(AGENT, "restart").status == "healthy"
    assert e.fake.ops("start_socket", "stop_socket") == []  # the same socket throughout
    assert e.fake.sockets() == before


def test_a_redeploy_replaces_the_socket_on_the_same_ports(core_env: CoreEnv) -> None:
    e = core_env
    d1 = e.deployed()
    d2 = e.deploy("d2", e.package("p-2", "2.0.0"), version="2.0.0")
    assert d2.status == "healthy" and d2.ports == d1.ports
    # the socket goes before the service (parked: pard holds the port), so no
    # connection starts d1 again; then d2's socket and service
    assert e.fake.ops("stop", "stop_socket", "start_socket", "start") == [
        ("stop_socket", None), ("stop", "d1"), ("start_socket", "d2"), ("start", "d2")]
    assert e.core.parked.ports(AGENT) == []  # let go once d2's socket listened
    props = e.fake.sockets()[SOCKET]
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.spec.environment["DEPLOYMENT_ID"] == "d2"
    assert props["Listen"] == [("Stream", f"127.0.0.1:{d1.ports['rest']}")]


def test_stop_and_remove_release_the_ports(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    e.actions.act(AGENT, "stop")
    assert e.fake.sockets() == {} and e.fake.unit(AGENT) is None
    e.actions.act(AGENT, "start")
    assert SOCKET in e.fake.sockets()
    e.actions.remove(AGENT, purge=True)
    assert e.fake.sockets() == {} and e.fake.unit(AGENT) is None


def test_a_failed_first_deploy_leaves_no_socket(core_env: CoreEnv) -> None:
    e = core_env
    e.fake.script(AGENT, ("exit", 3))
    d = e.deploy("d1", e.package())
    assert d.status == "failed"
    assert e.fake.sockets() == {} and e.fake.unit(AGENT) is None


def test_a_failed_redeploy_rolls_back_behind_a_socket(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    e.fake.script(AGENT, ("exit", 3))
    d2 = e.deploy("d2", e.package("p-2", "2.0.0"), version="2.0.0")
    assert d2.status == "failed"
    unit = e.fake.unit(AGENT)
    assert unit is not None and unit.active_state == "active"
    assert unit.spec.environment["DEPLOYMENT_ID"] == "d1" and SOCKET in e.fake.sockets()
    assert e.core.parked.ports(AGENT) == []


def test_reconcile_releases_the_socket_of_a_stopped_agent(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    e.store.update("d1", desired_state="stopped", status="stopped")
    e.fake.stop("par-agent@agent-a.service", wait_s=1)  # pard died before the socket went
    assert SOCKET in e.fake.sockets()
    e.restart_pard()
    assert e.fake.sockets() == {} and e.fake.unit(AGENT) is None


def test_reconcile_restarts_a_dead_agent_behind_its_socket(core_env: CoreEnv) -> None:
    e = core_env
    e.deployed()
    e.fake.stop("par-agent@agent-a.service", wait_s=1)
    report = e.restart_pard()
    assert report.restarted == [AGENT]
    assert e.fake.ops("start_socket", "stop_socket") == []  # the same socket: started again
    assert agent_sockets.socket_name(AGENT) in e.fake.sockets()


def test_a_port_systemd_cannot_bind_fails_the_start_before_the_service_runs(
        core_env: CoreEnv) -> None:
    e = core_env
    e.fake.ports_in_use.add(e.cfg.ports.rest[0])  # another process has the agent's port
    d = e.deploy("d1", e.package())
    assert (d.status, d.error_code) == ("failed", "port_unavailable")
    assert d.error_message is not None and SOCKET in d.error_message
    assert e.fake.ops("start") == [] and e.fake.unit(AGENT) is None


def test_isolated_sockets_listen_on_the_agents_address_with_its_firewall(
        core_env: CoreEnv) -> None:
    """A socket made by a socket unit is filtered by the socket unit's IP access lists,
    not the service's: they must carry the service's (agents.isolate_loopback)."""
    from par import loopback
    from par.agent_unit import AgentLaunch, unit_spec
    from par.units import properties

    e = core_env
    cfg = dataclasses.replace(e.cfg, agents=dataclasses.replace(e.cfg.agents,
                                                                isolate_loopback=True))
    ports = {"rest": 8100, "ui": 3100}
    spec = unit_spec(cfg, AgentLaunch(
        agent_id=AGENT, deployment_id="d1", org_id="o", name="n", version="1",
        package_root=e.tmp, venv_path=e.tmp, ports=ports, entrypoint="m:f", rest_entry=None,
        a2a_service=None, ui_path=None, env={}), [])
    held = held_sockets(cfg, AGENT, ports, spec)
    address = loopback.agent_address(8100)
    assert held.props["Listen"] == [("Stream", f"{address}:8100"), ("Stream", f"{address}:3100")]
    service = properties(spec)
    assert held.props["IPAddressDeny"] == service[b"IPAddressDeny"]
    assert held.props["IPAddressAllow"] == service[b"IPAddressAllow"]
    # without isolation neither unit has an allow list
    plain = held_sockets(e.cfg, AGENT, ports, _spec())
    assert "IPAddressAllow" not in plain.props
