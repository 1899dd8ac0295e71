"""How each answer reads as text: the lines `render.show` prints without --json.

Each view takes the data the command would print under --json (plus what the
command knows besides, such as the ID it was given) and returns lines.
"""

from __future__ import annotations

import time
from pathlib import Path

from par.cli.progress import PHASE_LABELS
from par.cli.render import (
    ago,
    clock,
    format_bytes,
    format_duration,
    health_url,
    ports_text,
    table,
    unit_text,
)

# -- deploy -------------------------------------------------------------------


def deployed(record: dict) -> list[str]:
    """What a person needs after a healthy deploy: unit, ports, health URL, next step."""
    if record.get("status") != "healthy":
        return []  # the phases said it; the failure goes to stderr
    agent = record.get("agentAppId", "?")
    lines = [f"{agent} {record.get('version', '')} is running "
             f"(deployment {record.get('deploymentId')})"]
    lines.append(f"  unit:    {record.get('unit') or f'par-agent@{agent}.service'}")
    lines.append(f"  ports:   {ports_text(record.get('ports'))}")
    url = health_url(record)
    if url:
        lines.append(f"  health:  {url}")
    lines.append(f"  see:     systemctl status par-agent@{agent}")
    if record.get("frontUrl"):
        lines.append(f"  url:     {record['frontUrl']}")
    return lines


def deploy_failure(record: dict) -> str:
    """Why a followed deployment did not end healthy, in one line."""
    agent = record.get("agentAppId", "?")
    error = record.get("error") or {}
    message = error.get("message") if isinstance(error, dict) else None
    if record.get("status") == "failed":
        return f"deploy of {agent} failed: {message or 'no reason given (see parctl status)'}"
    return f"deployment {record.get('deploymentId')} of {agent} is {record.get('status')}" + (
        f": {message}" if message else "")


# -- looking at agents ----------------------------------------------------------


def agents(data: dict) -> list[str]:
    """`parctl list`: one row per agent."""
    found = data.get("agents") or []
    if not found:
        return ["no agents deployed (parctl deploy PATH deploys one)"]
    now = time.time()
    rows = []
    for agent in found:
        record = agent.get("deployment") or {}
        unit = agent.get("unit") or {}
        resources = agent.get("resources") or {}
        running = unit.get("activeState") == "active"
        status = agent.get("status") or record.get("status", "-")
        if not record.get("current"):
            status += " (not current)"
        rows.append([
            agent.get("agentAppId", record.get("agentAppId", "?")),
            record.get("version", "-"),
            status,
            ports_text(record.get("ports"), sep=" "),
            format_duration(now - unit["since"]) if running and unit.get("since") else "-",
            format_bytes(resources.get("rssBytes")),
            unit.get("nRestarts", "-"),
        ])
    return [table(["ID", "VERSION", "STATUS", "PORTS", "UPTIME", "MEMORY", "RESTARTS"], rows)]


def deployments(data: dict, agent: str | None) -> list[str]:
    """`parctl deployments`: one row per deployment, with why it failed."""
    records = data.get("deployments") or []
    if not records:
        return [f"no deployments of {agent}" if agent else "no deployments"]
    rows = []
    for r in records:
        error = r.get("error") or {}
        note = (f"{error.get('code')}: {error.get('message', '')}" if error
                else "current" if r.get("current") else "")
        if len(note) > 70:
            note = note[:67] + "..."  # `parctl status ID` shows all of it
        rows.append([r.get("deploymentId", "?"), r.get("agentAppId", "?"), r.get("version", "-"),
                     r.get("status", "-"), clock(r.get("createdAt")), note])
    return [table(["DEPLOYMENT", "AGENT", "VERSION", "STATUS", "CREATED", "NOTE"], rows)]


def status(data: dict, live: str | None, n_events: int) -> list[str]:
    """`parctl status`: the deployment, its unit, venv, ports, phases and recent events.

    `data` is the --json answer: `deployment`, `health` and `events` (a list, or
    `{"error": ...}` when they could not be read); `live` the status to show.
    """
    record, health, events = data["deployment"], data["health"], data["events"]
    agent = record.get("agentAppId", "?")
    flags = " (current)" if record.get("current") else ""
    lines = [f"{agent} {record.get('version', '')}: {live}{flags}",
             f"  deployment: {record['deploymentId']}   "
             f"desired: {record.get('desiredState', '-')}"]
    unit_state = (f"error: {health['error']['message']}" if "error" in health
                  else unit_text(health.get("details")))
    lines.append(f"  unit:       {record.get('unit') or '-'}  {unit_state}")
    venv = record.get("venv") or "-"
    lines.append(f"  venv:       {venv}{' (reused)' if record.get('venvReused') else ''}")
    lines.append(f"  ports:      {ports_text(record.get('ports'))}")
    if record.get("frontUrl"):
        lines.append(f"  url:        {record['frontUrl']}")
    if health_url(record):
        lines.append(f"  health:     {health_url(record)}")
    phases = record.get("phases") or {}
    # named as `parctl deploy` names them while they run (loading: "building venv")
    timing = [f"{PHASE_LABELS.get(name, name)} {p['seconds']:.1f}s" for name, p in phases.items()
              if isinstance(p, dict) and isinstance(p.get("seconds"), int | float)]
    if timing:
        lines.append(f"  phases:     {', '.join(timing)}")
    lines.append(f"  created:    {clock(record.get('createdAt'))}   "
                 f"updated: {clock(record.get('updatedAt'))}")
    error = record.get("error")
    if isinstance(error, dict) and error.get("message"):
        lines.append(f"  error:      {error['message']}")
    if n_events:
        if isinstance(events, dict) and "error" in events:
            lines.append(f"events: {events['error']['message']}")
        else:
            lines.append(f"events (last {n_events}):")
            for event in events if isinstance(events, list) else []:
                message = event.get("message")
                name = event.get("event", "")
                text = f"{name}: {message}" if message and message != name else name
                lines.append(f"  {clock(event.get('ts'))}  {text}")
    return lines


