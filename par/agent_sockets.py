"""The listening sockets systemd holds for an agent: `par-agent@<id>.socket`.

Why: with the agent binding its own ports, a port was free for a moment at every
restart, and another agent looping on bind() took it (docs/security.md, attack 6);
SocketBindDeny= would stop that, but Debian 12's systemd is built without
BPF_FRAMEWORK and does not enforce it.  So PID 1 holds the REST (and UI) listening
sockets in a transient socket unit whose service is the agent's unit; the host
adopts them (LISTEN_FDS, par_agent_host.listen_fds).  The port is then never free
while the agent restarts, is killed and restarted by systemd, or is restarted by
pard, and connections meanwhile wait in the backlog instead of being refused.

How the two units live (every case measured on systemd 252):
- The socket and the service are made in one StartTransientUnit (the front door's
  `Systemd.start_socket`), then pard starts the service itself and waits for READY:
  never lazily on a first connection.
- An active socket pins its service: the stopped service stays loaded, and a
  transient unit of that name cannot be made again.  So the socket's Description
  carries a fingerprint of both units' properties: the same deployment starting
  again (restart, reconcile) starts the loaded service again; anything else (a
  redeploy, a rollback, new ports) replaces both.
- Replacing: pard binds each port the old and the new socket share with
  SO_REUSEPORT, without listening (`PortBridge`), stops the old socket and service,
  makes the new ones (their sockets have `ReusePort=yes`, so they bind next to the
  bridge), then lets go.  Only root can join a reuseport group root made, so no
  agent can bind the port at any moment; connections in that gap are refused (a
  bound socket that does not listen answers RST), which the front door retries.
- A listening socket whose service is down starts it on the next connection.  So
  when another deployment follows (a redeploy, after a failed start), the socket is
  stopped first and pard holds the ports with a bridge until the next socket listens
  (`park`); a restart of the same deployment keeps the socket (and its backlog).
- Stopping the agent for good (stop, remove, purge) stops the socket first (no
  connection can start the service again), then the service: the port is free.
- A2A is not held: the agent's own gRPC code binds it (grpc cannot adopt a socket).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from par import loopback
from par.config import Config
from par.errors import ParError
from par.log import event
from par.units import Systemd, UnitSpec, properties, socket_name

# The surfaces whose sockets systemd holds, in the order their fds are passed.
HELD_KINDS = ("rest", "ui")
# Connections that wait while the agent restarts (the kernel caps it at somaxconn).
BACKLOG = 4096
# How long systemd may take to bind a new socket unit's ports.
LISTEN_TIMEOUT_S = 10.0
# How long a replaced service may take to be forgotten by systemd (it is at once on 252).
UNLOAD_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HeldSockets:
    """The socket unit of one agent's launch: its name, ports and D-Bus properties."""

    name: str
    bind_address: str
    ports: tuple[int, ...]
    tag: str  # "[<fingerprint>]", in the Description
    props: dict[str, object]

    @property
    def addresses(self) -> set[tuple[str, int]]:
        """The (host, port) pairs the socket unit listens on."""
        return {(self.bind_address, port) for port in self.ports}


def listen_address(bind_address: str, port: int) -> str:
    """`Listen=` spelling of an address and port ("127.0.0.1:8101", "[::1]:8101")."""
    host = bind_address or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def held_sockets(cfg: Config, agent_id: str, ports: dict[str, int],
                 service: UnitSpec) -> HeldSockets:
    """The socket unit holding `ports`' REST and UI sockets for `service`, on the
    agent's address (its own with agents.isolate_loopback, par.loopback)."""
    bind = loopback.bind_address(cfg, ports)
    held = tuple(ports[k] for k in HELD_KINDS if k in ports)
    listen = [("Stream", listen_address(bind, port)) for port in held]
    service_props = properties(service)
    text = repr(sorted(service_props.items())) + repr(listen)
    tag = f"[{hashlib.sha256(text.encode()).hexdigest()[:12]}]"
    props: dict[str, object] = {
        "Description": f"PAR agent {agent_id} listening sockets {tag}",
        "Listen": listen,
        # the host tells its sockets apart by their ports; the name is for sd_listen_fds
        "FileDescriptorName": "par-agent",
        "Backlog": BACKLOG,
        # lets the next socket unit (and pard's bridge) bind the port while this one
        # still holds it; only root, which made it, can join (see the module doc)
        "ReusePort": True,
        "CollectMode": "inactive-or-failed",
    }
    # A socket made by a socket unit is filtered by the socket unit's IP access lists,
    # not the service's (systemd.resource-control(5)): without them, with
    # agents.isolate_loopback, any host process could reach the agent's held ports.
    for key in ("IPAddressAllow", "IPAddressDeny"):
        if key.encode() in service_props:
            props[key] = service_props[key.encode()]
    return HeldSockets(socket_name(agent_id), bind, held, tag, props)


Address = tuple[str, int]  # (host, port) as a socket unit listens on it


def _bind_bridge(addresses: set[Address],
                 logger: logging.Logger | None) -> list[socket.socket]:
    """Sockets bound (SO_REUSEPORT, not listening) to `addresses`; one that cannot be
    bound (something else has it) is logged and left out."""
    held: list[socket.socket] = []
    for host, port in sorted(addresses):
        host = host or "0.0.0.0"
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        try:
            # SO_REUSEPORT only: with SO_REUSEADDR too, a non-listening socket would let
            # another SO_REUSEADDR socket (any user's) bind next to it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if logger is not None:
                event(logger, "Port not bridged", logging.WARNING, address=host, port=port,
                      message=str(exc))
            continue
        held.append(sock)
    return held


