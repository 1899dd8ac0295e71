"""The `parctl` group: global options, the exit codes in --help, and every command."""

from __future__ import annotations

from pathlib import Path

import click

from par import __version__
from par.cli import agent_commands, env_commands, host_commands
from par.cli.app import App, ParctlGroup


# no_args_is_help=False: a bare `parctl` is a usage error (exit 2, "Missing command"),
# not a successful run, so a script that lost its arguments fails loudly.
@click.group("parctl", cls=ParctlGroup, no_args_is_help=False,
             context_settings={"help_option_names": ["-h", "--help"]})
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
    Exit codes (systemctl's where they mean the same):
      0  ok
      1  the operation failed (the message says why)
      2  usage error (unknown option, bad argument)
      3  status: the agent is not running healthy
      4  not found (no such agent or deployment)
      69 pard unreachable (start it with `systemctl start par`)

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


for _command in (*agent_commands.COMMANDS, *env_commands.COMMANDS, *host_commands.COMMANDS):
    cli.add_command(_command)


def main() -> None:
    """The `parctl` console script (shell completion: _PARCTL_COMPLETE=bash_source parctl)."""
    cli.main(prog_name="parctl", complete_var="_PARCTL_COMPLETE")
