"""The end-to-end benchmarks (bench/e2e.py, run by scripts/bench) with tiny sizes.

1 run, 3 agents, 5 s idle, two small wheels: this checks that all six
benchmarks still run against the current pard and report sane numbers
(finite, non-negative, the right counts), and that writing docs/benchmarks.md
keeps the sections around the generated one.  The front door's benchmark
(bench/front_door.py, `scripts/bench --front`) runs with 4 clients for 1 s.
It never checks a timing: the benchmarks report speed, the test suite must not
fail on a slow machine.
"""

from __future__ import annotations

import json
import math
import shutil

from bench import e2e, front_door
from bench.report import BEGIN, END
from tests.conftest import REPO, require_file
from tests.integration.pard import UV, WHEELHOUSE

SECTIONS = {"cold_deploy": "1. Cold deploy", "warm_redeploy": "2. Warm redeploy",
            "density": "3. Density", "disk": "4. Disk", "daemon_restart": "5. Daemon restart",
            "agent_start": "6. Agent start"}


def rows_of(result: dict, key: str) -> list[dict]:
    (section,) = [s for s in result["sections"] if s["key"] == key]
    return section["rows"]


def test_all_six_benchmarks_run_with_tiny_sizes(tmp_path, capsys):
    require_file(UV, "run scripts/install-deps")
    require_file(WHEELHOUSE, "run scripts/install-deps")
    docs = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs" / "benchmarks.md", docs)
    before = docs.read_text()
    out_json = tmp_path / "result.json"

    assert e2e.main(["--smoke", "--write-docs", "--docs", str(docs), "--json", str(out_json),
                     "--command", "scripts/bench --smoke"]) == 0

    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert [s["key"] for s in result["sections"]] == list(SECTIONS)
    for section in result["sections"]:
        assert section["title"] == SECTIONS[section["key"]]
        assert section["title"] in printed
        assert section["rows"], section["key"]
        for row in section["rows"]:
            assert row["runs"] >= 1 and len(row["values"]) == row["runs"], row
            assert all(v is not None and math.isfinite(v) and v >= 0 for v in row["values"]), row
            assert row["min"] <= row["median"] <= row["max"], row
            if row["unit"] in ("s", "ms", "MB"):
                assert row["min"] > 0, row

    cold = rows_of(result, "cold_deploy")[0]
    assert cold["baseline_median"] > 0 and cold["ratio"] > 0
    assert rows_of(result, "warm_redeploy")[0]["baseline_median"] > 0
    density = {r["what"].split(":")[0].split(" (")[0].strip(): r
               for r in rows_of(result, "density")}
    assert density["agent memory"]["runs"] == 3  # one RSS per agent
    assert rows_of(result, "disk")[1]["ratio"] >= 1.0  # 3 venvs never take less than one
    restarted = rows_of(result, "daemon_restart")[-1]
    assert restarted["what"].startswith("agents restarted")
    assert all(v in (0, 1, 2, 3) for v in restarted["values"])
    assert len(rows_of(result, "agent_start")) >= 2

    # the generated part replaces itself; everything around it stays
    text = docs.read_text()
    assert text.startswith(before.split(BEGIN)[0].rstrip("\n"))
    assert "## Venv builds" in text and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "scripts/bench --smoke" in text
    for title in SECTIONS.values():
        assert f"### {title}" in text


def test_front_door_benchmark_runs_with_tiny_sizes():
    """Every step (saturated, fixed rate at the same offered load for both paths, one
    client) runs and answers every request; the numbers are only checked to be sane."""
    results = front_door.run(seconds=1.0, clients=4, load_fraction=0.5)
    for key in ("direct_4", "front_4", "direct_rate", "front_rate", "direct_1", "front_1"):
        r = results[key]
        assert r["requests"] > 0 and r["errors"] == 0, (key, r)
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("rps", "p50_ms", "p99_ms")), r
    assert results["direct_rate"]["rate"] == results["front_rate"]["rate"] > 0
    assert set(results["front_4"]["cpu_us_per_request"]) == {"agent", "front", "client"}
    summary = results["summary"]
    assert summary["throughput_ratio"] > 0 and summary["offered_rps"] > 0
    table = front_door.table(results)
    assert "Fixed rate" in table and "req/s" in table
