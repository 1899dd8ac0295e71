"""What one parctl invocation works with, and how an error ends it.

`App` carries the socket, timeouts and the seams tests replace (exec, tty,
poll interval).  `ParctlGroup` turns any error escaping a command into one
line on stderr (and `{"error": ...}` on stdout under --json) and an exit code.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from par.cli.render import print_json
from par.client import DEFAULT_SOCKET, Client, DaemonUnreachable
from par.config import DEFAULT_CONFIG_PATH, Config
from par.config import load as load_config
from par.errors import ParError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # click's own code for usage errors
# Where parctl and systemctl say the same thing, they say it with the same code.
EXIT_NOT_RUNNING = 3  # systemctl status: the unit is not active
EXIT_NOT_FOUND = 4  # systemctl: no such unit
EXIT_UNREACHABLE = 69  # sysexits.h EX_UNAVAILABLE: pard is not answering

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class App:
    """What one parctl invocation works with; tests pass their own (socket, exec, poll)."""

    socket: Path | None = None
    timeout: float = 30.0
    config_path: Path = DEFAULT_CONFIG_PATH
    poll_interval: float = 0.25
    execvp: Callable[[str, list[str]], object] = os.execvp
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
        """A client for pard on `socket_path()`."""
        return Client(self.socket_path(), self.timeout)


def exit_code(err: ParError) -> int:
    """The exit code for an error: 69 unreachable, 4 not found, 1 anything else."""
    if isinstance(err, DaemonUnreachable):
        return EXIT_UNREACHABLE
    if err.status == 404 or err.code == "not_found":
        return EXIT_NOT_FOUND
    return EXIT_FAILED


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
                print_json({"error": err.to_dict()})
            click.echo(f"parctl: {err.message}", err=True)
            raise click.exceptions.Exit(exit_code(err)) from None
        except OSError as err:
            if err.errno == errno.EPIPE:
                raise  # `parctl list | head`: click exits quietly on EPIPE
            unexpected(err)
        except Exception as err:
            unexpected(err)


def unexpected(err: Exception) -> NoReturn:
    """A bug or an unforeseen failure: one line (the traceback with PARCTL_DEBUG=1), exit 1."""
    if os.environ.get("PARCTL_DEBUG") == "1":
        click.echo(traceback.format_exc(), err=True, nl=False)
    else:
        click.echo(f"parctl: unexpected error: {err.__class__.__name__}: {err} "
                   "(PARCTL_DEBUG=1 shows the traceback)", err=True)
    raise click.exceptions.Exit(EXIT_FAILED)


def json_option(f: F) -> F:
    """`--json` for a command that prints data; also makes errors print as JSON."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.ensure_object(App).json = True
        return value

    return click.option("--json", "as_json", is_flag=True, callback=remember,
                        expose_value=True, is_eager=True,
                        help="Print the API's JSON (stable field names) instead of text.")(f)
