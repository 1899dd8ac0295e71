"""What the end-to-end benchmarks share: sizes, statistics, result rows, the agents
they deploy, and a pard running as par.service (the integration tests' harness).

Every benchmark runs offline: uv and the wheelhouse come from
`scripts/install-deps`, packages are `file://` URLs on the local socket.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from par.client import Client  # noqa: E402
from tests.integration.pard import UV, WHEELHOUSE, Pard, agent_get, free_port  # noqa: E402

PYTHON = Path("/usr/bin/python3")
TYPICAL_REQUIREMENTS = REPO / "tests" / "data" / "typical-requirements.txt"
# What an agent with the typical set imports at start (module names, not distributions).
TYPICAL_IMPORTS = ("fastapi", "uvicorn", "grpc", "google.protobuf", "pydantic", "httpx", "yaml",
                   "requests")
SMOKE_REQUIREMENTS = "idna\nh11\n"
SMOKE_IMPORTS = ("idna", "h11")
HELLO_AGENT = REPO / "examples" / "hello-agent"
BENCH_ROOT = Path("/var/lib/par-bench")  # not /tmp: agents get a private /tmp
# Port ranges apart from the integration tests' (18100.., 51100.., 13100..): the
# sandboxes share the host's network.  The A2A ranges sit above Linux's
# ephemeral range (32768-60999), so no outgoing connection ever holds one.
PORTS = {"rest": [28100, 28999], "a2a": [61100, 61999], "ui": [23100, 23999]}
SMOKE_PORTS = {"rest": [29100, 29999], "a2a": [62100, 62999], "ui": [24100, 24999]}
MB = 1024 * 1024


# ------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    """How big one invocation is: the real run, or the smoke run of the test suite."""

    runs: int = 5
    density_agents: int = 100
    density_runs: int = 5  # rounds of density_agents deploys (smoke: 2, so removal runs too)
    idle_s: float = 60.0
    idle_windows: int = 5
    settle_s: float = 2.0  # after the last deploy, before the idle window
    disk_agents: int = 10
    requirements: str = ""
    imports: tuple[str, ...] = TYPICAL_IMPORTS
    # the typical agent serves REST through FastAPI; the smoke set has no FastAPI
    rest_fastapi: bool = True
    smoke: bool = False
    ports: dict = field(default_factory=lambda: dict(PORTS))

    @classmethod
    def full(cls, runs: int = 5) -> Sizes:
        return cls(runs=runs, density_runs=runs, requirements=TYPICAL_REQUIREMENTS.read_text())

    @classmethod
    def tiny(cls) -> Sizes:
        """1 run, 3 agents, 5 s idle, two small wheels: checks the code, not the speed."""
        return cls(runs=1, density_agents=3, density_runs=2, idle_s=5.0, idle_windows=1,
                   settle_s=0.5, disk_agents=3, requirements=SMOKE_REQUIREMENTS,
                   imports=SMOKE_IMPORTS, rest_fastapi=False, smoke=True,
                   ports=dict(SMOKE_PORTS))


# ------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Stats:
    """Raw values of one measurement and their min / median / max."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        return cls(tuple(float(v) for v in values))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def min(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values) if self.values else math.nan

    def scaled(self, factor: float) -> Stats:
        return Stats(tuple(v * factor for v in self.values))


@dataclass
class Row:
    """One line of a result table.

    `ratio` is against the same-run baseline (or, where there is none, the
    reference the row names); `met` is whether the target holds for the
    `judged` figure ("median", "max" or "ratio"); None: no target.
    """

    what: str
    stats: Stats
    unit: str
    baseline: Stats | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    judged: str = "median"

    @property
    def judged_value(self) -> float | None:
        return self.ratio if self.judged == "ratio" else getattr(self.stats, self.judged)

    def to_dict(self) -> dict:
        return {"what": self.what, "unit": self.unit, "runs": self.stats.n,
                "min": _num(self.stats.min), "median": _num(self.stats.median),
                "max": _num(self.stats.max), "values": [_num(v) for v in self.stats.values],
                "baseline_median": _num(self.baseline.median) if self.baseline else None,
                "baseline_values": ([_num(v) for v in self.baseline.values]
                                    if self.baseline else None),
                "ratio": _num(self.ratio) if self.ratio is not None else None,
                "target": self.target, "met": self.met, "judged": self.judged}


