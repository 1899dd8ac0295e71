"""End-to-end benchmarks: PAR's deploy speed, density, disk and restart, against the
existing runtime's steps run in the same invocation.

    1 cold deploy     bench/cold_deploy.py     4 disk            bench/disk.py
    2 warm redeploy   bench/warm_redeploy.py   5 daemon restart  bench/daemon_restart.py
    3 density         bench/density.py         6 agent start     bench/agent_start.py

Needs root and systemd as PID 1 (`scripts/bench` boots the project's sandbox
when PID 1 is not systemd, then runs this), uv and the wheelhouse from
`scripts/install-deps`.  Offline throughout.

    /usr/bin/python3 -m bench.e2e                  # all six, 5 runs each; prints the tables
    /usr/bin/python3 -m bench.e2e --write-docs     # ... and writes them into docs/benchmarks.md
    /usr/bin/python3 -m bench.e2e --smoke          # 1 run, 3 agents, 5 s idle (the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench import agent_start, cold_deploy, daemon_restart, density, disk, warm_redeploy
from bench.baseline import LegacyRuntime
from bench.common import BENCH_ROOT, REPO, WHEELHOUSE, BenchPard, Section, Sizes, prerequisites
from bench.report import RunInfo, machine, render_markdown, render_text, write_docs

DOCS = REPO / "docs" / "benchmarks.md"
COMMAND = "scripts/bench"


def run_all(sizes: Sizes, work: Path, show=print) -> tuple[list[Section], Path]:
    """Run the six benchmarks; returns their sections (in the documented order) and the
    pip a baseline venv used.  `show` gets each section's text as soon as it is done."""
    legacy = LegacyRuntime(work / "legacy", WHEELHOUSE)
    sections: list[Section] = []

    def done(section: Section) -> None:
        sections.append(section)
        show(render_text([section]) + "\n")

    # Deploy benchmarks on one pard; density and restart on a fresh one, so its
    # memory and the agents it holds are those of the benchmark alone.
    with BenchPard.create("deploys", sizes) as pard:
        cold = cold_deploy.run(pard, legacy, sizes, work)
        done(cold.section)
        done(warm_redeploy.run(pard, legacy, sizes, work, cold.legacy_venv))
        done(disk.run(pard, sizes, work, cold.legacy_venv))
        done(agent_start.run(pard, sizes, cold.apkg))
    with BenchPard.create("density", sizes) as pard:
        dens = density.run(pard, sizes)
        done(dens.section)
        done(daemon_restart.run(pard, sizes, dens.agents))
    sections.sort(key=lambda s: s.title)
    return sections, cold.legacy_venv / "bin" / "pip"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (>= 5)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: 1 run, 3 agents, 5 s idle, two small wheels")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the tables into --docs (smoke runs only into an explicit one)")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"the Markdown file to write (default {DOCS.relative_to(REPO)})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--command", default=COMMAND,
                        help="the command shown in the docs (what was run)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not args.smoke and args.runs < 5:
        parser.error("--runs must be >= 5 (use --smoke for a single quick run)")
    missing = prerequisites()
    if missing:
        print("bench: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    sizes = Sizes.tiny() if args.smoke else Sizes.full(args.runs)
    started, load = time.monotonic(), os.getloadavg()[0]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    work = BENCH_ROOT / f"work-{uuid.uuid4().hex[:8]}"
    try:
        sections, pip = run_all(sizes, work, show=lambda text: print(text, flush=True))
        info = RunInfo(command=args.command, seconds=time.monotonic() - started,
                       machine=machine(load, pip), started=stamp)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            try:
                BENCH_ROOT.rmdir()
            except OSError:
                pass
    print(f"all six in {info.seconds / 60:.1f} minutes; {info.machine}")
    if args.write_docs and args.smoke and args.docs is None:
        print(f"smoke run: {DOCS.relative_to(REPO)} left as it is")
    elif args.write_docs:
        docs = args.docs or DOCS
        write_docs(docs, render_markdown(sections, info))
        print(f"wrote {docs}")
    if args.json:
        args.json.write_text(json.dumps({"run": info.__dict__,
                                         "sections": [s.to_dict() for s in sections]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
