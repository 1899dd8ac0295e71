"""parctl(1) rendered from the click commands themselves, so the manual cannot drift
from the CLI: every command, its arguments and options, the environment and the
exit codes.  The Debian build runs `python3 -m par.cli.manpage > parctl.1`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from par import __version__
from par.cli.root import cli

ENVIRONMENT = (
    ("PARCTL_SOCKET", "pard's unix socket, instead of listen.socket from /etc/par/par.yaml "
                      "(same as --socket)."),
    ("_PARCTL_COMPLETE", "set to bash_source (or zsh_source, fish_source) to print the shell "
                         "completion script; the Debian package installs bash's."),
)
SEE_ALSO = ("pard (8)", "systemctl (1)", "journalctl (1)")


def _roff(text: str) -> str:
    """Text safe in a roff line: backslashes and leading dots or quotes escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.splitlines())


def _paragraphs(text: str) -> Iterator[str]:
    """click's help text as roff paragraphs; a `\\b` block keeps its line breaks."""
    for block in click.unstyle(text).strip().split("\n\n"):
        lines = block.splitlines()
        if lines and lines[0].strip() == "\b":
            yield ".PP\n.nf\n" + _roff("\n".join(lines[1:])) + "\n.fi"
        else:
            yield ".PP\n" + _roff(" ".join(line.strip() for line in lines))


def _commands(group: click.Group, ctx: click.Context,
              prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command,
                                                              click.Context]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=name, parent=ctx, **command.context_settings)
        yield (*prefix, name), command, sub
        if isinstance(command, click.Group):
            yield from _commands(command, sub, (*prefix, name))


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out += [".TP", f"\\fB{_roff(names)}\\fR", _roff(help_text or "")]
    return out


def render() -> str:
    """parctl(1) in roff."""
    root = click.Context(cli, info_name="parctl", **cli.context_settings)
    lines = [
        f'.TH PARCTL 1 "" "pixell-agent-runtime {__version__}" "PAR, the Pixell Agent Runtime"',
        ".SH NAME", "parctl \\- deploy and look after PAR agents",
        ".SH SYNOPSIS", "\\fBparctl\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION", *_paragraphs(cli.help or ""),
        ".SH OPTIONS", *_options(cli, root),
        ".SH COMMANDS",
    ]
    for path, command, ctx in _commands(cli, root):
        if isinstance(command, click.Group) and not command.params:
            lines += [".SS " + _roff("parctl " + " ".join(path)), *_paragraphs(command.help or "")]
            continue
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += [".SS " + _roff(f"parctl {' '.join(path)} {usage}"),
                  *_paragraphs(command.help or ""), *_options(command, ctx)]
    lines.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        lines += [".TP", f"\\fB{_roff(name)}\\fR", _roff(text)]
    lines += [".SH FILES", ".TP", "/etc/par/par.yaml", "the configuration (listen.socket, "
              "listen.token_file)",
              ".SH SEE ALSO", ",\n".join(f".BR {page}" for page in SEE_ALSO)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
