"""The one way parctl prints an answer, and the formats its text uses.

Every command hands `show` the data (the API's JSON, unchanged, or a mapping
of its own for `doctor`, `pack` and `version`) and a text view: under --json
the data is printed as JSON, else the lines the view gives.  So the JSON
shape is whatever the command computed, and the text never leaks into it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

import click

T = TypeVar("T")

# A text view: the lines to print for an answer (none: print nothing).
TextView = Callable[[T], Iterable[str]]


def show(as_json: bool, data: T, text: TextView[T]) -> None:
    """Print `data` as JSON with --json, else the lines `text(data)` gives."""
    if as_json:
        print_json(data)
        return
    lines = list(text(data))
    if lines:
        click.echo("\n".join(lines))


def print_json(data: object) -> None:
    """`data` as indented JSON, the --json output of every command."""
    click.echo(json.dumps(data, indent=2))


def format_bytes(n: object) -> str:
    """`85.0 MiB`; `-` when `n` is not a number."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"


def format_duration(seconds: object) -> str:
    """`1h2m`, `3d4h`, `12s`: the two largest units; `-` when unknown."""
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


def ago(ts: object, now: float) -> str:
    """`5m2s ago` for a timestamp; `-` when there is none."""
    return f"{format_duration(now - ts)} ago" if isinstance(ts, int | float) and ts else "-"


def clock(ts: object) -> str:
    """A timestamp as local `YYYY-MM-DD HH:MM:SS`; `-` when there is none."""
    if not isinstance(ts, int | float):
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart (like systemctl list-units)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def ports_text(ports: object, sep: str = ", ") -> str:
    """`rest 8100, a2a 50100`: the surfaces that have a port; `-` when none."""
    if not isinstance(ports, dict):
        return "-"
    shown = [f"{k} {v}" for k, v in ports.items() if v]
    return sep.join(shown) or "-"


def health_url(record: dict) -> str | None:
    """The agent's REST /health URL on this host, when it has a REST port (at the
    record's `address`: its own with agents.isolate_loopback; pard before 0.2: none)."""
    rest = (record.get("ports") or {}).get("rest")
    if not rest:
        return None
    host = record.get("address") or "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{rest}/health"


def unit_text(details: object) -> str:
    """`active (running), pid 1234, restarts 0` from a health answer's details."""
    if not isinstance(details, dict):
        return "-"
    nested = details.get("unit")
    unit: dict = nested if isinstance(nested, dict) else details
    state = unit.get("activeState")
    if state is None:
        return "-"
    text = f"{state} ({unit.get('subState', '?')})"
    if unit.get("mainPid"):
        text += f", pid {unit['mainPid']}"
    if unit.get("nRestarts") is not None:
        text += f", restarts {unit['nRestarts']}"
    return text
