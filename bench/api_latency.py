"""API latency while agents start: does a starting agent stall pard?

Two measurements, each against a baseline from the same run:

1. `GET /deployments` on the unix socket, one request after another from one
   client for `window_s`: first with pard idle (10 agents running, nothing
   starting), then while 10 more agents start at once (each sleeps `start_s`
   in its import before READY=1, so pard waits on 10 units).  p50 / p99 / max
   and the ratio busy p99 / idle p99 (target: within 2x).
2. The GIL while a thread waits for a unit: iterations per second of a
   spinning thread while another thread waits on a unit that does not change,
   with PAR's wait (poll() on the bus fd) and with pystemd's `bus.wait()` (the
   wait PAR used before), against the same thread spinning alone.

    scripts/bench --api          (boots the sandbox when PID 1 is not systemd)
    /usr/bin/python3 -m bench.api_latency [--agents 10] [--window 8]   (systemd as PID 1)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time

from bench.common import BenchPard, Sizes, prerequisites
from par.client import Client
from par.units import Systemd
from tests.integration.pard import apkg_with

SLOW_MAIN = "import time\ntime.sleep({s})\n\ndef handler(ctx):\n    return {{}}\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latencies(client: Client, seconds: float, stop: threading.Event | None = None) -> list[float]:
    """Seconds of each GET /deployments, back to back, for `seconds` (or until `stop`)."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        t0 = time.perf_counter()
        client.deployments()
        out.append(time.perf_counter() - t0)
    return out


def summary(values: list[float]) -> str:
    return (f"n={len(values):5d}  p50 {statistics.median(values) * 1e3:7.2f} ms  "
            f"p99 {percentile(values, 0.99) * 1e3:7.2f} ms  max {max(values) * 1e3:7.2f} ms")


def api_while_starting(agents: int, window_s: float, start_s: float) -> dict:
    sizes = Sizes.tiny()
    with BenchPard.create("api-latency", sizes, extra={"workers": agents}) as pard:
        folder = pard.root / "apkg"
        files = {"agent.yaml": "name: slow\nversion: 1.0.0\nentrypoint: main:handler\n",
                 "src/main.py": SLOW_MAIN.format(s=start_s)}
        quick = apkg_with(folder, {**files, "src/main.py": SLOW_MAIN.format(s=0)})
        slow = apkg_with(folder, files)
        resident = [pard.submit(f"lat-run-{i}", quick) for i in range(agents)]
        for did in resident:
            pard.wait_healthy(did)
        client = Client(pard.socket, timeout=60)
        idle = latencies(client, window_s)
        dids = [pard.submit(f"lat-start-{i}", slow) for i in range(agents)]
        # measured once every one of them waits for its unit's READY
        deadline = time.monotonic() + 120
        while any(client.deployment(d)["status"] != "starting" for d in dids):
            if time.monotonic() > deadline:
                raise RuntimeError("the agents never were all starting at once")
            time.sleep(0.05)
        busy = latencies(client, window_s)
        statuses = [client.deployment(d)["status"] for d in dids]
        for did in dids:
            pard.wait_healthy(did)
    return {"idle": idle, "busy": busy, "starting_at_end": statuses.count("starting")}


def gil_while_waiting(seconds: float) -> dict:
    """Spinning-thread iterations/s: alone, beside PAR's unit wait, beside bus.wait()."""
    from pystemd.dbuslib import DBus

    def spin(stop: threading.Event) -> float:
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            n += 1
        return n / (time.perf_counter() - t0)

    def measure(waiter) -> float:
        stop = threading.Event()
        result: list[float] = []
        t = threading.Thread(target=lambda: result.append(spin(stop)))
        w = threading.Thread(target=waiter, daemon=True) if waiter else None
        if w:
            w.start()
        t.start()
        time.sleep(seconds)
        stop.set()
        t.join()
        return result[0]

    def par_wait() -> None:
        Systemd().wait_inactive("par-bench-nothing.service", timeout=seconds + 1)

    def pystemd_wait() -> None:
        with DBus() as bus:
            end = time.monotonic() + seconds + 1
            while time.monotonic() < end:
                bus.wait(500_000)
                while not bus.process().is_empty():
                    pass

    # wait_inactive on a unit that exists and never becomes inactive
    systemd_run = ["systemd-run", "--unit=par-bench-nothing", "sleep", "600"]
    subprocess.run(systemd_run, check=True, capture_output=True, timeout=30)
    try:
        alone = measure(None)
        par = measure(par_wait)
        old = measure(pystemd_wait)
    finally:
        subprocess.run(["systemctl", "stop", "par-bench-nothing"], capture_output=True,
                       timeout=30)
    return {"alone": alone, "par": par, "pystemd": old}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--window", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--start", type=float, default=20.0,
                        help="seconds each starting agent takes to READY")
    args = parser.parse_args(argv)
    missing = prerequisites()
    if missing:
        print("cannot run:", "; ".join(missing))
        return 2
    print(f"1. GET /deployments, {args.agents} agents running; then while {args.agents} more "
          f"start at once ({args.start:g} s each to READY)")
    api = api_while_starting(args.agents, args.window, args.start)
    print(f"   idle:             {summary(api['idle'])}")
    print(f"   while starting:   {summary(api['busy'])}")
    ratio = percentile(api["busy"], 0.99) / percentile(api["idle"], 0.99)
    print(f"   p99 ratio busy/idle: {ratio:.2f}x (target <= 2x: "
          f"{'met' if ratio <= 2 else 'missed'}); still starting at the window's end: "
          f"{api['starting_at_end']} of {args.agents}")
    print("2. a spinning thread's iterations/s while another thread waits on a unit")
    gil = gil_while_waiting(min(args.window, 3.0))
    for key, label in (("alone", "alone"), ("par", "beside PAR's wait (poll on the bus fd)"),
                       ("pystemd", "beside pystemd bus.wait() (before)")):
        print(f"   {label:42s} {gil[key] / 1e6:8.2f} M/s  "
              f"({gil[key] / gil['alone']:.2f}x of alone)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
