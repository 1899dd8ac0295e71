"""Benchmark 3, density: many stdlib agents on one pard.

examples/hello-agent is packed once and deployed under N agentAppIds, all
requests sent at once (pard runs `workers` deploys in parallel); each run but
the last removes its N agents again (`DELETE ?purge=1`) and the next deploys N
new ones.  After the first run, with nothing asked of pard, its RSS and CPU
are sampled with psutil on par.service's MainPID over the idle window, split
into equal parts; its RSS again after every run.  With the last run's agents:
their memory (`GET /agents`: RSS of each unit's processes), the latency of
`parctl list` (the command, as a person runs it), of `GET /agents` (what it
asks) and of `GET /metrics`.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.common import HELLO_AGENT, MB, PYTHON, REPO, BenchPard, Row, Section, Sizes, Stats

TARGET_RSS_MB = 80.0
TARGET_CPU_PCT = 1.0


@dataclass
class DensityResult:
    section: Section
    agents: list[str]


def deploy_all(pard: BenchPard, apkg: Path, agents: list[str],
               timeout: float = 900) -> tuple[float, list[dict]]:
    """Send every deploy at once; seconds from the first request to the last healthy."""
    client = pard.client()
    wall0 = time.time()
    dids = {pard.submit(agent, apkg) for agent in agents}
    deadline = time.monotonic() + timeout
    while True:
        records = [d for d in client.deployments()["deployments"] if d["deploymentId"] in dids]
        failed = [d for d in records if d["status"] == "failed"]
        if failed:
            raise RuntimeError(f"{len(failed)} deploys failed, e.g. {failed[0]['error']}")
        if len(records) == len(dids) and all(d["status"] == "healthy" for d in records):
            # pard's own timestamps: not rounded up to this loop's polling
            return max(d["updatedAt"] for d in records) - wall0, records
        if time.monotonic() > deadline:
            raise RuntimeError(f"deploys not healthy after {timeout} s:\n{pard.journal(lines=40)}")
        time.sleep(0.2)


def remove_all(pard: BenchPard, records: list[dict]) -> None:
    """Remove the deployments and their files, a few at a time (as pard's workers would)."""
    client = pard.client()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda d: client.delete(d["deploymentId"], purge=True), records))


def idle_samples(pid: int, seconds: float, windows: int) -> tuple[list[float], list[float]]:
    """CPU % (of one CPU) and RSS (MB) of `pid` over `windows` equal parts of `seconds`."""
    proc = psutil.Process(pid)
    cpu, rss = [], []
    part = seconds / windows
    for _ in range(windows):
        t0, c0 = time.monotonic(), proc.cpu_times()
        time.sleep(part)
        t1, c1 = time.monotonic(), proc.cpu_times()
        used = (c1.user - c0.user) + (c1.system - c0.system)
        cpu.append(100.0 * used / (t1 - t0))
        rss.append(proc.memory_info().rss / MB)
    return cpu, rss


def timed(call) -> float:
    t0 = time.monotonic()
    call()
    return time.monotonic() - t0


