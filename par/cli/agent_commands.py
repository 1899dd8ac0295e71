"""The commands about agents: deploy, look at them (list, status, health, logs), act on them.

Each one parses, calls pard through `par.client` and hands the answer to
`render.show` with its text view; errors are left to `ParctlGroup`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from par import ids
from par.cli import progress, views
from par.cli.app import EXIT_FAILED, EXIT_NOT_RUNNING, App, json_option
from par.cli.deploy_source import agent_and_version, deploy_body, resolve_source
from par.cli.params import ID_ARG, check_ident, env_pairs, option_id, sha256_option
from par.cli.render import show
from par.client import ApiError, Client
from par.errors import ParError
from par.store import STATUSES


@click.command()
@click.argument("source", metavar="PATH|URL")
@click.option("--id", "agent_opt", metavar="ID",
              help="Agent id (agentAppId) [default: the manifest's name]; required for a URL.")
@click.option("--version", "version_opt", metavar="V",
              help="Version [default: the manifest's version]; required for a URL.")
@click.option("--sha256", callback=sha256_option, metavar="HEX",
              help="Expected SHA-256 of the package (computed for a local folder or .apkg).")
@click.option("--env", "env", multiple=True, callback=env_pairs, metavar="K=V",
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
    agent_opt = option_id(agent_opt, "--id", ids.agent_id)
    version_opt = option_id(version_opt, "--version", ids.version)
    client = app.client()
    src = resolve_source(source)
    agent, version = agent_and_version(src, agent_opt, version_opt)
    body = deploy_body(src, agent, version, org=org, sha256=sha256, memory=memory, cpu=cpu,
                       stop_timeout=stop_timeout, env=env)
    accepted = client.deploy(body)
    deployment_id = accepted.get("deploymentId") or body["deploymentId"]
    printer = (None if as_json else
               progress.PhasePrinter(app.isatty(), lambda s: click.echo(s, nl=False)))
    if printer is not None:
        printer.line(f"deploying {agent} {version} (deployment {deployment_id})")
    try:
        if no_wait:
            show(as_json, accepted,
                 lambda _: [f"accepted; follow it with: parctl status {agent}"])
            return
        record = progress.wait_for(app, client, deployment_id, printer)
    except KeyboardInterrupt:
        click.echo(f"\nparctl: stopped waiting; pard goes on with the deploy: "
                   f"parctl status {agent}", err=True)
        raise click.exceptions.Exit(130) from None
    if printer is not None:
        printer.line(str(record.get("status")))  # the last line of the phases
    show(as_json, record, views.deployed)
    if record.get("status") != "healthy":
        click.echo(f"parctl: {views.deploy_failure(record)}", err=True)
        raise click.exceptions.Exit(EXIT_FAILED)


# -- looking at agents -----------------------------------------------------


def not_found_hint(err: ApiError, ident: str) -> ApiError:
    """A 404 for an ID becomes one message that says where the ids are listed."""
    if err.status != 404:
        return err
    return ApiError("not_found", f"no agent or deployment named {ident!r} "
                    "(parctl list shows the agents)", err.field, 404)


def resolve(client: Client, ident: str) -> dict:
    """The deployment an ID names; pard reads it as a deploymentId, else as an agent id
    (its current deployment, else its latest).  Not found is a 404 ApiError (exit 4)."""
    try:
        return client.deployment(ident)
    except ApiError as err:
        raise not_found_hint(err, ident) from None


@click.command("list")
@click.option("-a", "--all", "show_all", is_flag=True,
              help="Also agents with no current deployment (a failed first deploy, say).")
@json_option
@click.pass_obj
def list_(app: App, show_all: bool, as_json: bool) -> None:
    """List agents: version, live status, ports, uptime, memory, restarts."""
    show(as_json, app.client().agents(include_all=show_all), views.agents)


@click.command()
@click.argument("agent", required=False, callback=lambda _c, _p, v: v and check_ident(v))
@click.option("--status", "status_", type=click.Choice(STATUSES), default=None,
              help="Only deployments in this status.")
@json_option
@click.pass_obj
def deployments(app: App, agent: str | None, status_: str | None, as_json: bool) -> None:
    """List deployments, newest first: every agent's history, or AGENT's.

    Failed and replaced deployments are here too, with why they failed.
    """
    data = app.client().deployments(agent_app_id=agent, status=status_)
    show(as_json, data, lambda d: views.deployments(d, agent))


def _try(call: Callable[[], dict]) -> dict:
    """An extra view for `status`; its failure is shown, not fatal."""
    try:
        return call()
    except ApiError as err:
        return {"error": err.to_dict()}


@click.command()
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
    data = {"deployment": record, "health": health, "events": events.get("events", events)}
    show(as_json, data, lambda d: views.status(d, live, n_events))
    if live != "healthy" or health.get("healthy") is not True:
        raise click.exceptions.Exit(EXIT_NOT_RUNNING)


@click.command()
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
    show(as_json, data, lambda d: views.health(d, record, ident))
    if not data.get("healthy"):
        raise click.exceptions.Exit(EXIT_FAILED)


def journalctl_argv(agent: str | None, follow: bool, lines: int | None, since: str | None,
                    deployment: str | None = None) -> list[str]:
    """`journalctl -u par-agent@ID.service`, or the lines of one deployment
    (`PAR_DEPLOYMENT_ID=`, a journal field of every agent line), with the requested
    flags (an argv, never a shell)."""
    if deployment is not None:
        argv = ["journalctl", f"PAR_DEPLOYMENT_ID={deployment}"]
    else:
        argv = ["journalctl", "-u", f"par-agent@{agent}.service"]
    if follow:
        argv.append("-f")
    if lines is not None:
        argv += ["-n", str(lines)]
    if since:
        argv += ["--since", since]
    return argv


def log_target(app: App, ident: str) -> tuple[str | None, str | None]:
    """(agent, deployment): what `parctl logs ID` shows.  pard, when it answers, says
    whether ID is a deploymentId; without pard an agent-id-shaped ID is an agent."""
    try:
        record = app.client().deployment(ident)
    except ParError:  # not found, or pard unreachable: the journal is still there
        record = None
    if record is not None and record.get("deploymentId") == ident \
            and record.get("agentAppId") != ident:
        return None, ident
    if ids.AGENT_ID_RE.fullmatch(ident):
        return ident, None
    return None, option_id(ident, "ID", ids.deployment_id)


@click.command()
@click.argument("agent", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", type=click.IntRange(0), metavar="N", help="Show the last N lines.")
@click.option("--since", metavar="WHEN",
              help='Start at WHEN ("10 min ago", "today", "2025-01-01 12:00").')
@click.pass_obj
def logs(app: App, agent: str, follow: bool, lines: int | None, since: str | None) -> None:
    """Show an agent's logs (journalctl -u par-agent@ID), or one deployment's.

    ID is an agent id or a deploymentId.  Reads the journal directly, so it works
    without pard.
    """
    name, deployment = log_target(app, agent)
    argv = journalctl_argv(name, follow, lines, since, deployment)
    sys.stdout.flush()
    try:
        app.execvp(argv[0], argv)
    except FileNotFoundError:
        raise ParError("journalctl_missing",
                       "journalctl not found: parctl logs needs systemd's journal") from None


# -- acting on agents ------------------------------------------------------


def _action_command(name: str, verb: str, doc: str) -> click.Command:
    """`parctl stop|start|restart ID`: POST the action, show the agent's state after it."""

    @json_option
    @click.pass_obj
    def command(app: App, ident: str, as_json: bool) -> None:
        try:
            record = app.client().action(ident, name)
        except ApiError as err:
            raise not_found_hint(err, ident) from None
        show(as_json, record, lambda r: views.acted(r, verb, ident))

    command.__doc__ = doc
    return click.command(name)(ID_ARG(command))


_ID_HELP = "ID is an agent id (its current deployment) or a deploymentId."
stop = _action_command("stop", "stopped",
                       f"Stop an agent; it stays stopped until `parctl start`.\n\n{_ID_HELP}")
start = _action_command("start", "started", f"Start a stopped agent again.\n\n{_ID_HELP}")
restart = _action_command("restart", "restarted",
                          f"Restart an agent's unit (same venv, same ports).\n\n{_ID_HELP}")


@click.command()
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
    show(as_json, data, lambda d: views.removed(d, ident, purge))


COMMANDS: tuple[click.Command, ...] = (deploy, list_, deployments, status, health, logs,
                                       stop, start, restart, rm)
