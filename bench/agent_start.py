"""Benchmark 6, agent start: unit start → READY for the typical agent, with and without bytecode.

Two agents of the same code and packages: one keeps the bytecode PAR compiled
at build time (`par.installers.compile_bytecode`, hardlinked from the shared
store); the other's requirements carry an extra comment line, so its venv links
a layer of installed packages of its own, and that layer has every
`__pycache__` folder under `lib/` removed after the deploy, which is what
`installer.compile_bytecode: false` gives.
The unit's venv is read-only and PYTHONDONTWRITEBYTECODE is set, so the
second agent compiles every module it imports on every start.

Each run restarts both agents through the API (`POST /deployments/{id}/restart`)
and reads systemd's own timestamps of the new unit: its main process forked
(`ExecMainStartTimestamp`) → `ActiveEnterTimestamp` (the host's READY=1, sent
once its surfaces answer).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.common import BenchPard, Row, Section, Sizes, Stats, ratio, start_to_ready, write_agent
from par.venvs import linked_layer


def strip_bytecode(venv: Path) -> int:
    """Remove every __pycache__ under lib/ of the venv's layer (hardlinks: the store keeps
    its copy)."""
    count = 0
    tree = linked_layer(venv) or venv
    for cache in sorted((tree / "lib").rglob("__pycache__")):
        count += sum(1 for _ in cache.glob("*.pyc"))
        shutil.rmtree(cache)
    return count


def run(pard: BenchPard, sizes: Sizes, apkg: Path) -> Section:
    started = time.monotonic()
    client = pard.client()
    _, with_bc = pard.deploy_timed("start-bytecode", apkg)
    # the same agent, with requirements of its own hash: a layer no other agent links
    own = write_agent(pard.root / "typical-nobytecode", "typical-agent",
                      f"{sizes.requirements.rstrip()}\n# without bytecode\n", sizes.imports,
                      sizes.rest_fastapi)
    _, without_bc = pard.deploy_timed("start-nobytecode", pard.pack(own))
    removed = strip_bytecode(pard.venv_path(without_bc))

    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(sizes.runs):
        for key, record in (("with", with_bc), ("without", without_bc)):
            client.action(record["deploymentId"], "restart")  # returns once active
            times[key].append(start_to_ready(record["unit"]))

    with_s, without_s = Stats.of(times["with"]), Stats.of(times["without"])
    rows = [
        Row("unit fork → READY, with bytecode", with_s, "s"),
        Row("unit fork → READY, without bytecode (ratio: without / with)", without_s, "s",
            with_s, ratio(without_s.median, with_s.median)),
    ]
    return Section(
        key="agent_start", title="6. Agent start",
        what=("The typical agent (it imports " + ", ".join(sizes.imports)
              + (" and serves REST through FastAPI/uvicorn" if sizes.rest_fastapi else "")
              + ") restarted through the API; systemd's timestamps of the new unit, from the "
              "fork of its main process to READY=1. `without`: the same agent and packages in "
              f"a layer of their own with every `__pycache__` removed ({removed} .pyc files); "
              "the unit's venv is read-only, so every start compiles every module it imports "
              "again."),
        rows=rows,
        seconds=time.monotonic() - started,
    )
