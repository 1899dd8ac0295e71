"""The front door's cost: the same load sent to an agent directly and through the front door.

One run starts a small aiohttp "agent" (GET /ping → a 40-byte JSON answer) and
the front door (`python -m par.front --listen`, a routes file naming the agent),
each in its own process, then measures from a third:

1. saturated (closed loop): 64 keep-alive clients, each sending its next request
   the moment the last answer arrived, for `--seconds`: the most requests per
   second each path serves (target: the front door keeps >= 50 % of direct
   throughput).  Their p50 / p99 are printed too, but they measure queueing:
   with every client always waiting, p50 is about clients / throughput (Little's
   law), so the front door's higher p50 there is its lower throughput restated;
2. fixed rate (open loop): the same 64 keep-alive clients, now sending on a
   schedule, together `--load` (50 %) of the front door's saturated throughput
   from step 1, the same rate for both paths.  Latency is counted from the time
   a request was due to be sent, not from when it went out, so a request held
   up behind a slow answer on its connection counts the wait (no coordinated
   omission).  Front door p50 / p99 minus direct p50 / p99 at that rate is what
   the hop adds to a request under load (target: <= 1 ms added p50);
3. one client, back to back: p50 / p99 with no load at all.

No systemd needed (loopback only, ~45 s on 2 CPUs):

    scripts/bench --front
    /usr/bin/python3 -m bench.front_door [--seconds 8] [--clients 64] [--load 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from aiohttp import ClientSession, TCPConnector

from par.front.routes import render

REPO = Path(__file__).resolve().parent.parent
AGENT = '''
import sys
from aiohttp import web

async def ping(request):
    return web.json_response({"ok": True, "agent": "bench-agent"})

app = web.Application()
app.router.add_get("/ping", ping)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all CPUs have spent busy so far (/proc/stat: user, nice, system, irq,
    softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def wait_up(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    async with ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer")
            await asyncio.sleep(0.05)


async def load(url: str, clients: int, seconds: float) -> dict[str, float]:
    """`clients` keep-alive connections sending GETs back to back for `seconds`."""
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def client(session: ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                async with session.get(url) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except OSError:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = TCPConnector(limit=clients, limit_per_host=clients)
    async with ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        took = time.monotonic() - started
    return {"rps": len(latencies) / took, "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000, "requests": len(latencies),
            "errors": errors}


async def fixed_rate(url: str, clients: int, rate: float, seconds: float,
                     warmup: float = 1.0) -> dict[str, float]:
    """`clients` keep-alive connections together sending `rate` GETs per second on a fixed
    schedule (client i sends at start + i / rate + k * clients / rate) for `warmup` +
    `seconds`; the requests due during the warm-up are not counted.  Latency is from the
    time a request was due to its answer's last byte (a request that could only go out
    late, because its connection was still waiting for the previous answer or the loop
    was busy, counts that delay); `service` is from when it actually went out."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    service: list[float] = []
    errors = 0
    interval = clients / rate  # each client's time between two sends
    start = loop.time() + 0.05
    counted_from = start + warmup
    end = counted_from + seconds

    async def client(session: ClientSession, first: float) -> None:
        nonlocal errors
        due = first
        while due < end:
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            sent = loop.time()
            ok = True
            try:
                async with session.get(url) as r:
                    await r.read()
                    ok = r.status == 200
            except OSError:
                ok = False
            done = loop.time()
            if due >= counted_from:
                latencies.append(done - due)
                service.append(done - sent)
                errors += not ok
            due += interval

    connector = TCPConnector(limit=clients, limit_per_host=clients)
    async with ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session, start + i / rate) for i in range(clients)))
    return {"rate": rate, "rps": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "service_p50_ms": percentile(service, 0.5) * 1000,
            "service_p99_ms": percentile(service, 0.99) * 1000,
            "requests": len(latencies), "errors": errors}


