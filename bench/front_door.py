"""The front door's cost: the same load sent to an agent directly and through the front door.

One run starts a small aiohttp "agent" (GET /ping → a 40-byte JSON answer) and
the front door (`python -m par.front --listen`, a routes file naming the agent),
each in its own process, then measures from a third:

1. 64 keep-alive clients, back to back, for `--seconds`: requests per second and
   p50 / p99 latency, direct and through the front door (target: the front door
   keeps >= 50 % of direct throughput);
2. one client, back to back: p50 / p99 with no queueing, so the difference is
   what the extra hop costs a request (target: <= 1 ms added p50).

No systemd needed (loopback only, ~30 s on 2 CPUs):

    scripts/bench --front
    /usr/bin/python3 -m bench.front_door [--seconds 8] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
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


def run(seconds: float, clients: int) -> dict:
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

            async def measure() -> dict:
                await wait_up(direct)
                await wait_up(front)
                out = {}
                for name, url in (("direct", direct), ("front", front)):
                    await load(url, clients, 1.0)  # warm-up: connections, caches
                    out[f"{name}_{clients}"] = await load(url, clients, seconds)
                for name, url in (("direct", direct), ("front", front)):
                    out[f"{name}_1"] = await load(url, 1, seconds / 2)
                return out

            results = asyncio.run(measure())
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    d, f = results[f"direct_{clients}"], results[f"front_{clients}"]
    d1, f1 = results["direct_1"], results["front_1"]
    results["summary"] = {
        "clients": clients, "seconds": seconds,
        "throughput_ratio": round(f["rps"] / d["rps"], 3),
        "added_p50_ms_loaded": round(f["p50_ms"] - d["p50_ms"], 3),
        "added_p99_ms_loaded": round(f["p99_ms"] - d["p99_ms"], 3),
        "added_p50_ms_one_client": round(f1["p50_ms"] - d1["p50_ms"], 3),
        "added_p99_ms_one_client": round(f1["p99_ms"] - d1["p99_ms"], 3),
    }
    return results


def table(results: dict) -> str:
    """The Markdown table docs/benchmarks.md shows."""
    s = results["summary"]
    c = s["clients"]
    rows = ["| clients | path | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for n in (c, 1):
        for name in ("direct", "front"):
            r = results[f"{name}_{n}"]
            rows.append(f"| {n} | {'direct to the agent' if name == 'direct' else 'front door'}"
                        f" | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
                        f" {r['errors']} |")
    rows.append("")
    rows.append(f"Front door / direct throughput with {c} clients: **{s['throughput_ratio']:.0%}** "
                f"(target >= 50 %); added p50 with one client: "
                f"**{s['added_p50_ms_one_client']:.2f} ms** (target <= 1 ms), added p99 "
                f"{s['added_p99_ms_one_client']:.2f} ms; with {c} clients (queueing included) "
                f"added p50 {s['added_p50_ms_loaded']:.2f} ms, "
                f"p99 {s['added_p99_ms_loaded']:.2f} ms.")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args.seconds, args.clients)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