def parctl_list(pard: BenchPard) -> None:
    subprocess.run([str(PYTHON), "-m", "par.cli", "--socket", str(pard.socket), "list"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)


def run(pard: BenchPard, sizes: Sizes) -> DensityResult:
    started = time.monotonic()
    n = sizes.density_agents
    apkg = pard.pack(HELLO_AGENT)
    totals, per_deploy, round_rss = [], [], []
    records: list[dict] = []  # the previous round's agents, removed before the next
    for r in range(sizes.density_runs):
        if r:
            remove_all(pard, records)
        agents = [f"dens{r}-{i:03d}" for i in range(n)]
        total, records = deploy_all(pard, apkg, agents)
        totals.append(total)
        per_deploy += [d["updatedAt"] - d["createdAt"] for d in records]
        if r == 0:  # idle: a pard that has deployed these N agents, nothing else
            time.sleep(sizes.settle_s)
            cpu, rss = idle_samples(pard.main_pid(), sizes.idle_s, sizes.idle_windows)
        round_rss.append(psutil.Process(pard.main_pid()).memory_info().rss / MB)
    client = pard.client()
    listed = client.agents()["agents"]
    agent_rss = [a["resources"]["rssBytes"] / MB for a in listed
                 if a["agentAppId"] in set(agents) and a.get("resources")]
    list_cli, list_api, metrics = [], [], []
    for _ in range(sizes.runs):  # interleaved: other load on the host hits all three alike
        list_cli.append(timed(lambda: parctl_list(pard)))
        list_api.append(timed(client.agents))
        metrics.append(timed(client.metrics))
    rss_s, cpu_s = Stats.of(rss), Stats.of(cpu)
    window = sizes.idle_s / sizes.idle_windows
    rows = [
        Row(f"deploy {n} agents: first request → last healthy", Stats.of(totals), "s"),
        Row(f"↳ each deploy: request → healthy, queued behind {pard_workers(pard)} workers "
            f"({len(per_deploy)} deploys)", Stats.of(per_deploy), "s"),
        Row(f"pard RSS at idle ({sizes.idle_windows} samples, {window:g} s apart)", rss_s, "MB",
            target=f"< {TARGET_RSS_MB:g} MB", met=rss_s.max < TARGET_RSS_MB, judged="max"),
        Row(f"pard CPU at idle, % of one CPU ({sizes.idle_windows} windows of {window:g} s)",
            cpu_s, "%", target=f"< {TARGET_CPU_PCT:g} %", met=cpu_s.max < TARGET_CPU_PCT,
            judged="max"),
        Row(f"pard RSS after each run ({n * sizes.density_runs} deploys and "
            f"{n * (sizes.density_runs - 1)} removals in all)", Stats.of(round_rss), "MB"),
        Row(f"agent memory: unit RSS ({len(agent_rss)} agents)", Stats.of(agent_rss), "MB"),
        Row(f"`parctl list` with {n} agents (the command: python start, click, request)",
            Stats.of(list_cli).scaled(1000), "ms"),
        Row("↳ `GET /agents` (what parctl list asks: unit state and RSS of every agent)",
            Stats.of(list_api).scaled(1000), "ms"),
        Row("`GET /metrics`", Stats.of(metrics).scaled(1000), "ms"),
    ]
    per_agent_ms = Stats.of(list_api).median * 1000 / max(1, len(listed))
    notes = [f"pard's RSS after runs 1 to {len(round_rss)}: "
             + ", ".join(f"{v:.1f}" for v in round_rss) + " MB.",
             f"`GET /agents` costs about {per_agent_ms:.1f} ms per agent (its unit's state "
             "from systemd, the RSS and CPU time of its processes); `parctl list` adds its "
             "own start (Python, click) on top."]
    section = Section(
        key="density", title="3. Density",
        what=(f"examples/hello-agent (standard library only), packed once, deployed under {n} "
              f"agentAppIds, all requests sent at once; {sizes.density_runs} runs, each but "
              f"the last removing its {n} agents again (purged) before the next deploys {n} "
              "new ones. Idle, after the first run (a pard that has deployed these "
              f"{n} agents): nothing asked of pard for {sizes.idle_s:g} s once the last agent "
              f"became healthy (+{sizes.settle_s:g} s), psutil on par.service's MainPID. Agent "
              "memory and the latencies: with the last run's agents. No same-run baseline: the "
              "existing runtime runs every agent inside its own process (or, in its older "
              "version, one subprocess of about 85 MB per agent); the targets stand instead."),
        rows=rows,
        notes=notes,
        seconds=time.monotonic() - started,
    )
    return DensityResult(section, agents)


def pard_workers(pard: BenchPard) -> int:
    return int(pard.client().daemon_health()["capacity"]["workers"])
