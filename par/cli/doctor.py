"""`parctl doctor`: checks of the host, each `ok`, `warn` or `fail` with what to do.

The checks work without pard (it is one of the things checked); when pard
answers, what it reports (its installer) is preferred to looking again here.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from par import agent_state, disk_reserve, procs
from par.cli.app import App
from par.cli.render import format_bytes
from par.client import Client, DaemonUnreachable
from par.config import Config, ConfigError
from par.config import load as load_config
from par.errors import ParError


@dataclass(frozen=True)
class Check:
    """One doctor finding: `ok`, `warn` or `fail`, with what to do about it."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        """`fail  pard: ... -> systemctl start par`: the text form."""
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.status:<4}  {self.name}: {self.detail}{fix}"

    def to_dict(self) -> dict:
        """The --json form."""
        return {"check": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def run_checks(app: App) -> list[Check]:
    """Every check, in the order `parctl doctor` prints them."""
    cfg = app.config()
    pard, health = check_pard(app.client())
    return [
        check_systemd(),
        pard,
        check_config(app.config_path),
        check_dir("state dir", cfg.paths.state_dir),
        check_dir("cache dir", cfg.paths.cache_dir),
        check_installer(cfg, health),
        check_disk(cfg),
        check_disk_reserve(cfg),
        check_python(cfg),
    ]


def report(checks: list[Check]) -> dict:
    """The --json answer: `ok` (no check failed) and every check."""
    return {"ok": all(c.status != "fail" for c in checks), "checks": [c.to_dict() for c in checks]}


def check_systemd() -> Check:
    """systemd is PID 1 and the system is running (not degraded)."""
    if not Path("/run/systemd/system").is_dir():
        return Check("systemd", "fail", "systemd is not running as the init system",
                     "PAR needs a host booted with systemd")
    result = procs.run(["systemctl", "is-system-running"], timeout=10)
    state = result.output.strip() or f"exit {result.returncode}"
    if state == "running":
        return Check("systemd", "ok", "running")
    if state in ("degraded", "starting", "initializing"):
        return Check("systemd", "warn", state, "systemctl --failed lists the failed units")
    return Check("systemd", "fail", f"systemctl is-system-running: {state}",
                 "check `systemctl status`")


def check_pard(client: Client) -> tuple[Check, dict | None]:
    """pard answers on its socket; also its health answer, for the checks after it."""
    try:
        data = client.daemon_health()
    except DaemonUnreachable as err:
        # the message ends with its own hint; the check line puts the fix after "->"
        detail = err.message.split(": start it")[0]
        return Check("pard", "fail", detail, "systemctl start par"), None
    except ParError as err:
        return Check("pard", "fail", f"answers with an error: {err.message}",
                     "journalctl -u par shows why"), None
    agents = data.get("agents") or {}
    counts = ", ".join(f"{n} {s}" for s, n in agents.items()) if isinstance(agents, dict) else ""
    detail = f"version {data.get('version', '?')}, answering on {client.socket_path}"
    return Check("pard", "ok" if data.get("ok", True) else "warn",
                 detail + (f" (agents: {counts})" if counts else "")), data


def check_config(path: Path) -> Check:
    """The config file is valid (pard refuses to start otherwise)."""
    try:
        load_config(path)
    except ConfigError as err:
        return Check("config", "fail", err.message, f"fix {path}; pard refuses to start with it")
    if not path.exists():
        return Check("config", "warn", f"{path} not found, defaults in use",
                     "reinstall the par package to get the commented default")
    return Check("config", "ok", f"{path} is valid")


def check_dir(label: str, path: Path) -> Check:
    """A directory pard keeps state in exists, is root's and is not world-writable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check(label, "fail", f"{path} does not exist", "systemctl start par creates it")
    except OSError as exc:
        return Check(label, "fail", f"{path}: {exc.strerror}")
    if not path.is_dir():
        return Check(label, "fail", f"{path} is not a directory",
                     "move it away; pard needs a directory")
    mode = st.st_mode & 0o777
    if mode & 0o002:
        return Check(label, "fail", f"{path} is world-writable ({mode:04o})", f"chmod o-w {path}")
    if st.st_uid != 0:
        return Check(label, "warn", f"{path} is owned by uid {st.st_uid}, not root",
                     f"chown root: {path}")
    return Check(label, "ok", f"{path} ({mode:04o}, root)")