def health(data: dict, record: dict, ident: str) -> list[str]:
    """`parctl health`: healthy or why not, the unit, the surfaces and ports."""
    word = ("healthy" if data.get("healthy")
            else f"unhealthy (deployment {data.get('status', '-')})")
    lines = [f"{record.get('agentAppId', ident)}: {word}"]
    if data.get("message"):
        lines.append(f"  message:  {data['message']}")
    lines.append(f"  unit:     {unit_text(data.get('details'))}")
    surfaces = data.get("surfaces")
    if isinstance(surfaces, dict) and surfaces:
        shown = ", ".join(f"{k} {'ok' if v is True else v}" for k, v in surfaces.items())
        lines.append(f"  surfaces: {shown}")
    lines.append(f"  ports:    {ports_text(data.get('ports') or record.get('ports'))}")
    return lines


# -- acting on agents -------------------------------------------------------------


def acted(record: dict, verb: str, ident: str) -> list[str]:
    """`parctl stop|start|restart`: the agent's status and unit afterwards."""
    return [f"{verb} {record.get('agentAppId', ident)}: {record.get('status')} "
            f"({record.get('unit') or 'no unit'})"]


def removed(data: dict, ident: str, purge: bool) -> list[str]:
    """`parctl rm`: which deployment went, and which files with --purge."""
    verb = "already removed" if data.get("alreadyRemoved") else "removed"
    lines = [f"{verb} {data.get('agentAppId', ident)} (deployment {data.get('deleted')})"]
    lines += [f"  deleted {path}" for path in data.get("purged") or []]
    if not purge:
        lines.append("  package and venv kept (parctl rm --purge deletes them)")
    return lines


# -- venvs, installer, pack, version ------------------------------------------------


def venvs(data: dict) -> list[str]:
    """`parctl venv list`: one row per venv."""
    found = data.get("venvs") or []
    if not found:
        return ["no venvs"]
    now = time.time()
    rows = [[v.get("name", "?"), format_bytes(v.get("sizeBytes")), _packages(v),
             ago(v.get("lastUsed"), now), ", ".join(v.get("inUseBy") or []) or "-"]
            for v in found]
    lines = [table(["NAME", "SIZE", "PACKAGES", "LAST USED", "IN USE BY"], rows)]
    if any((v.get("layerShared") or 0) > 1 for v in found):
        lines.append("SIZE includes the installed packages, which venvs of the same "
                     "requirements share (counted once on disk).")
    return lines


def _packages(venv: dict) -> str:
    """Whether the venv's installed packages are its own or shared with other venvs."""
    shared = venv.get("layerShared") or 0
    return f"shared by {shared}" if shared > 1 else "own"


def pruned(data: dict) -> list[str]:
    """`parctl venv prune`: how many venvs went, and which."""
    evicted = data.get("evicted") or []
    return [f"evicted {len(evicted)} venv{'s' if len(evicted) != 1 else ''}",
            *(f"  {name}" for name in evicted)]


def prewarmed(data: dict, requirements: Path) -> list[str]:
    """`parctl venv prewarm`: done, and how long it took."""
    seconds = data.get("seconds")
    took = f" in {seconds:.1f}s" if isinstance(seconds, int | float) else ""
    return [f"prewarmed {requirements}{took}"]


def uv_installed(data: dict) -> list[str]:
    """`parctl installer install-uv`: which uv, where."""
    return [f"uv {data.get('version', '?')} installed at {data.get('path', '?')}"]


def packed(data: dict, folder: Path) -> list[str]:
    """`parctl pack`: the package written, its size and digest."""
    return [f"packed {folder} -> {data['path']} ({format_bytes(data['sizeBytes'])}, "
            f"sha256 {data['sha256']})"]


def versions(data: dict, problem: str | None) -> list[str]:
    """`parctl version`: parctl's, and pard's or why it is unknown."""
    pard = data.get("pard")
    return [f"parctl {data['parctl']}", f"pard {pard}" if pard else f"pard: unknown ({problem})"]