@dataclass
class Section:
    """One benchmark's result: its table, what it did, and what to know about it."""

    key: str
    title: str
    what: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "rows": [r.to_dict() for r in self.rows],
                "notes": self.notes, "seconds": round(self.seconds, 1)}


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when it means nothing (zero or missing)."""
    if not denominator or math.isnan(denominator) or math.isnan(numerator):
        return None
    return numerator / denominator


# ------------------------------------------------------------------ agents
def write_agent(folder: Path, name: str, requirements: str | None, imports: Sequence[str],
                rest_fastapi: bool) -> Path:
    """An agent folder: `main.py` imports `imports` when the host loads it (as a real
    agent with these requirements does); with `rest_fastapi` it also mounts FastAPI
    routes, so the host serves REST through the venv's uvicorn."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "src").mkdir(parents=True)
    manifest = f"name: {name}\nversion: 1.0.0\nentrypoint: main:handler\n"
    if rest_fastapi:
        manifest += "rest:\n  entry: api:mount\n"
    (folder / "agent.yaml").write_text(manifest)
    if requirements:
        (folder / "requirements.txt").write_text(requirements)
    lines = [f"import {m}  # noqa: F401" for m in imports]
    (folder / "src" / "main.py").write_text("\n".join(lines) + textwrap.dedent('''

        def handler(context):
            return {"ok": True, "echo": context}
    '''))
    if rest_fastapi:
        (folder / "src" / "api.py").write_text(textwrap.dedent('''
            def mount(app):
                @app.get("/hello")
                def hello():
                    return {"hello": "world"}
        '''))
    return folder


