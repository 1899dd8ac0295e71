"""Loopback isolation (`agents.isolate_loopback`): agents reach no other agent, nor pard's
TCP API, nor anything else on 127.0.0.0/8 and ::1; the front door still reaches them all.

The only firewall systemd 252 has without `+BPF_FRAMEWORK` is `IPAddressAllow=` /
`IPAddressDeny=` (a cgroup skb program): it checks the *destination* of what the unit
sends and the *source* of what it receives, by address only (no ports).  So:

- every agent listens on a loopback address of its own, `agent_address(rest port)`
  (127.A.B.1, A.B = the REST port, which no two agents share), given as
  `PAR_BIND_ADDRESS`.  It could not probe itself on 127.0.0.1 otherwise (the host
  sends READY=1 once its surfaces answer a real connection);
- its unit denies `127.0.0.0/8` and `::1/128` and allows its own address, the
  front door's source address (`front.source_address`), the loopback resolvers
  `/etc/resolv.conf` names (systemd-resolved's 127.0.0.53) and `agents.loopback_allow`;
- the front door, and pard's health check, connect to an agent from
  `front.source_address` (bound before connect), which its unit accepts.

Agent A's connection to B's address is dropped at A's egress (B's address is not in
A's allow list), whatever source A binds.  docs/security.md lists what stays open.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the front door imports this module for `agent_address` alone
    from par.config import Config

RESOLV_CONF = Path("/etc/resolv.conf")
# What the agents' units deny with isolation on ("localhost" in systemd's words).
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
# Shared by every host process: a resolver there cannot be allowed without letting agents
# reach pard's TCP API and every other service on 127.0.0.1.
SHARED_LOOPBACK = frozenset({"127.0.0.1", "::1"})


def agent_address(rest_port: int) -> str:
    """The loopback address of the agent whose REST port is `rest_port`: 127.A.B.1 with
    A.B the port's two bytes.  REST ports are >= 1024 (par.config), so A >= 4: never
    127.0.0.x, where 127.0.0.1, the front door's source address and resolvers live."""
    if not 1024 <= rest_port <= 65535:
        raise ValueError(f"REST port {rest_port} outside 1024-65535")
    return f"127.{rest_port >> 8}.{rest_port & 0xFF}.1"


def is_agent_address(address: str) -> bool:
    """Whether `address` is one `agent_address` can give (127.A.B.1 with A >= 4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    packed = ip.packed
    return ip.version == 4 and packed[0] == 127 and packed[1] >= 4 and packed[3] == 1


def bind_address(cfg: Config, ports: dict[str, int]) -> str:
    """Where the agent with `ports` listens (`PAR_BIND_ADDRESS`), and where pard and the
    front door reach it."""
    if cfg.agents.isolate_loopback and "rest" in ports:
        return agent_address(ports["rest"])
    return cfg.ports.bind_address


def connect_host(cfg: Config, ports: dict[str, int]) -> str:
    """The address to connect to for an agent with `ports` (a wildcard bind means loopback)."""
    bind = bind_address(cfg, ports)
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)


def source_address(cfg: Config) -> str | None:
    """The address pard and the front door connect to agents from; None without isolation
    (the kernel's choice, 127.0.0.1, as before)."""
    return cfg.front.source_address if cfg.agents.isolate_loopback else None


def loopback_resolvers(resolv_conf: str) -> tuple[list[str], list[str]]:
    """The loopback `nameserver`s of a resolv.conf text: (allowed, refused).  127.0.0.1 and
    ::1 are refused (allowing them opens every service there to agents); so is an address
    of the agents' own range."""
    allowed: list[str] = []
    refused: list[str] = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            ip = ipaddress.ip_address(words[1].split("%", 1)[0])
        except ValueError:
            continue
        if not ip.is_loopback:
            continue  # reached over the network: not affected by the loopback deny
        text = str(ip)
        if text in SHARED_LOOPBACK or is_agent_address(text):
            refused.append(text)
        elif text not in allowed:
            allowed.append(text)
    return allowed, refused


def read_resolvers(path: Path = RESOLV_CONF) -> tuple[list[str], list[str]]:
    """`loopback_resolvers` of the host's resolv.conf (none when it cannot be read)."""
    try:
        return loopback_resolvers(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return [], []


def allowed_networks(cfg: Config, ports: dict[str, int], resolvers: list[str]) -> list[str]:
    """What an isolated agent's `IPAddressAllow=` lists: its own address, the front door's
    source address, the loopback resolvers and `agents.loopback_allow`."""
    out = [f"{bind_address(cfg, ports)}/32", f"{cfg.front.source_address}/32"]
    out += [f"{r}/{32 if ':' not in r else 128}" for r in resolvers]
    out += list(cfg.agents.loopback_allow)
    return list(dict.fromkeys(out))  # once each, in order
