"""`parctl env`: an agent's own variables (a deploy's `--env`) changed in place, as
dokku's config:set does.  Values are never printed back."""

from __future__ import annotations

import click

from par.cli import progress, views
from par.cli.agent_commands import not_found_hint
from par.cli.app import EXIT_FAILED, App, json_option
from par.cli.params import ID_ARG, env_pairs
from par.cli.render import show
from par.client import ApiError
from par.ids import ENV_KEY_RE

NO_RESTART = click.option(
    "--no-restart", is_flag=True,
    help="Change the record and env file only; the next start of the unit uses them.")


@click.group()
def env() -> None:
    """List, set and unset an agent's own variables (values are never shown)."""


@env.command("list")
@ID_ARG
@json_option
@click.pass_obj
def env_list(app: App, ident: str, as_json: bool) -> None:
    """List the names of the variables the deploy request set for ID."""
    try:
        data = app.client().env_names(ident)
    except ApiError as err:
        raise not_found_hint(err, ident) from None
    show(as_json, data, lambda d: list(d.get("names") or []) or ["(none)"])


def _change(app: App, ident: str, values: dict[str, str], unset: list[str], restart: bool,
            as_json: bool) -> None:
    client = app.client()
    try:
        answer = client.set_env(ident, values, unset, restart)
    except ApiError as err:
        raise not_found_hint(err, ident) from None
    if not restart:
        show(as_json, answer, lambda _: [f"{ident}: variables changed; they apply at the next "
                                         f"start (parctl restart {ident})"])
        return
    deployment_id = str(answer.get("deploymentId"))
    printer = (None if as_json else
               progress.PhasePrinter(app.isatty(), lambda s: click.echo(s, nl=False)))
    if printer is not None:
        printer.line(f"restarting {ident} with the changed variables "
                     f"(deployment {deployment_id}, same package and venv)")
    record = progress.wait_for(app, client, deployment_id, printer)
    if printer is not None:
        printer.line(str(record.get("status")))
    show(as_json, record, views.deployed)
    if record.get("status") != "healthy":
        click.echo(f"parctl: {views.deploy_failure(record)}", err=True)
        raise click.exceptions.Exit(EXIT_FAILED)


@env.command("set")
@ID_ARG
@click.argument("pairs", metavar="K=V...", nargs=-1, required=True, callback=env_pairs)
@NO_RESTART
@json_option
@click.pass_obj
def env_set(app: App, ident: str, pairs: dict[str, str], no_restart: bool,
            as_json: bool) -> None:
    """Set variables of ID and restart it with the same package and venv.

    The restart is a new deployment that replaces the running one once it is
    healthy (the old one keeps serving if it fails).
    """
    _change(app, ident, pairs, [], not no_restart, as_json)


def _names(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    for name in values:
        if not ENV_KEY_RE.fullmatch(name):
            raise click.BadParameter(f"{name!r} is not a variable name")
    return list(values)


@env.command("unset")
@ID_ARG
@click.argument("names", metavar="K...", nargs=-1, required=True, callback=_names)
@NO_RESTART
@json_option
@click.pass_obj
def env_unset(app: App, ident: str, names: list[str], no_restart: bool, as_json: bool) -> None:
    """Remove variables of ID and restart it with the same package and venv."""
    _change(app, ident, {}, names, not no_restart, as_json)


COMMANDS: tuple[click.Command, ...] = (env,)
