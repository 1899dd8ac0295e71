"""`parctl`: the command line people use on the VM to deploy and look after agents.

Each click command is thin: it parses, calls `pard` through `par.client`, and
renders text or (`--json`) the API's JSON unchanged.  One handler on the group
turns a `ParError` into one line on stderr and an exit code; nothing else
reaches the user as a traceback (PARCTL_DEBUG=1 shows it).  `logs` and `pack`
work without `pard`; `doctor` reports on it rather than needing it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import yaml

from par import __version__, ids, procs
from par.client import DEFAULT_SOCKET, ApiError, Client, DaemonUnreachable
from par.config import DEFAULT_CONFIG_PATH, Config, ConfigError
from par.config import load as load_config
from par.errors import ParError
from par.store import STATUSES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # click's own code for usage errors
EXIT_NOT_FOUND = 3
EXIT_NOT_RUNNING = 3  # systemctl status: the unit is not running
EXIT_UNREACHABLE = 4

MANIFEST_NAME = "agent.yaml"
# agent.yaml is a few hundred bytes; refuse to inflate a huge entry from an archive.
MAX_MANIFEST_BYTES = 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")

# Deploy phases in the order pard runs them, and how parctl names them.
PHASES = ("downloading", "loading", "starting")
PHASE_LABELS = {
    "pending": "waiting for a worker",
    "downloading": "downloading",
    "loading": "building venv",
    "starting": "starting",
}
# Statuses after which a deployment no longer changes by itself.
FINAL_STATUSES = ("healthy", "failed", "stopped", "removed")
# How long one request of `wait_for` lets pard hold the answer back (it answers on any change).
WAIT_S = 30.0


@dataclass
class App:
    """What one parctl invocation works with; tests pass their own (socket, exec, poll)."""

    socket: Path | None = None
    timeout: float = 30.0
    config_path: Path = DEFAULT_CONFIG_PATH
    poll_interval: float = 0.25
    execvp: Callable[[str, Sequence[str]], Any] = os.execvp
    isatty: Callable[[], bool] = field(default=lambda: sys.stdout.isatty())
    # Set by --json so the error handler answers in JSON too.
    json: bool = False

    def config(self) -> Config:
        """The host's configuration; an unreadable or invalid file means defaults
        here (`parctl doctor` reports it, pard refuses to start with it)."""
        try:
            return load_config(self.config_path)
        except ParError:
            return Config()

    def socket_path(self) -> Path:
        """--socket / PARCTL_SOCKET, else `listen.socket` from the config, else the default."""
        if self.socket is not None:
            return self.socket
        try:
            return load_config(self.config_path).listen.socket
        except ParError:
            return DEFAULT_SOCKET

    def client(self) -> Client:
        return Client(self.socket_path(), self.timeout)


def exit_code(err: ParError) -> int:
    """The exit code for an error: 4 unreachable, 3 not found, 1 anything else."""
    if isinstance(err, DaemonUnreachable):
        return EXIT_UNREACHABLE
    if err.status == 404 or err.code == "not_found":
        return EXIT_NOT_FOUND
    return EXIT_FAILED


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2))


class ParctlGroup(click.Group):
    """The top-level group: maps errors escaping any command to one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ParError as err:
            app = ctx.find_object(App)
            if app is not None and app.json:
                _print_json({"error": err.to_dict()})
            click.echo(f"parctl: {err.message}", err=True)
            raise click.exceptions.Exit(exit_code(err)) from None
        except OSError as err:
            if err.errno == errno.EPIPE:
                raise  # `parctl list | head`: click exits quietly on EPIPE
            return _unexpected(err)
        except Exception as err:
            return _unexpected(err)


def _unexpected(err: Exception) -> None:
    if os.environ.get("PARCTL_DEBUG") == "1":
        click.echo(traceback.format_exc(), err=True, nl=False)
    else:
        click.echo(f"parctl: unexpected error: {err.__class__.__name__}: {err} "
                   "(PARCTL_DEBUG=1 shows the traceback)", err=True)
    raise click.exceptions.Exit(EXIT_FAILED)


