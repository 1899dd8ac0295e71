"""Results as text (the terminal) and Markdown (docs/benchmarks.md).

`write_docs` replaces only the end-to-end part of docs/benchmarks.md, between
two marker comments (appended after everything else the first time), so the
sections written by hand or by bench/venv_build.py stay as they are.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.common import UV, Row, Section

BEGIN = "<!-- BEGIN end-to-end: written by scripts/bench; edits here are overwritten -->"
END = "<!-- END end-to-end -->"
HEADERS = ["measurement", "runs", "min", "median", "max", "same-run baseline (median)", "ratio",
           "target"]


@dataclass
class RunInfo:
    """What the run was: its command, machine and duration."""

    command: str
    seconds: float
    machine: str
    started: str


def fmt(value: float | None, unit: str) -> str:
    """A number with its unit, to a precision that means something for it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if unit == "s":
        return f"{value:.2f} s" if value >= 1 else f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "%":
        return f"{value:.2f} %"
    return f"{value:g}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def target_text(row: Row) -> str:
    if not row.target:
        return ""
    if row.met is None:
        return row.target
    return f"{row.target}: {'met' if row.met else 'missed'}"


def row_cells(row: Row) -> list[str]:
    s = row.stats
    return [row.what, str(s.n), fmt(s.min, row.unit), fmt(s.median, row.unit),
            fmt(s.max, row.unit), fmt(row.baseline.median, row.unit) if row.baseline else "–",
            fmt_ratio(row.ratio), target_text(row)]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in row_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(sections: list[Section]) -> str:
    """Every row that has a target: what was measured, its median (or ratio), the verdict."""
    lines = ["| benchmark | measurement | result | target |", "|---|---|---|---|"]
    for s in sections:
        for row in s.rows:
            if row.met is None:
                continue
            value = (fmt_ratio(row.ratio) if row.judged == "ratio"
                     else fmt(row.judged_value, row.unit))
            lines.append(f"| {s.title} | {row.what} | {row.judged} {value} | {target_text(row)} |")
    return "\n".join(lines)


def text_table(rows: list[Row]) -> str:
    """Aligned columns for a terminal."""
    table = [HEADERS] + [row_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    widths[0] = min(widths[0], 70)
    out = []
    for line in table:
        first = line[0] if len(line[0]) <= 70 else line[0][:67] + "..."
        rest = zip(line[1:], widths[1:], strict=True)  # every row has one cell per header
        cells = [first.ljust(widths[0])] + [c.rjust(w) for c, w in rest]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def render_text(sections: list[Section]) -> str:
    parts = []
    for s in sections:
        parts.append(f"== {s.title} ({s.seconds:.0f} s)\n{text_table(s.rows)}")
        parts += [f"   {note}" for note in s.notes]
    return "\n\n".join(parts)


def render_markdown(sections: list[Section], info: RunInfo) -> str:
    parts = [
        BEGIN,
        "## End to end",
        "",
        "Deploy speed, density, disk and restart, measured through pard running as "
        "par.service under real systemd (the project's sandbox where PID 1 is not "
        "systemd), against the existing runtime's steps done by a small script in the same "
        "run (`bench/baseline.py`). Everything offline: uv and the wheelhouse from "
        "`scripts/install-deps`, packages as `file://` URLs on the local socket. The "
        "typical agent's requirements are `tests/data/typical-requirements.txt`. Each "
        "table shows min / median / max over the runs; the ratio is against the same-run "
        "baseline unless the row says otherwise (for times: baseline / PAR, so above 1 "
        "means PAR is faster). The machine may run other work meanwhile "
        "(see its load average below): single runs vary, compare medians. Benchmarks never "
        "fail for being slow; "
        "`tests/integration/test_bench_smoke.py` runs all six with tiny sizes (1 run, 3 "
        "agents, 5 s idle) so they cannot rot.",
        "",
        "Command (from the repository root, as root; boots its own sandbox when PID 1 is "
        "not systemd, writes this section):",
        "",
        "```",
        info.command,
        "```",
        "",
        f"Run: {info.started}, {info.seconds / 60:.1f} minutes for all six. "
        f"Machine: {info.machine}.",
    ]
    parts += ["", "The targets, from this run:", "", summary_table(sections)]
    for s in sections:
        parts += ["", f"### {s.title}", "", s.what, "", markdown_table(s.rows)]
        if s.notes:
            parts.append("")
            parts += [f"- {note}" for note in s.notes]
    parts += ["", END]
    return "\n".join(parts) + "\n"


def write_docs(path: Path, markdown: str) -> None:
    """Put `markdown` between the markers of `path` (or append it), keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + markdown.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + markdown
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def machine(load_start: float, pip: Path | None = None) -> str:
    """CPUs, memory, kernel, Python, uv, pip (`pip`: a venv's pip) and systemd versions,
    and the 1-minute load average at the start and now (other work on the machine)."""
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            return out.splitlines()[0].strip() if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    pip_text = first_line([str(pip), "--version"]).split(" from ")[0] + ", " if pip else ""
    return (f"{os.cpu_count()} CPUs, {mem_gb:.0f} GB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {first_line([str(UV), '--version'])}, "
            f"{pip_text}{first_line(['systemctl', '--version'])}; "
            f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
