"""How an agent deployment becomes a `par-agent@<id>.service` UnitSpec (pure logic).

The unit runs `<venv>/bin/python -m par_agent_host` with `PYTHONPATH` set to
a folder holding only the host, so the agent's venv sees none of PAR's own
dependencies.  The host reads the agent spec JSON written next to the
extracted package (`par-agent.json`).

The agent's own variables (request env, package .env, manifest environment) are
secrets more often than not, and a unit's `Environment=` is readable by every
local user (`systemctl show`, /run/systemd/transient/).  So `Environment=` holds
PAR's variables only; the agent's go to a root-only file named by
`EnvironmentFile=`, which PID 1 reads as root when it starts the agent.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from par import agent_isolation, layout, loopback
from par.agent_host.par_agent_host import exitcodes
from par.agent_state import state_directory
from par.config import Config
from par.fsutil import write_if_changed
from par.host_files import HOST_SOURCE
from par.units import UnitSpec, unit_name

SPEC_FILENAME = "par-agent.json"
# The host's permanent failures: restarting cannot fix them, so systemd must not
# burn the start limit on them.  (The host's own module: it imports nothing of PAR.)
HOST_PERMANENT_EXIT = exitcodes.PERMANENT
EXIT_MEANING = {
    **exitcodes.MEANING,
    # systemd's own exit statuses (set up before the agent's code runs)
    200: "systemd could not change to the working directory",
    203: "systemd could not execute the venv's python",
    217: "systemd could not set up the agent's dynamic user",
    226: "systemd could not set up the agent's mount namespace",
}


@dataclass(frozen=True)
class AgentLaunch:
    """What the deployer knows when it starts an agent."""

    agent_id: str
    deployment_id: str
    org_id: str
    name: str
    version: str
    package_root: Path
    venv_path: Path
    ports: dict[str, int]
    entrypoint: str
    rest_entry: str | None
    a2a_service: str | None
    ui_path: str | None
    env: dict[str, str]  # package .env + manifest environment + request env, merged
    memory_mb: int | None = None
    cpu_units: int | None = None
    stop_timeout_s: int | None = None
    # The folder put on the agent's PYTHONPATH, holding `par_agent_host` alone: pard
    # passes its compiled copy (par/host_files.py); the source tree is for other callers.
    host_dir: Path = HOST_SOURCE
    # The shared layer the venv's site-packages links (par/venvs.py), bound like the venv.
    layer_path: Path | None = None


def dynamic_user_name(agent_id: str) -> str:
    """A valid, unique user name (≤ 31 chars) per agent.

    systemd gives every instance of `DynamicUser=` without `User=` the same
    user, which would let agents read each other's files.
    """
    name = f"par-{agent_id}"
    if len(name) <= 31:
        return name
    digest = hashlib.sha256(agent_id.encode()).hexdigest()[:8]
    return f"par-{agent_id[:18]}-{digest}"


def spec_path(package_root: Path) -> Path:
    return package_root / SPEC_FILENAME


def write_host_spec(launch: AgentLaunch) -> Path:
    """Write the JSON spec the host reads (atomic; readable by the agent's user)."""
    spec = {
        "name": launch.name,
        "version": launch.version,
        "package_root": str(launch.package_root),
        "entrypoint": launch.entrypoint,
        "rest_entry": launch.rest_entry,
        "a2a_service": launch.a2a_service,
        "ui_path": launch.ui_path,
    }
    path = spec_path(launch.package_root)
    write_if_changed(path, (json.dumps(spec, indent=2) + "\n").encode(), mode=0o644)
    return path


def env_file_path(cfg: Config, agent_id: str) -> Path:
    """The root-only file holding the agent's own variables (`EnvironmentFile=`)."""
    return layout.env_file(cfg, agent_id)


def _env_file_value(value: str) -> str:
    # systemd's EnvironmentFile= syntax: inside double quotes, backslash escapes
    # exactly these four; anything else (newlines too) is taken as written.
    for ch in ("\\", '"', "`", "$"):
        value = value.replace(ch, "\\" + ch)
    return f'"{value}"'


def env_file_text(cfg: Config, launch: AgentLaunch) -> str:
    """The agent's own variables, minus those PAR sets (PAR's win: a file's would override)."""
    own = par_environment(cfg, launch)
    return "".join(f"{key}={_env_file_value(value)}\n"
                   for key, value in sorted(launch.env.items()) if key not in own)


def write_env_file(cfg: Config, launch: AgentLaunch) -> Path:
    """Write the agent's `EnvironmentFile=` (mode 0600 in a 0700 folder; atomic)."""
    path = env_file_path(cfg, launch.agent_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    write_if_changed(path, env_file_text(cfg, launch).encode(), mode=0o600)
    return path


def environment(cfg: Config, launch: AgentLaunch) -> dict[str, str]:
    """The agent's environment: its own variables first, PAR's on top (which the agent's
    cannot override)."""
    env = dict(launch.env)
    env.update(par_environment(cfg, launch))
    return env


def effective_stop_timeout(cfg: Config, requested: int | None) -> int:
    """Seconds between SIGTERM and SIGKILL: the deploy's `stopTimeoutSec`, else
    `agents.stop_timeout_s`."""
    return requested or cfg.agents.stop_timeout_s


def par_environment(cfg: Config, launch: AgentLaunch) -> dict[str, str]:
    """The variables PAR sets for every agent (its unit's `Environment=`; no secrets)."""
    stop_timeout = effective_stop_timeout(cfg, launch.stop_timeout_s)
    return {
        "AGENT_APP_ID": launch.agent_id,
        "DEPLOYMENT_ID": launch.deployment_id,
        "ORG_ID": launch.org_id,
        # one port per declared surface (par.ports): no A2A_PORT for an agent without A2A
        **{f"{kind.upper()}_PORT": str(port) for kind, port in sorted(launch.ports.items())},
        "AGENT_PACKAGE_PATH": str(launch.package_root),
        "AGENT_VENV_PATH": str(launch.venv_path),
        "BASE_PATH": f"/agents/{launch.agent_id}",
        "MULTIPLEXED": "false",
        # its own loopback address with agents.isolate_loopback (par.loopback)
        "PAR_BIND_ADDRESS": loopback.bind_address(cfg, launch.ports),
        "PAR_AGENT_SPEC": str(spec_path(launch.package_root)),
        "PYTHONPATH": str(launch.host_dir),
        "PYTHONUNBUFFERED": "1",
        # the venv is read-only to the agent; bytecode was compiled at build time
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": f"/var/lib/{state_directory(launch.agent_id, launch.org_id)}",
        # the host drains before systemd's SIGKILL and gives up before its start timeout
        "PAR_STOP_TIMEOUT": str(max(1, stop_timeout - 2)),
        "PAR_READY_TIMEOUT": str(max(5, cfg.agents.boot_timeout_s - 5)),
    }


def unit_spec(cfg: Config, launch: AgentLaunch,
              resolvers: list[str] | None = None) -> UnitSpec:
    """The transient unit for `launch`, sandboxed per docs/security.md; `resolvers`: the
    loopback nameservers an agent keeps with `agents.isolate_loopback` (par.loopback)."""
    stop_timeout = effective_stop_timeout(cfg, launch.stop_timeout_s)
    state = cfg.paths.state_dir
    limits = agent_isolation.limits(cfg, launch.memory_mb, launch.cpu_units)
    return UnitSpec(
        name=unit_name(launch.agent_id),
        description=f"PAR agent {launch.name} {launch.version} (deployment {launch.deployment_id})",
        argv=[str(launch.venv_path / "bin" / "python"), "-m", "par_agent_host"],
        environment=par_environment(cfg, launch),
        environment_files=(str(env_file_path(cfg, launch.agent_id)),),
        working_directory=str(launch.package_root),
        notify=True,
        timeout_start_s=cfg.agents.boot_timeout_s,
        timeout_stop_s=stop_timeout,
        restart="on-failure",
        restart_sec=cfg.agents.restart_sec,
        start_limit_burst=cfg.agents.start_limit_burst,
        start_limit_interval_s=cfg.agents.start_limit_interval_s,
        restart_prevent_exit_status=HOST_PERMANENT_EXIT,
        log_fields={"PAR_AGENT_APP_ID": launch.agent_id, "PAR_DEPLOYMENT_ID": launch.deployment_id},
        syslog_identifier=f"par-agent-{launch.agent_id}",
        memory_max_bytes=limits.memory_max_bytes,
        cpu_quota=limits.cpu_quota,
        tasks_max=limits.tasks_max,
        dynamic_user=dynamic_user_name(launch.agent_id),
        state_directory=state_directory(launch.agent_id, launch.org_id),
        # The agent sees PAR's state and cache as empty read-only folders, except
        # its own package, venv (and the layer it links) and the host, bound back read-only.
        hide_paths=(str(state), str(cfg.paths.cache_dir)),
        tmpfs=agent_isolation.private_tmpfs(cfg),
        # The host too: wherever PAR is installed (a checkout under /tmp, say), the
        # agent's private /tmp or hidden folders must not hide it.
        read_only_binds=(str(launch.package_root), str(launch.venv_path), str(launch.host_dir),
                         *([str(launch.layer_path)] if launch.layer_path else [])),
        inaccessible_paths=("-/etc/par",),  # "-": fine when it does not exist
        extra={**agent_isolation.network_properties(cfg, launch.ports, resolvers),
               **agent_isolation.journal_properties(cfg)},
    )