@contextmanager
def port_bridge(addresses: set[Address],
                logger: logging.Logger | None = None) -> Iterator[list[int]]:
    """Hold `addresses` (bound with SO_REUSEPORT, not listening) while socket units are
    replaced: no other user's process can bind them meanwhile.  Yields the ports held."""
    held = _bind_bridge(addresses, logger)
    try:
        yield [s.getsockname()[1] for s in held]
    finally:
        _close(held)


def _close(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


class ParkedPorts:
    """The bridges pard holds for agents whose socket unit it stopped while a start is
    to follow (`park`).  One per pard (par.pipeline.Core); process memory: a pard that
    dies lets them go, and reconcile starts the agents again."""

    def __init__(self) -> None:
        self._bridges: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()

    def park(self, systemd: Systemd, agent_id: str, logger: logging.Logger | None = None,
             also: set[Address] | None = None) -> None:
        """Hold the agent's ports with a bridge and stop its socket unit, until the next
        `start` (or `release`).  Why: while a socket listens and its service is down,
        each connection starts the service again; a new version that failed to start
        would crash-loop on the callers' connections, an old one being replaced would
        boot again.  `also`: addresses to hold besides the socket's own (a socket that
        failed meanwhile, at its service's start limit, is gone)."""
        name = socket_name(agent_id)
        held = systemd.listen_addresses(name) | (also or set())
        if not held:
            return
        bridge = _bind_bridge(held, logger)
        with self._lock:
            _close(self._bridges.pop(agent_id, []))
            self._bridges[agent_id] = bridge
        systemd.stop_socket(name)

    def unpark(self, agent_id: str) -> None:
        """Let the agent's bridge go (its new socket listens, or its ports are released)."""
        with self._lock:
            _close(self._bridges.pop(agent_id, []))

    def close(self) -> None:
        """Let every bridge go (pard is stopping)."""
        with self._lock:
            for bridge in self._bridges.values():
                _close(bridge)
            self._bridges.clear()

    def ports(self, agent_id: str) -> list[int]:
        """The ports held for the agent while its socket unit is down."""
        with self._lock:
            return [s.getsockname()[1] for s in self._bridges.get(agent_id, [])]


def start(systemd: Systemd, spec: UnitSpec, held: HeldSockets, parked: ParkedPorts,
          logger: logging.Logger | None = None) -> None:
    """Start the agent's service behind its socket unit; returns once systemd queued the
    start (`Systemd.wait_active` for READY).  The caller has stopped the agent's service.

    Same units as the active socket's (its fingerprint): the loaded service is started
    again.  Otherwise both are replaced, the shared ports bridged meanwhile."""
    load, active, description = systemd.unit_state(held.name)
    if active == "active" and held.tag in description:
        # Also resets the start rate limit, which counts pard's starts of this loaded
        # unit too: a new transient unit started with a fresh one, and an operator's
        # sixth restart within a minute must not be refused (start-limit-hit).
        systemd.reset_failed(spec.name)
        # a connection since the stop may have started it already: then a no-op
        systemd.start_unit(spec.name)
        return
    old = systemd.listen_addresses(held.name) if load != "not-found" else set()
    with port_bridge({a for a in old if a[1] in held.ports}, logger):
        # the socket first: once it is down no connection can start the old service
        systemd.stop_socket(held.name)
        # normally stopped by the caller already; again, should a connection have
        # started it since
        st = systemd.status(spec.name)
        if st.active_state not in ("inactive", "failed"):
            st = systemd.stop(spec.name, wait_s=spec.timeout_stop_s + 10, current=st)
        if st.exists:
            systemd.reset_failed(spec.name)
            systemd.wait_unloaded(spec.name, UNLOAD_TIMEOUT_S)
        systemd.start_socket(held.name, held.props, spec)
        _wait_listening(systemd, held)
    parked.unpark(agent_of(held))  # the new socket listens: the parked bridge can go
    systemd.start_unit(spec.name)


def agent_of(held: HeldSockets) -> str:
    """The agent id of a socket unit name."""
    return held.name[len("par-agent@"):-len(".socket")]


def _wait_listening(systemd: Systemd, held: HeldSockets) -> None:
    """Wait for the socket unit's start job: a port another process holds fails it, and
    the service must not start then (it would bind the port itself, and fail)."""
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while True:
        load, active, _ = systemd.unit_state(held.name)
        if active == "active":
            return
        if load == "not-found" or active == "failed" or time.monotonic() > deadline:
            addresses = " ".join(f"{held.bind_address}:{port}" for port in held.ports)
            systemd.stop_socket(held.name)
            raise ParError("port_unavailable",
                           f"systemd could not listen on {addresses} for {held.name} (is "
                           f"another process using the port? journalctl -u {held.name})",
                           None, 500)
        time.sleep(0.01)


def release(systemd: Systemd, agent_id: str, parked: ParkedPorts) -> None:
    """Stop the agent's socket unit (and a parked bridge): its ports are free once the
    service stops too."""
    systemd.stop_socket(socket_name(agent_id))
    parked.unpark(agent_id)
