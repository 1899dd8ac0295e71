"""Checks of ids and options given on the command line: a bad one is a usage error (exit 2)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import click

from par import ids
from par.errors import ParError


def option_id(value: str | None, param: str, check: Callable[[object, str], str]) -> str | None:
    """Validate an id given on the command line with `check` (an `ids` function)."""
    if value is None:
        return None
    try:
        return check(value, param)
    except ParError as err:
        raise click.BadParameter(err.message, param_hint=param) from None


def env_pairs(_ctx: click.Context, _param: click.Parameter,
              values: Iterable[str]) -> dict[str, str]:
    """`--env K=V`, repeated, as a mapping; K must be a valid variable name."""
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not ids.ENV_KEY_RE.fullmatch(key):
            raise click.BadParameter(
                f"{item!r}: expected K=V with K matching {ids.ENV_KEY_RE.pattern}")
        env[key] = value
    return env


def sha256_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`--sha256`: 64 hex digits, given in either case, passed on in lower case."""
    if value is not None and not ids.SHA256_RE.fullmatch(value.lower()):
        raise click.BadParameter("expected 64 hexadecimal characters")
    return value.lower() if value else None


def check_ident(value: str) -> str:
    """An agent id or deploymentId from the command line."""
    if not ids.DEPLOYMENT_ID_RE.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not an agent id or a deploymentId", param_hint="ID")
    return value


# The ID argument of the commands that act on one agent or deployment.
ID_ARG = click.argument("ident", metavar="ID", callback=lambda _c, _p, v: check_ident(v))