def json_option(f: Callable) -> Callable:
    """`--json` for a command that prints data; also makes errors print as JSON."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.ensure_object(App).json = True
        return value

    return click.option("--json", "as_json", is_flag=True, callback=remember,
                        expose_value=True, is_eager=True,
                        help="Print the API's JSON (stable field names) instead of text.")(f)


@click.group("parctl", cls=ParctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", type=click.Path(path_type=Path, dir_okay=False), envvar="PARCTL_SOCKET",
              metavar="PATH", help="pard's unix socket [env PARCTL_SOCKET; "
              "default: listen.socket from /etc/par/par.yaml, /run/par/par.sock]")
@click.version_option(__version__, "-V", "--version", prog_name="parctl",
                      message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, socket: Path | None) -> None:
    """Deploy and look after PAR agents on this host.

    parctl talks to pard, the PAR daemon, over its unix socket (root only:
    run it as root). Each agent runs as the systemd unit par-agent@ID.service
    in its own venv. Every command that prints data takes --json.

    \b
    Exit codes:
      0  ok
      1  the operation failed (the message says why)
      2  usage error (unknown option, bad argument)
      3  not found (no such agent or deployment)
      4  pard unreachable (start it with `systemctl start par`)

    \b
    Examples:
      parctl deploy ./my-agent          pack a folder, deploy it, wait until healthy
      parctl list                       every agent with its status and ports
      parctl logs my-agent -f           follow the agent's journal
      parctl doctor                     check the host
    """
    app = ctx.ensure_object(App)
    if socket is not None:
        app.socket = socket


# -- deploy ----------------------------------------------------------------


@dataclass(frozen=True)
class PackageSource:
    """Where pard fetches the package from, and what parctl learned about it locally."""

    url: str
    manifest: dict | None = None  # agent.yaml, when the package is local
    sha256: str | None = None
    # A file parctl made: it must outlive pard's download of it.
    temporary: bool = False


def _read_manifest_text(text: str | bytes, where: str) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParError("manifest_invalid", f"{where}: not valid YAML: {exc}",
                       MANIFEST_NAME) from None
    if not isinstance(raw, dict):
        raise ParError("manifest_invalid", f"{where}: expected a mapping", MANIFEST_NAME)
    return raw


def manifest_from_folder(folder: Path) -> dict:
    """agent.yaml of an agent folder, as a mapping."""
    path = folder / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParError("manifest_missing",
                       f"{folder} has no {MANIFEST_NAME}: is it an agent folder?",
                       MANIFEST_NAME) from None
    except OSError as exc:
        raise ParError("manifest_unreadable", f"cannot read {path}: {exc.strerror}",
                       MANIFEST_NAME) from None
    return _read_manifest_text(text, str(path))


def manifest_from_apkg(package: Path) -> dict:
    """agent.yaml inside an .apkg (a zip archive), as a mapping."""
    try:
        with zipfile.ZipFile(package) as zf:
            try:
                info = zf.getinfo(MANIFEST_NAME)
            except KeyError:
                raise ParError("manifest_missing",
                               f"{package} has no {MANIFEST_NAME} at its top level",
                               MANIFEST_NAME) from None
            if info.file_size > MAX_MANIFEST_BYTES:
                raise ParError("manifest_invalid", f"{package}: {MANIFEST_NAME} is larger than "
                               f"{MAX_MANIFEST_BYTES} bytes", MANIFEST_NAME)
            data = zf.read(info)
    except zipfile.BadZipFile:
        raise ParError("package_invalid", f"{package} is not an .apkg (zip) archive") from None
    except OSError as exc:
        raise ParError("package_unreadable", f"cannot read {package}: {exc.strerror}") from None
    return _read_manifest_text(data, f"{package}:{MANIFEST_NAME}")


def manifest_name_version(raw: dict) -> tuple[str | None, str | None]:
    """`name` and the version: top-level `version`, else `metadata.version`."""
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    candidates = (("version", raw.get("version")), ("metadata.version", metadata.get("version")))
    for key, value in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or isinstance(value, float):
            # YAML reads 1.10 as the number 1.1: refuse rather than deploy the wrong version.
            raise ParError("manifest_invalid", f"{MANIFEST_NAME}: {key}: quote it "
                           f"(YAML reads it as {value!r})", key)
        if isinstance(value, int):
            return name, str(value)
        if isinstance(value, str) and value.strip():
            return name, value.strip()
    return name, None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(source: str, workdir: Path) -> PackageSource:
    """An http(s) URL as is; an .apkg or a folder (packed into `workdir`) as a file:// URL.

    pard runs as root on this host, so it reads the file parctl points it at.
    """
    if source.startswith(("http://", "https://")):
        return PackageSource(url=source)
    path = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    if path.is_dir():
        manifest = manifest_from_folder(path)
        from par.pack import pack_folder  # lazily: only a folder deploy needs the packer

        package = pack_folder(path, workdir / f"{path.resolve().name or 'agent'}.apkg")
        return PackageSource(package.resolve().as_uri(), manifest, _sha256_file(package), True)
    if path.is_file():
        manifest = manifest_from_apkg(path)
        return PackageSource(path.resolve().as_uri(), manifest, _sha256_file(path))
    raise click.BadParameter(f"{source!r} is not a folder, an .apkg file or an http(s) URL",
                             param_hint="PATH|URL")


def _option_id(value: str | None, param: str, check: Callable[[object, str], str]) -> str | None:
    """Validate an id given on the command line (a bad one is a usage error, exit 2)."""
    if value is None:
        return None
    try:
        return check(value, param)
    except ParError as err:
        raise click.BadParameter(err.message, param_hint=param) from None


def _env_pairs(_ctx: click.Context, _param: click.Parameter,
               values: Iterable[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not ids.ENV_KEY_RE.fullmatch(key):
            raise click.BadParameter(f"{item!r}: expected K=V with K matching {ids.ENV_KEY_RE.pattern}")
        env[key] = value
    return env


def _sha256_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not SHA256_RE.fullmatch(value):
        raise click.BadParameter("expected 64 hexadecimal characters")
    return value.lower() if value else None


def new_deployment_id(agent: str, now: float | None = None) -> str:
    """`{agent}-{UTC timestamp}-{4 hex}`: sortable, readable, unique enough for one host."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return f"{agent}-{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


@dataclass
class PhasePrinter:
    """Shows deploy phases as they happen.

    On a terminal the phase in progress is one line updated in place; every
    finished phase ends as a plain line ("downloading ... 0.1s", "building
    venv: reused", "building venv: uv 3.2s").  Not on a terminal, only the
    plain lines are written (logs and CI stay readable).
    """

    tty: bool
    write: Callable[[str], None]
    done: set[str] = field(default_factory=set)
    live: bool = False  # an updating line is on screen

    def show(self, record: dict, installer: str | None, now: float) -> None:
        phases = record.get("phases") or {}
        for name in PHASES:
            phase = phases.get(name)
            if name in self.done or not isinstance(phase, dict) or phase.get("end") is None:
                continue
            self.line(self._finished(name, phase, record, installer))
            self.done.add(name)
        status = record.get("status")
        if self.tty and status in PHASE_LABELS and status not in self.done:
            start = (phases.get(status) or {}).get("start")
            elapsed = f" {max(0.0, now - start):.1f}s" if isinstance(start, int | float) else ""
            self.write(f"\r\x1b[K{PHASE_LABELS[status]} ...{elapsed}")
            self.live = True

    def line(self, text: str) -> None:
        """A finished line (replacing the updating one on a terminal)."""
        if self.live:
            self.write("\r\x1b[K")
            self.live = False
        self.write(text + "\n")

    @staticmethod
    def _finished(name: str, phase: dict, record: dict, installer: str | None) -> str:
        seconds = phase.get("seconds")
        took = f"{seconds:.1f}s" if isinstance(seconds, int | float) else "done"
        if name == "loading":
            if record.get("venvReused"):
                return "building venv: reused"
            return f"building venv: {installer + ' ' if installer else ''}{took}"
        return f"{PHASE_LABELS[name]} ... {took}"


def installer_from_events(client: Client, deployment_id: str) -> str | None:
    """The installer that built the deployment's venv, as pard's events name it."""
    try:
        events = client.events(deployment_id, limit=100).get("events") or []
    except ApiError:
        return None  # the name is a nicety; the deploy goes on without it
    for event in events:
        fields = event.get("fields") if isinstance(event, dict) else None
        if isinstance(fields, dict):
            for key in ("installer", "backend"):
                if isinstance(fields.get(key), str):
                    return fields[key]
    return None


def wait_for(app: App, client: Client, deployment_id: str, printer: PhasePrinter | None,
             until_taken: bool = False) -> dict:
    """Follow the deployment until it is final (or, with `until_taken`, past downloading).

    Each request returns as soon as the record changes (GET ...?wait=S), so every
    phase shows, and the end is seen, the moment it happens."""
    installer: str | None = None
    asked_installer = False
    record: dict | None = None
    while True:
        previous = record
        if previous is None:
            record = client.deployment(deployment_id)
        else:
            seen = previous.get("updatedAt")
            record = client.deployment(deployment_id, wait=WAIT_S,
                                       since=seen if isinstance(seen, (int, float)) else None)
            if record.get("updatedAt") == seen:
                time.sleep(app.poll_interval)  # unchanged (a server that did not wait): pace it
        status = record.get("status")
        if printer is not None:
            loading = (record.get("phases") or {}).get("loading") or {}
            built = loading.get("end") is not None and not record.get("venvReused")
            if built and not asked_installer:
                asked_installer = True
                installer = installer_from_events(client, deployment_id)
            printer.show(record, installer, time.time())
        if status in FINAL_STATUSES or (until_taken and status not in ("pending", "downloading")):
            return record


def _ports_text(ports: dict | None, sep: str = ", ") -> str:
    if not isinstance(ports, dict):
        return "-"
    shown = [f"{k} {v}" for k, v in ports.items() if v]
    return sep.join(shown) or "-"


def health_url(record: dict) -> str | None:
    rest = (record.get("ports") or {}).get("rest")
    return f"http://127.0.0.1:{rest}/health" if rest else None


def deploy_summary(record: dict) -> list[str]:
    """What a person needs after a healthy deploy: unit, ports, health URL, next step."""
    agent = record.get("agentAppId", "?")
    lines = [f"{agent} {record.get('version', '')} is running "
             f"(deployment {record.get('deploymentId')})"]
    lines.append(f"  unit:    {record.get('unit') or f'par-agent@{agent}.service'}")
    lines.append(f"  ports:   {_ports_text(record.get('ports'))}")
    url = health_url(record)
    if url:
        lines.append(f"  health:  {url}")
    lines.append(f"  see:     systemctl status par-agent@{agent}")
    return lines


def _failure_message(record: dict) -> str:
    agent = record.get("agentAppId", "?")
    error = record.get("error") or {}
    message = error.get("message") if isinstance(error, dict) else None
    if record.get("status") == "failed":
        return f"deploy of {agent} failed: {message or 'no reason given (see parctl status)'}"
    return f"deployment {record.get('deploymentId')} of {agent} is {record.get('status')}" + (
        f": {message}" if message else "")


def agent_and_version(src: PackageSource, agent_opt: str | None,
                      version_opt: str | None) -> tuple[str, str]:
    """The options win; else the manifest's name and version (checked like pard checks them)."""
    name, version = manifest_name_version(src.manifest) if src.manifest else (None, None)
    # A URL's package is not read locally: its id and version must be given.
    if not agent_opt and not name:
        raise click.UsageError("--id is required for a URL" if src.manifest is None
                               else "agent.yaml has no name: pass --id")
    if not version_opt and not version:
        raise click.UsageError("--version is required for a URL" if src.manifest is None
                               else "agent.yaml has no version: pass --version")
    return (agent_opt or ids.agent_id(name, "agent.yaml name"),
            version_opt or ids.version(version, "agent.yaml version"))


def deploy_body(src: PackageSource, agent: str, version: str, *, org: str = "",
                sha256: str | None = None, memory: int | None = None, cpu: int | None = None,
                stop_timeout: int | None = None, env: dict[str, str] | None = None) -> dict:
    """The POST /deploy request (docs/api.md); options left out are pard's defaults."""
    body: dict[str, Any] = {
        "deploymentId": new_deployment_id(agent),
        "agentAppId": agent,
        "orgId": org,
        "version": version,
        "packageUrl": src.url,
    }
    optional = {"packageSha256": sha256 or src.sha256, "memoryMB": memory, "cpuUnits": cpu,
                "stopTimeoutSec": stop_timeout, "env": env or None}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


@cli.command()
@click.argument("source", metavar="PATH|URL")
@click.option("--id", "agent_opt", metavar="ID",
              help="Agent id (agentAppId) [default: the manifest's name]; required for a URL.")
@click.option("--version", "version_opt", metavar="V",
              help="Version [default: the manifest's version]; required for a URL.")
@click.option("--sha256", callback=_sha256_option, metavar="HEX",
              help="Expected SHA-256 of the package (computed for a local folder or .apkg).")
@click.option("--env", "env", multiple=True, callback=_env_pairs, metavar="K=V",
              help="Environment variable for the agent; repeatable. Values are never shown back.")
@click.option("--memory", type=click.IntRange(16, 1048576), metavar="MB",
              help="Memory limit in MB (MemoryMax).")
@click.option("--cpu", type=click.IntRange(1, 65536), metavar="UNITS",
              help="CPU units, 1024 = one CPU (CPUQuota).")
@click.option("--stop-timeout", type=click.IntRange(1, 3600), metavar="S",
              help="Seconds between SIGTERM and SIGKILL when the agent stops.")
@click.option("--org", default="", metavar="ORG", help="orgId to record with the deployment.")
@click.option("--no-wait", is_flag=True,
              help="Return once pard has the package, without waiting for the agent to start.")
@json_option
@click.pass_obj
def deploy(app: App, source: str, agent_opt: str | None, version_opt: str | None,
           sha256: str | None, env: dict[str, str], memory: int | None, cpu: int | None,
           stop_timeout: int | None, org: str, no_wait: bool, as_json: bool) -> None:
    """Deploy an agent from a folder, an .apkg file or an http(s) URL.

    A folder is packed into an .apkg on the fly. Without --id the agent id is
    the manifest's name (agent.yaml). parctl then shows the phases as they
    happen (downloading, building venv, starting) and ends with the unit,
    the ports and the health URL. A new deployment replaces the running one
    only once it is healthy.

    \b
    Examples:
      parctl deploy ./hello
      parctl deploy hello-1.0.0.apkg --env LOG_LEVEL=debug --memory 512
      parctl deploy https://example.com/hello.apkg --id hello --version 1.0.0
    """
    agent_opt = _option_id(agent_opt, "--id", ids.agent_id)
    version_opt = _option_id(version_opt, "--version", ids.version)
    client = app.client()
    with tempfile.TemporaryDirectory(prefix="parctl-") as workdir:
        src = resolve_source(source, Path(workdir))
        agent, version = agent_and_version(src, agent_opt, version_opt)
        body = deploy_body(src, agent, version, org=org, sha256=sha256, memory=memory, cpu=cpu,
                           stop_timeout=stop_timeout, env=env)
        accepted = client.deploy(body)
        deployment_id = accepted.get("deploymentId") or body["deploymentId"]
        printer = None if as_json else PhasePrinter(app.isatty(), lambda s: click.echo(s, nl=False))
        if printer is not None:
            printer.line(f"deploying {agent} {version} (deployment {deployment_id})")
        try:
            if no_wait:
                if src.temporary:
                    # The packed file goes away with this process: let pard copy it first.
                    wait_for(app, client, deployment_id, None, until_taken=True)
                if as_json:
                    _print_json(accepted)
                else:
                    click.echo(f"accepted; follow it with: parctl status {agent}")
                return
            record = wait_for(app, client, deployment_id, printer)
        except KeyboardInterrupt:
            click.echo(f"\nparctl: stopped waiting; pard goes on with the deploy: "
                       f"parctl status {agent}", err=True)
            raise click.exceptions.Exit(130) from None
    if as_json:
        _print_json(record)
    elif printer is not None:
        printer.line(str(record.get("status")))
        if record.get("status") == "healthy":
            click.echo("\n".join(deploy_summary(record)))
    if record.get("status") != "healthy":
        click.echo(f"parctl: {_failure_message(record)}", err=True)
        raise click.exceptions.Exit(EXIT_FAILED)


# -- looking at agents -----------------------------------------------------


def format_bytes(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"


def format_duration(seconds: object) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{s}s"
    return f"{s}s"


def _ago(ts: object, now: float) -> str:
    return f"{format_duration(now - ts)} ago" if isinstance(ts, int | float) and ts else "-"


def _clock(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart (like systemctl list-units)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def not_found_hint(err: ApiError, ident: str) -> ApiError:
    """A 404 for an ID becomes one message that says where the ids are listed."""
    if err.status != 404:
        return err
    return ApiError("not_found", f"no agent or deployment named {ident!r} "
                    "(parctl list shows the agents)", err.field, 404)


def resolve(client: Client, ident: str) -> dict:
    """The deployment an ID names; pard reads it as a deploymentId, else as an agent id
    (its current deployment, else its latest).  Not found is a 404 ApiError (exit 3)."""
    try:
        return client.deployment(ident)
    except ApiError as err:
        raise not_found_hint(err, ident) from None


def _ident(value: str) -> str:
    """An agent id or deploymentId from the command line (a bad one is exit 2)."""
    if not ids.DEPLOYMENT_ID_RE.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not an agent id or a deploymentId", param_hint="ID")
    return value


ID_ARG = click.argument("ident", metavar="ID", callback=lambda _c, _p, v: _ident(v))


@cli.command("list")
@click.option("-a", "--all", "show_all", is_flag=True,
              help="Also agents with no current deployment (a failed first deploy, say).")
@json_option
@click.pass_obj
def list_(app: App, show_all: bool, as_json: bool) -> None:
    """List agents: version, live status, ports, uptime, memory, restarts."""
    data = app.client().agents(include_all=show_all)
    if as_json:
        _print_json(data)
        return
    agents = data.get("agents") or []
    if not agents:
        click.echo("no agents deployed (parctl deploy PATH deploys one)")
        return
    now = time.time()
    rows = []
    for agent in agents:
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
            _ports_text(record.get("ports"), sep=" "),
            format_duration(now - unit["since"]) if running and unit.get("since") else "-",
            format_bytes(resources.get("rssBytes")),
            unit.get("nRestarts", "-"),
        ])
    click.echo(table(["ID", "VERSION", "STATUS", "PORTS", "UPTIME", "MEMORY", "RESTARTS"], rows))


@cli.command()
@click.argument("agent", required=False, callback=lambda _c, _p, v: v and _ident(v))
@click.option("--status", "status_", type=click.Choice(STATUSES), default=None,
              help="Only deployments in this status.")
@json_option
@click.pass_obj
def deployments(app: App, agent: str | None, status_: str | None, as_json: bool) -> None:
    """List deployments, newest first: every agent's history, or AGENT's.

    Failed and replaced deployments are here too, with why they failed.
    """
    data = app.client().deployments(agent_app_id=agent, status=status_)
    if as_json:
        _print_json(data)
        return
    records = data.get("deployments") or []
    if not records:
        click.echo(f"no deployments of {agent}" if agent else "no deployments")
        return
    rows = []
    for r in records:
        error = r.get("error") or {}
        note = (f"{error.get('code')}: {error.get('message', '')}" if error
                else "current" if r.get("current") else "")
        if len(note) > 70:
            note = note[:67] + "..."  # `parctl status ID` shows all of it
        rows.append([r.get("deploymentId", "?"), r.get("agentAppId", "?"), r.get("version", "-"),
                     r.get("status", "-"), _clock(r.get("createdAt")), note])
    click.echo(table(["DEPLOYMENT", "AGENT", "VERSION", "STATUS", "CREATED", "NOTE"], rows))


def _try(call: Callable[[], dict]) -> dict:
    """An extra view for `status`; its failure is shown, not fatal."""
    try:
        return call()
    except ApiError as err:
        return {"error": err.to_dict()}


def unit_text(details: dict | None) -> str:
    """`active (running), pid 1234, restarts 0` from a health answer's details."""
    if not isinstance(details, dict):
        return "-"
    unit = details.get("unit") if isinstance(details.get("unit"), dict) else details
    state = unit.get("activeState")
    if state is None:
        return "-"
    text = f"{state} ({unit.get('subState', '?')})"
    if unit.get("mainPid"):
        text += f", pid {unit['mainPid']}"
    if unit.get("nRestarts") is not None:
        text += f", restarts {unit['nRestarts']}"
    return text


@cli.command()
@ID_ARG
@click.option("-n", "--events", "n_events", type=click.IntRange(0, 1000), default=10,
              show_default=True, help="How many recent events to show.")
@json_option
@click.pass_obj
def status(app: App, ident: str, n_events: int, as_json: bool) -> None:
    """Show an agent's deployment, unit, venv and events.

    ID is an agent id (its current deployment) or a deploymentId.  Exits 0 when
    the agent is healthy, 3 when it is not (failed, restarting, stopped, in
    progress, or its /health fails), as `systemctl status` does for a unit that
    is not running.
    """
    client = app.client()
    record = resolve(client, ident)
    dep = record["deploymentId"]
    health = _try(lambda: client.health(dep))
    events = _try(lambda: client.events(dep, limit=n_events)) if n_events else {"events": []}
    live = health.get("status") or record.get("status")
    if as_json:
        _print_json({"deployment": record, "health": health,
                     "events": events.get("events", events)})
    else:
        _print_status(record, health, events, live, n_events)
    if live != "healthy" or health.get("healthy") is not True:
        raise click.exceptions.Exit(EXIT_NOT_RUNNING)


def _print_status(record: dict, health: dict, events: dict, live: str | None,
                  n_events: int) -> None:
    dep = record["deploymentId"]
    agent = record.get("agentAppId", "?")
    flags = " (current)" if record.get("current") else ""
    lines = [f"{agent} {record.get('version', '')}: {live}{flags}",
             f"  deployment: {dep}   desired: {record.get('desiredState', '-')}"]
    unit_state = (f"error: {health['error']['message']}" if "error" in health
                  else unit_text(health.get("details")))
    lines.append(f"  unit:       {record.get('unit') or '-'}  {unit_state}")
    venv = record.get("venv") or "-"
    lines.append(f"  venv:       {venv}{' (reused)' if record.get('venvReused') else ''}")
    lines.append(f"  ports:      {_ports_text(record.get('ports'))}")
    if health_url(record):
        lines.append(f"  health:     {health_url(record)}")
    phases = record.get("phases") or {}
    timing = [f"{name} {p['seconds']:.1f}s" for name, p in phases.items()
              if isinstance(p, dict) and isinstance(p.get("seconds"), int | float)]
    if timing:
        lines.append(f"  phases:     {', '.join(timing)}")
    lines.append(f"  created:    {_clock(record.get('createdAt'))}   "
                 f"updated: {_clock(record.get('updatedAt'))}")
    error = record.get("error")
    if isinstance(error, dict) and error.get("message"):
        lines.append(f"  error:      {error['message']}")
    if n_events:
        if "error" in events:
            lines.append(f"events: {events['error']['message']}")
        else:
            lines.append(f"events (last {n_events}):")
            for event in events.get("events") or []:
                message = event.get("message")
                name = event.get("event", "")
                text = f"{name}: {message}" if message and message != name else name
                lines.append(f"  {_clock(event.get('ts'))}  {text}")
    click.echo("\n".join(lines))


@cli.command()
@ID_ARG
@json_option
@click.pass_obj
def health(app: App, ident: str, as_json: bool) -> None:
    """Ask an agent whether it is healthy; exit 1 when it is not.

    ID is an agent id (its current deployment) or a deploymentId.
    """
    client = app.client()
    record = resolve(client, ident)
    data = client.health(record["deploymentId"])
    if as_json:
        _print_json(data)
    else:
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
        lines.append(f"  ports:    {_ports_text(data.get('ports') or record.get('ports'))}")
        click.echo("\n".join(lines))
    if not data.get("healthy"):
        raise click.exceptions.Exit(EXIT_FAILED)


def journalctl_argv(agent: str, follow: bool, lines: int | None, since: str | None) -> list[str]:
    """`journalctl -u par-agent@ID.service` with the requested flags (an argv, never a shell)."""
    argv = ["journalctl", "-u", f"par-agent@{agent}.service"]
    if follow:
        argv.append("-f")
    if lines is not None:
        argv += ["-n", str(lines)]
    if since:
        argv += ["--since", since]
    return argv


@cli.command()
@click.argument("agent", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", type=click.IntRange(0), metavar="N", help="Show the last N lines.")
@click.option("--since", metavar="WHEN",
              help='Start at WHEN ("10 min ago", "today", "2025-01-01 12:00").')
@click.pass_obj
def logs(app: App, agent: str, follow: bool, lines: int | None, since: str | None) -> None:
    """Show an agent's logs (journalctl -u par-agent@ID).

    Reads the journal directly, so it works without pard.
    """
    agent = _option_id(agent, "ID", ids.agent_id) or agent
    argv = journalctl_argv(agent, follow, lines, since)
    sys.stdout.flush()
    try:
        app.execvp(argv[0], argv)
    except FileNotFoundError:
        raise ParError("journalctl_missing",
                       "journalctl not found: parctl logs needs systemd's journal") from None


def _action_command(name: str, verb: str, doc: str) -> None:
    @json_option
    @click.pass_obj
    def command(app: App, ident: str, as_json: bool) -> None:
        try:
            record = app.client().action(ident, name)
        except ApiError as err:
            raise not_found_hint(err, ident) from None
        if as_json:
            _print_json(record)
        else:
            click.echo(f"{verb} {record.get('agentAppId', ident)}: {record.get('status')} "
                       f"({record.get('unit') or 'no unit'})")

    command.__doc__ = doc
    cli.command(name)(ID_ARG(command))


_action_command("stop", "stopped", "Stop an agent; it stays stopped until `parctl start`.\n\n"
                "ID is an agent id (its current deployment) or a deploymentId.")
_action_command("start", "started", "Start a stopped agent again.\n\n"
                "ID is an agent id (its current deployment) or a deploymentId.")
_action_command("restart", "restarted", "Restart an agent's unit (same venv, same ports).\n\n"
                "ID is an agent id (its current deployment) or a deploymentId.")


@cli.command()
@ID_ARG
@click.option("--purge", is_flag=True,
              help="Also delete its package, extracted files and its venv if no one else uses it.")
@json_option
@click.pass_obj
def rm(app: App, ident: str, purge: bool, as_json: bool) -> None:
    """Remove an agent: stop its unit and delete its deployment.

    ID is an agent id (its current deployment) or a deploymentId.
    """
    try:
        data = app.client().delete(ident, purge=purge)
    except ApiError as err:
        raise not_found_hint(err, ident) from None
    if as_json:
        _print_json(data)
        return
    click.echo(f"removed {data.get('agentAppId', ident)} (deployment {data.get('deleted')})")
    for path in data.get("purged") or []:
        click.echo(f"  deleted {path}")
    if not purge:
        click.echo("  package and venv kept (parctl rm --purge deletes them)")


# -- venvs, installer, pack ------------------------------------------------


@cli.group()
def venv() -> None:
    """List, prune and prewarm the per-agent venvs."""


@venv.command("list")
@json_option
@click.pass_obj
def venv_list(app: App, as_json: bool) -> None:
    """List venvs: name, size, last use, agents using it."""
    data = app.client().venvs()
    if as_json:
        _print_json(data)
        return
    venvs = data.get("venvs") or []
    if not venvs:
        click.echo("no venvs")
        return
    now = time.time()
    rows = [[v.get("name", "?"), format_bytes(v.get("sizeBytes")), _packages(v),
             _ago(v.get("lastUsed"), now), ", ".join(v.get("inUseBy") or []) or "-"]
            for v in venvs]
    click.echo(table(["NAME", "SIZE", "PACKAGES", "LAST USED", "IN USE BY"], rows))
    if any((v.get("layerShared") or 0) > 1 for v in venvs):
        click.echo("SIZE includes the installed packages, which venvs of the same "
                   "requirements share (counted once on disk).")


def _packages(venv: dict) -> str:
    """Whether the venv's installed packages are its own or shared with other venvs."""
    shared = venv.get("layerShared") or 0
    return f"shared by {shared}" if shared > 1 else "own"


@venv.command("prune")
@json_option
@click.pass_obj
def venv_prune(app: App, as_json: bool) -> None:
    """Delete venvs no current deployment uses (least recently used first, within the budget)."""
    data = app.client().prune_venvs()
    if as_json:
        _print_json(data)
        return
    evicted = data.get("evicted") or []
    click.echo(f"evicted {len(evicted)} venv{'s' if len(evicted) != 1 else ''}")
    for name in evicted:
        click.echo(f"  {name}")


@venv.command("prewarm")
@click.option("-r", "--requirements", "requirements", required=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="requirements.txt whose packages go into the shared cache.")
@json_option
@click.pass_obj
def venv_prewarm(app: App, requirements: Path, as_json: bool) -> None:
    """Fill the shared cache for a requirements file, so the next build needs no network."""
    data = app.client().prewarm(requirements.read_text(encoding="utf-8"))
    if as_json:
        _print_json(data)
    else:
        seconds = data.get("seconds")
        took = f" in {seconds:.1f}s" if isinstance(seconds, int | float) else ""
        click.echo(f"prewarmed {requirements}{took}")


@cli.group()
def installer() -> None:
    """Manage the installer pard builds venvs with (uv, else pip)."""


@installer.command("install-uv")
@json_option
@click.pass_obj
def installer_install_uv(app: App, as_json: bool) -> None:
    """Fetch uv from the configured package index into PAR's tools folder.

    Debian 12 has no uv package; without uv, PAR builds venvs with pip (slower).
    """
    data = app.client().install_uv()
    if as_json:
        _print_json(data)
    else:
        click.echo(f"uv {data.get('version', '?')} installed at {data.get('path', '?')}")


@cli.command()
@click.argument("folder", metavar="DIR",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Where to write the package [default: ./NAME-VERSION.apkg].")
@json_option
def pack(folder: Path, output: Path | None, as_json: bool) -> None:
    """Pack an agent folder into an .apkg (no pard needed)."""
    from par.pack import pack_folder  # lazily: the other commands never need the packer

    if output is None:
        name, version = manifest_name_version(manifest_from_folder(folder))
        stem = "-".join(p for p in (name or folder.resolve().name, version) if p)
        output = Path(f"{stem}.apkg")
    package = pack_folder(folder, output)
    data = {"path": str(package), "sizeBytes": package.stat().st_size,
            "sha256": _sha256_file(package)}
    if as_json:
        _print_json(data)
    else:
        click.echo(f"packed {folder} -> {package} ({format_bytes(data['sizeBytes'])}, "
                   f"sha256 {data['sha256']})")


# -- doctor, version ---------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One doctor finding: `ok`, `warn` or `fail`, with what to do about it."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.status:<4}  {self.name}: {self.detail}{fix}"

    def to_dict(self) -> dict:
        return {"check": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def check_systemd() -> Check:
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
    try:
        load_config(path)
    except ConfigError as err:
        return Check("config", "fail", err.message, f"fix {path}; pard refuses to start with it")
    if not path.exists():
        return Check("config", "warn", f"{path} not found, defaults in use",
                     "reinstall the par package to get the commented default")
    return Check("config", "ok", f"{path} is valid")


def check_dir(label: str, path: Path) -> Check:
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
    info = (health or {}).get("installer")
    if isinstance(info, dict) and info:
        kind = info.get("kind") or info.get("name") or "?"
        detail = " ".join(str(p) for p in (kind, info.get("version")) if p)
        if info.get("path"):
            detail += f" ({info['path']})"
        if info.get("error"):
            return Check("installer", "fail", f"{detail}: {info['error']}",
                         "parctl installer install-uv")
        if kind == "pip":
            return Check("installer", "warn", f"{detail}; uv not found, venv builds are slower",
                         "parctl installer install-uv")
        return Check("installer", "ok", f"{detail} (reported by pard)")
    # pard is not answering: look for the installer the way pard would.
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


def check_python(cfg: Config) -> Check:
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


@cli.command()
@json_option
@click.pass_obj
def doctor(app: App, as_json: bool) -> None:
    """Check the host and say what to fix.

    Checks systemd, pard, the config, the directories, the installer, free
    disk and Python. Each line is ok, warn or fail, with what to do. Exit 1 if any check fails.
    """
    cfg = app.config()
    pard, health = check_pard(app.client())
    checks = [
        check_systemd(),
        pard,
        check_config(app.config_path),
        check_dir("state dir", cfg.paths.state_dir),
        check_dir("cache dir", cfg.paths.cache_dir),
        check_installer(cfg, health),
        check_disk(cfg),
        check_python(cfg),
    ]
    ok = all(c.status != "fail" for c in checks)
    if as_json:
        _print_json({"ok": ok, "checks": [c.to_dict() for c in checks]})
    else:
        click.echo("\n".join(c.line() for c in checks))
    if not ok:
        raise click.exceptions.Exit(EXIT_FAILED)


@cli.command("version")
@json_option
@click.pass_obj
def version_(app: App, as_json: bool) -> None:
    """Show parctl's version and, when it answers, pard's."""
    try:
        pard: str | None = app.client().daemon_health().get("version")
        problem = None
    except ParError as err:
        pard, problem = None, err.message
    if as_json:
        _print_json({"parctl": __version__, "pard": pard})
        return
    click.echo(f"parctl {__version__}")
    click.echo(f"pard {pard}" if pard else f"pard: unknown ({problem})")


def main() -> None:
    """The `parctl` console script (shell completion: _PARCTL_COMPLETE=bash_source parctl)."""
    cli.main(prog_name="parctl", complete_var="_PARCTL_COMPLETE")


if __name__ == "__main__":
    main()