def check_installer(cfg: Config, health: dict | None) -> Check:
    """uv (or pip, slower) is there to build venvs: as pard reports it, else looked for here."""
    info = (health or {}).get("installer")
    if isinstance(info, dict) and info:
        kind = info.get("kind") or info.get("name") or "?"
        detail = " ".join(str(p) for p in (kind, info.get("version")) if p)
        if info.get("path"):
            detail += f" ({info['path']})"
        if info.get("error"):
            return Check("installer", "fail", f"{detail}: {info['error']}",
                         "parctl installer install-uv")
        if kind == "pip" and info.get("configured") != "pip":
            why = info.get("reason") or "uv not found"
            return Check("installer", "warn", f"{detail}; {why}; venv builds are slower",
                         "parctl installer install-uv")
        return Check("installer", "ok", f"{detail} (reported by pard)")
    # pard is not answering: look for the installer the way pard would.
    uv: Path | None
    try:
        from par.installers import find_uv

        uv = find_uv(cfg)
    except ImportError:
        found = shutil.which("uv")
        uv = Path(found) if found else None
    if uv is not None:
        result = procs.run([str(uv), "--version"], timeout=10)
        if result.ok:
            return Check("installer", "ok", f"{result.output.strip()} ({uv})")
        return Check("installer", "fail", f"{uv} does not run: {result.tail(1)}",
                     "parctl installer install-uv")
    if cfg.installer.kind == "uv":
        return Check("installer", "fail", "installer.kind is uv but no uv binary was found",
                     "parctl installer install-uv")
    python = str(cfg.installer.python)
    result = procs.run([python, "-I", "-c", "import ensurepip, venv; print(ensurepip.version())"],
                       timeout=10)
    if result.ok:
        return Check("installer", "warn",
                     f"uv not found; pip {result.output.strip()} will build venvs (slower)",
                     "parctl installer install-uv")
    return Check("installer", "fail", f"neither uv nor {python} -m venv with pip is available",
                 "apt install python3-venv, or parctl installer install-uv")


def check_disk(cfg: Config) -> Check:
    """Free space where the state lives, against `venvs.min_free_bytes`."""
    path = cfg.paths.state_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    detail = f"{format_bytes(usage.free)} free of {format_bytes(usage.total)} on {path}"
    floor = cfg.venvs.min_free_bytes
    if usage.free < floor:
        return Check("disk", "fail",
                     f"{detail}, below venvs.min_free_bytes ({format_bytes(floor)})",
                     "free space or run parctl venv prune")
    if usage.free < 2 * floor:
        return Check("disk", "warn",
                     f"{detail}, close to venvs.min_free_bytes ({format_bytes(floor)})",
                     "parctl venv prune")
    return Check("disk", "ok", detail)


def check_disk_reserve(cfg: Config, var_lib: Path = agent_state.VAR_LIB,
                       mountinfo: Path = disk_reserve.MOUNTINFO) -> Check:
    """Whether an agent filling its state folder still leaves pard room to write
    (par.disk_reserve; docs/security.md, attack 10)."""
    found = disk_reserve.examine(cfg.paths.state_dir, var_lib / "private" / agent_state.TOP,
                                 mountinfo)
    return Check("disk reserve", "ok" if found.ok else "warn", found.detail, found.fix)


def check_python(cfg: Config) -> Check:
    """The base Python venvs are made from runs; which other python3.X are installed."""
    base = cfg.installer.python
    result = procs.run([str(base), "--version"], timeout=10)
    if not result.ok:
        return Check("python", "fail", f"{base} does not run: {result.tail(1)}",
                     "apt install python3, or set installer.python")
    others = sorted({p.name for d in (Path("/usr/bin"), Path("/usr/local/bin"))
                     for p in d.glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name)})
    detail = f"{base} is {result.output.strip()}"
    also = f"; also installed: {', '.join(others)}" if others else ""
    return Check("python", "ok", detail + also)