def health_ok(port: int, timeout: float = 2.0) -> bool:
    """The agent's GET /health answers 200 with {"ok": true}."""
    try:
        status, body = agent_get(port, "/health", timeout=timeout)
        return status == 200 and bool(json.loads(body or b"{}").get("ok"))
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------ systemd
def systemctl(*args: str, timeout: float = 120, check: bool = True) -> str:
    res = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"systemctl {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def unit_props(unit: str, *props: str) -> dict[str, str]:
    """`systemctl show -p ...` of one unit as a dict."""
    out = systemctl("show", unit, *(f"-p{p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def start_to_ready(unit: str) -> float:
    """Seconds from the unit's last start to its READY=1, from systemd's own timestamps.

    The start is the earlier of systemd's fork of the main process
    (`ExecMainStartTimestamp`) and the unit leaving `inactive`, which systemd
    records just after that fork."""
    p = unit_props(unit, "InactiveExitTimestampMonotonic", "ExecMainStartTimestampMonotonic",
                   "ActiveEnterTimestampMonotonic")
    start = min(int(p["InactiveExitTimestampMonotonic"]), int(p["ExecMainStartTimestampMonotonic"]))
    ready = int(p["ActiveEnterTimestampMonotonic"])
    if not (start and ready and ready >= start):
        raise RuntimeError(f"{unit} has no start/READY timestamps: {p}")
    return (ready - start) / 1e6


def agent_main_pids() -> dict[str, int]:
    """MainPID of every loaded par-agent@ unit, in one systemctl call."""
    out = systemctl("show", "-pId", "-pMainPID", "par-agent@*.service")
    pids: dict[str, int] = {}
    for block in out.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if fields.get("Id"):
            pids[fields["Id"]] = int(fields.get("MainPID") or 0)
    return pids


# ------------------------------------------------------------------ pard
class BenchPard(Pard):
    """The integration tests' pard, with the benchmarks' ports and helpers to deploy and time.

    Teardown stops every agent unit (the sandbox is the benchmark's own) but
    removes only the state folders of agents it deployed: other sandboxes on
    this host may run agents of their own under /var/lib/private/par-agent.
    """

    def __init__(self, root: Path, ports: dict, extra: dict | None = None) -> None:
        config_extra = {"ports": ports, "venvs": {"max_venvs": 1000}, **(extra or {})}
        super().__init__(root, config_extra=config_extra)
        self.agents: set[str] = set()

    @classmethod
    def create(cls, tag: str, sizes: Sizes, extra: dict | None = None) -> BenchPard:
        return cls(BENCH_ROOT / f"{tag}-{uuid.uuid4().hex[:8]}", sizes.ports, extra)

    def __enter__(self) -> BenchPard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def client(self, timeout: float = 600) -> Client:
        return Client(self.socket, timeout=timeout)

    def submit(self, agent: str, apkg: Path, version: str = "1.0.0") -> str:
        """POST /deploy; returns the deploymentId (pard answers 202 before building)."""
        did = f"{agent}-{uuid.uuid4().hex[:8]}"
        self.agents.add(agent)
        self.client().deploy({"deploymentId": did, "agentAppId": agent, "orgId": "bench",
                              "version": version, "packageUrl": f"file://{apkg}"})
        return did

    def wait_healthy(self, did: str, timeout: float = 600) -> dict:
        """Follow the deployment until healthy: each GET ...?wait=&since= returns the
        moment the record changes, so the end is seen when it happens, without polling."""
        client = self.client()
        deadline = time.monotonic() + timeout
        record = client.deployment(did)
        while True:
            if record["status"] == "healthy":
                return record
            if record["status"] == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"deployment {did} is {record['status']}: {record.get('error')}"
                                   f"\n{self.journal(lines=40)}")
            record = client.deployment(did, wait=30, since=record["updatedAt"])

    def deploy_timed(self, agent: str, apkg: Path) -> tuple[float, dict]:
        """Seconds from the deploy request to a healthy deployment whose /health answers ok."""
        start = time.monotonic()
        did = self.submit(agent, apkg)
        record = self.wait_healthy(did)
        if not health_ok(record["ports"]["rest"]):
            raise RuntimeError(f"{agent} is healthy but its /health does not answer ok")
        return time.monotonic() - start, record

    def venv_path(self, record: dict) -> Path:
        return self.state / "venvs" / record["venv"]

    def teardown(self) -> None:
        self.stop()
        systemctl("kill", "-sKILL", "par-agent@*.service", check=False)
        systemctl("stop", "par-agent@*.service", check=False, timeout=300)
        systemctl("reset-failed", "par-agent@*.service", "par.service", check=False)
        Path("/run/systemd/system/par.service").unlink(missing_ok=True)
        systemctl("daemon-reload", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        for agent in self.agents:
            for base in (Path("/var/lib/private/par-agent"), Path("/var/lib/par-agent")):
                path = base / agent
                if path.is_symlink():
                    path.unlink()
                else:
                    shutil.rmtree(path, ignore_errors=True)
        for empty in (Path("/var/lib/private/par-agent"), Path("/var/lib/par-agent"), BENCH_ROOT):
            try:
                empty.rmdir()  # only when nothing else is left in it
            except OSError:
                pass
        self.remove_unit_dirs()


def prerequisites() -> list[str]:
    """What is missing to run the benchmarks here (empty: ready)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (pard runs as par.service)")
    if not (Path("/run/systemd/system").is_dir()
            and Path("/proc/1/comm").read_text().strip() == "systemd"):
        missing.append("systemd as PID 1 (scripts/bench boots the sandbox)")
    for path in (UV, WHEELHOUSE):
        if not path.exists():
            missing.append(f"{path} (run scripts/install-deps)")
    return missing


__all__ = ["BENCH_ROOT", "HELLO_AGENT", "MB", "PYTHON", "REPO", "UV", "WHEELHOUSE", "BenchPard",
           "Row", "Section", "Sizes", "Stats", "agent_main_pids", "free_port", "health_ok",
           "prerequisites", "ratio", "start_to_ready", "systemctl", "unit_props", "write_agent"]
