"""What keeps agents apart beyond the filesystem: ports, addresses, IPC, limits (pure logic).

`par.agent_unit` adds these to every agent's unit:
- `SocketBindAllow=` its own ports (TCP) and `SocketBindDeny=any`: an agent cannot
  bind another agent's port while that one restarts.  systemd enforces these with a
  BPF program only when it is built with `+BPF_FRAMEWORK` (Debian 12's 252 is not;
  see docs/security.md), so `bind_filter_enforced` says whether they bite here.
- `IPAddressDeny=` the addresses of `agents.ip_address_deny` (cloud metadata services);
  with `agents.isolate_loopback`, also 127.0.0.0/8 and ::1, and `IPAddressAllow=` the
  agent's own loopback address and the few others `par.loopback` names.
- A private `/dev/shm` (size-bounded tmpfs) and an empty read-only `/run/lock`
  (`PrivateIPC=yes` is set with the rest of the sandbox in par.units).
- Default `MemoryMax=`, `CPUQuota=` and `TasksMax=` when the deploy gives none.
- A journal rate limit (`LogRateLimitIntervalSec=`, `LogRateLimitBurst=`).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from par import loopback
from par.config import Config

IPPROTO_TCP = 6
# ("any" family, "any" protocol, 0 ports, port 0): systemd's spelling of `any`
BIND_ANY = (0, 0, 0, 0)


@dataclass(frozen=True)
class Limits:
    """The resource limits an agent's unit gets."""

    memory_max_bytes: int | None
    cpu_quota: float | None  # 1.0 = one CPU
    tasks_max: int


def limits(cfg: Config, memory_mb: int | None, cpu_units: int | None) -> Limits:
    """The deploy's `memoryMB` / `cpuUnits` (1024 = one CPU), else `agents.*` defaults."""
    agents = cfg.agents
    mem_mb = memory_mb or agents.memory_max_mb
    if cpu_units:
        quota: float | None = cpu_units / 1024
    elif agents.cpu_quota_percent:
        quota = agents.cpu_quota_percent / 100
    else:
        quota = None
    return Limits(memory_max_bytes=mem_mb * 1024 * 1024 if mem_mb else None,
                  cpu_quota=quota, tasks_max=agents.tasks_max)


def socket_bind_allow(ports: dict[str, int]) -> list[tuple[int, int, int, int]]:
    """One TCP entry (IPv4 and IPv6) per port the agent was given."""
    return [(0, IPPROTO_TCP, 1, port) for port in sorted(set(ports.values()))]


def ip_address_deny(networks: list[str]) -> list[tuple[int, bytes, int]]:
    """`IPAddressDeny=` (or `IPAddressAllow=`) entries (family, address bytes, prefix
    length) for `networks`."""
    out = []
    for text in networks:
        net = ipaddress.ip_network(text, strict=False)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        out.append((int(family), net.network_address.packed, net.prefixlen))
    return out


def private_tmpfs(cfg: Config) -> tuple[tuple[str, str], ...]:
    """`TemporaryFileSystem=` entries: the agent's own /dev/shm and an empty /run/lock."""
    shm = f"rw,nosuid,nodev,noexec,mode=1777,size={cfg.agents.shm_size_mb}m"
    return (("/dev/shm", shm), ("/run/lock", "ro"))


def network_properties(cfg: Config, ports: dict[str, int],
                       resolvers: list[str] | None = None) -> dict[str, object]:
    """The unit properties that restrict what the agent may bind and reach; `resolvers`:
    the loopback nameservers an isolated agent may still reach (par.loopback)."""
    props: dict[str, object] = {
        "SocketBindAllow": socket_bind_allow(ports),
        "SocketBindDeny": [BIND_ANY],
    }
    deny = list(cfg.agents.ip_address_deny)
    if cfg.agents.isolate_loopback:
        deny += [net for net in loopback.LOOPBACK_NETWORKS if net not in deny]
        # checked first by systemd: an allowed address passes whatever the deny list says
        props["IPAddressAllow"] = ip_address_deny(
            loopback.allowed_networks(cfg, ports, resolvers or []))
    if deny:
        props["IPAddressDeny"] = ip_address_deny(deny)
    return props


def journal_properties(cfg: Config) -> dict[str, object]:
    """A journal rate limit of the agent's own: a flooding agent loses its own lines,
    never the journal's room for the others' (journald counts per unit)."""
    return {"LogRateLimitIntervalUSec": cfg.agents.log_rate_limit_interval_s * 1_000_000,
            "LogRateLimitBurst": cfg.agents.log_rate_limit_burst}


def bind_filter_enforced(features: str) -> bool:
    """Whether systemd (its `Features` string, as `systemctl --version` prints it)
    enforces SocketBindAllow=/SocketBindDeny=."""
    return "+BPF_FRAMEWORK" in features.split()