def run(seconds: float, clients: int, load_fraction: float = 0.5,
        rate: float | None = None) -> dict:
    """Start the agent and the front door, measure both ways, stop them."""
    agent_port, front_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="par-bench-front-") as tmp:
        routes = Path(tmp) / "routes.json"
        routes.write_bytes(render({"schema": 1, "agents": {"bench": {
            "deploymentId": "bench-1", "current": True, "status": "healthy",
            "desiredState": "running", "ports": {"rest": agent_port}}}, "deployments": {}}))
        try:
            procs.append(subprocess.Popen([sys.executable, "-c", AGENT, str(agent_port)]))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "par.front", "--routes", str(routes),
                 "--listen", f"127.0.0.1:{front_port}", "--max-connections", "4096"],
                cwd=REPO, stderr=subprocess.DEVNULL))
            direct = f"http://127.0.0.1:{agent_port}/ping"
            front = f"http://127.0.0.1:{front_port}/agents/bench/ping"

            who = {"agent": procs[0].pid, "front": procs[1].pid}

            def cpu_now() -> dict[str, float]:
                now = {k: cpu_seconds(pid) for k, pid in who.items()}
                now["client"] = time.process_time()
                now["machine"], now["wall"] = machine_busy_seconds(), time.monotonic()
                return now

            async def step(work: Awaitable[dict]) -> dict:
                """`work`'s result with the CPU each process spent per request (the front
                door's: its own cost), and the CPU everything else on the machine used
                meanwhile (other jobs disturb a run: its numbers are then not comparable)."""
                before = cpu_now()
                r = await work
                after = cpu_now()
                used = {k: after[k] - before[k] for k in after}
                r["cpu_us_per_request"] = {k: round(used[k] * 1e6 / r["requests"], 1)
                                           for k in ("agent", "front", "client")}
                others = used["machine"] - used["agent"] - used["front"] - used["client"]
                r["others_cpu"] = round(max(0.0, others) / used["wall"], 2)
                return r

            async def measure() -> dict:
                await wait_up(direct)
                await wait_up(front)
                out = {}
                for name, url in (("direct", direct), ("front", front)):
                    await load(url, clients, 1.0)  # warm-up: connections, caches
                    out[f"{name}_{clients}"] = await step(load(url, clients, seconds))
                # the same offered load for both: a share of what the front door can do
                offered = rate or load_fraction * out[f"front_{clients}"]["rps"]
                for name, url in (("direct", direct), ("front", front)):
                    out[f"{name}_rate"] = await step(fixed_rate(url, clients, offered, seconds))
                for name, url in (("direct", direct), ("front", front)):
                    out[f"{name}_1"] = await step(load(url, 1, seconds / 2))
                return out

            results = asyncio.run(measure())
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    d, f = results[f"direct_{clients}"], results[f"front_{clients}"]
    d1, f1 = results["direct_1"], results["front_1"]
    dr, fr = results["direct_rate"], results["front_rate"]
    results["summary"] = {
        "clients": clients, "seconds": seconds,
        "throughput_ratio": round(f["rps"] / d["rps"], 3),
        "front_cpu_us_per_request": f["cpu_us_per_request"]["front"],
        "offered_rps": round(fr["rate"], 1),
        "offered_of_front_max": round(fr["rate"] / f["rps"], 3),
        "offered_of_direct_max": round(fr["rate"] / d["rps"], 3),
        "added_p50_ms": round(fr["p50_ms"] - dr["p50_ms"], 3),
        "added_p99_ms": round(fr["p99_ms"] - dr["p99_ms"], 3),
        "added_p50_ms_from_send": round(fr["service_p50_ms"] - dr["service_p50_ms"], 3),
        "added_p99_ms_from_send": round(fr["service_p99_ms"] - dr["service_p99_ms"], 3),
        "added_p50_ms_saturated": round(f["p50_ms"] - d["p50_ms"], 3),
        "added_p99_ms_saturated": round(f["p99_ms"] - d["p99_ms"], 3),
        "added_p50_ms_one_client": round(f1["p50_ms"] - d1["p50_ms"], 3),
        "added_p99_ms_one_client": round(f1["p99_ms"] - d1["p99_ms"], 3),
    }
    return results


