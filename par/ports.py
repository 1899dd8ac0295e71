"""REST, A2A and UI port allocation for agents.

A deployment gets a port for each surface it declares (REST always: the host
serves /health there).  It keeps its ports for life (restarts of the agent or
of `pard` reuse them, since they are stored with it); a new deployment of the
same agent takes over the current one's ports, and gets one for a surface it
adds.  Ports are never shared between agents, and a
port is checked free by binding it before it is handed out.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from par.config import Ports
from par.errors import ParError

KINDS = ("rest", "a2a", "ui")


def port_is_free(address: str, port: int) -> bool:
    """True when nothing listens on (address, port) right now."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def allocate(
    cfg: Ports,
    *,
    requested: dict[str, int],
    taken: Iterable[int],
    inherit: dict[str, int] | None = None,
    kinds: Iterable[str] = KINDS,
) -> dict[str, int]:
    """Ports for a new deployment, one per surface in `kinds` (those it declares).

    requested: ports the deploy request names (must be free and not taken);
               those of surfaces not in `kinds` are not allocated.
    taken: ports other agents' deployments hold.
    inherit: the same agent's current ports, reused when not requested otherwise
             (they are bound by the running agent, so no bind check for them).
    """
    taken_set = set(taken)
    inherit = inherit or {}
    out: dict[str, int] = {}
    wanted = set(kinds)
    for kind in (k for k in KINDS if k in wanted):
        field = f"surfaces.ports.{kind}"
        if kind in requested:
            port = requested[kind]
            own = inherit.get(kind) == port
            if port in taken_set or port in out.values():
                raise ParError("port_in_use", f"port {port} is already used by another agent",
                               field, 409)
            if not own and not port_is_free(cfg.bind_address, port):
                raise ParError("port_in_use", f"port {port} is in use on {cfg.bind_address}",
                               field, 409)
            out[kind] = port
        elif (kind in inherit and inherit[kind] not in taken_set
              and inherit[kind] not in out.values()):
            out[kind] = inherit[kind]
        else:
            avoid = taken_set | set(out.values()) | set(inherit.values())
            out[kind] = _first_free(cfg, kind, avoid)
    return out


def _first_free(cfg: Ports, kind: str, avoid: set[int]) -> int:
    low, high = getattr(cfg, kind)
    for port in range(low, high + 1):
        if port not in avoid and port_is_free(cfg.bind_address, port):
            return port
    raise ParError("ports_exhausted",
                   f"no free {kind} port left in {low}-{high} (ports.{kind} in par.yaml)",
                   None, 503)