def table(results: dict) -> str:
    """The Markdown tables docs/benchmarks.md shows."""
    s = results["summary"]
    c = s["clients"]
    name = {"direct": "direct to the agent", "front": "front door"}
    rows = ["Back to back (closed loop: each client sends its next request as soon as the "
            f"last answer arrived); with {c} clients both paths are saturated: their "
            "throughput, and a p50 that is queueing (about clients / throughput)", "",
            "| clients | path | req/s | p50 ms | p99 ms | errors | others' CPU |",
            "|---|---|---|---|---|---|---|"]
    for n in (c, 1):
        for path in ("direct", "front"):
            r = results[f"{path}_{n}"]
            rows.append(f"| {n} | {name[path]} | {r['rps']:.0f} | {r['p50_ms']:.2f} |"
                        f" {r['p99_ms']:.2f} | {r['errors']} | {r['others_cpu']:.0%} |")
    cpu = {path: results[f"{path}_{c}"]["cpu_us_per_request"] for path in ("direct", "front")}
    rows += ["", f"CPU per request, {c} clients saturated (µs): front door "
             f"{cpu['front']['front']:.0f}; agent {cpu['direct']['agent']:.0f} direct, "
             f"{cpu['front']['agent']:.0f} through the front door; load generator "
             f"{cpu['direct']['client']:.0f} direct, {cpu['front']['client']:.0f} through the "
             "front door"]
    rows += ["", f"Fixed rate: {c} clients sending together {s['offered_rps']:.0f} req/s on a "
             f"schedule ({s['offered_of_front_max']:.0%} of the front door's saturated "
             f"throughput, {s['offered_of_direct_max']:.0%} of direct); latency from when "
             "each request was due", "",
             "| path | offered req/s | answered req/s | p50 ms | p99 ms "
             "| from send: p50 ms | p99 ms | errors | others' CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in ("direct", "front"):
        r = results[f"{path}_rate"]
        rows.append(f"| {name[path]} | {r['rate']:.0f} | {r['rps']:.0f} | {r['p50_ms']:.2f} |"
                    f" {r['p99_ms']:.2f} | {r['service_p50_ms']:.2f} |"
                    f" {r['service_p99_ms']:.2f} | {r['errors']} | {r['others_cpu']:.0%} |")
    rows += ["", "others' CPU: what everything but the agent, the front door and this load "
             "generator used meanwhile (100 % = one of the machine's CPUs; the kernel's own "
             "work for loopback traffic is part of it); a step disturbed by other jobs is "
             "not comparable.", ""]
    rows.append(f"Front door / direct throughput, {c} clients saturated: "
                f"**{s['throughput_ratio']:.0%}** (target >= 50 %).  Added at "
                f"{s['offered_rps']:.0f} req/s, {c} clients: p50 **{s['added_p50_ms']:.2f} ms** "
                f"(target <= 1 ms), p99 **{s['added_p99_ms']:.2f} ms** (from send: p50 "
                f"{s['added_p50_ms_from_send']:.2f} ms, p99 {s['added_p99_ms_from_send']:.2f} ms)."
                f"  One client: added p50 "
                f"{s['added_p50_ms_one_client']:.2f} ms, p99 "
                f"{s['added_p99_ms_one_client']:.2f} ms.  Saturated (queueing, not the hop): "
                f"p50 {s['added_p50_ms_saturated']:+.2f} ms, "
                f"p99 {s['added_p99_ms_saturated']:+.2f} ms.")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--load", type=float, default=0.5,
                        help="fixed-rate step: this share of the front door's saturated "
                             "throughput (default 0.5)")
    parser.add_argument("--rate", type=float,
                        help="fixed-rate step: this many requests per second instead")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args.seconds, args.clients, args.load, args.rate)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
