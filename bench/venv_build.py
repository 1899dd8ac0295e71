#!/usr/bin/python3
"""Benchmark: how long a venv takes to build and reuse, and what it costs on disk.

Offline and repeatable: every package comes from the local wheelhouse
(`scripts/install-deps` fills `.cache/wheelhouse`).  In one run it times

  (a) the existing runtime's path: `python -m venv` + `pip install --cache-dir` (warm cache)
  (b) PAR with uv, requirements new to the host (warm shared cache, hardlinks): uv
      installs a new layer, the agent's venv links it
  (e) PAR, requirements another agent already has: a new venv linking their layer
  (c) PAR with pip, requirements new to the host (warm cache)
  (d) reuse of a valid venv

Each run of (b), (c) and the no-bytecode build adds a comment line of its own to
the requirements, so their hash is new and a layer is really installed.  It
prints medians, the ratios a/b, a/e and a/c, the disk used by 5 venvs with the
same requirements (hardlinked files and shared layers counted once), and what
compiling bytecode costs at build time and saves at import time (read-only venv).

    /usr/bin/python3 bench/venv_build.py             # the typical agent set, 5 runs
    /usr/bin/python3 bench/venv_build.py --smoke     # 1 run, a tiny set (the test suite)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from par import config, layout, procs  # noqa: E402
from par.config import Installer as InstallerConfig  # noqa: E402
from par.fsutil import remove_tree  # noqa: E402
from par.installers import PipInstaller, UvInstaller, compile_bytecode  # noqa: E402
from par.venvs import VenvManager, disk_usage, linked_layer  # noqa: E402

PYTHON = Path("/usr/bin/python3")
TYPICAL = REPO / "tests" / "data" / "typical-requirements.txt"
SMOKE_REQUIREMENTS = "idna\nh11\n"
# Modules an agent with the typical set imports at start (for the bytecode gain).
TYPICAL_IMPORTS = ["fastapi", "uvicorn", "grpc", "google.protobuf", "pydantic", "requests",
                   "httpx", "yaml"]
SMOKE_IMPORTS = ["idna", "h11"]
MB = 1024 * 1024


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _check(result: procs.ProcResult) -> procs.ProcResult:
    if not result.ok:
        raise SystemExit(f"{' '.join(result.argv)} failed:\n{result.tail(40)}")
    return result


def legacy_build(venv: Path, requirements: Path, wheelhouse: Path, cache: Path) -> float:
    """(a): what the existing runtime runs, seconds."""
    start = time.monotonic()
    env = procs.child_env()
    _check(procs.run([str(PYTHON), "-m", "venv", str(venv)], timeout=600, env=env))
    _check(procs.run([str(venv / "bin" / "pip"), "install", "--cache-dir", str(cache),
                      "--disable-pip-version-check", "--no-index", "--find-links", str(wheelhouse),
                      "-r", str(requirements)], timeout=600, env=env))
    return time.monotonic() - start


def import_seconds(venv: Path, modules: list[str], runs: int, *, write_bytecode: bool) -> float:
    """Median seconds for the venv's python to import `modules` (fresh process each time)."""
    code = "import " + ", ".join(modules)
    flags = [] if write_bytecode else ["-B"]  # -B: like a read-only venv, no pyc written
    times = []
    for _ in range(runs):
        start = time.monotonic()
        _check(procs.run([str(venv / "bin" / "python"), *flags, "-c", code], timeout=120,
                         env=procs.child_env({"PYTHONDONTWRITEBYTECODE": None})))
        times.append(time.monotonic() - start)
    return _median(times)


def run(args: argparse.Namespace) -> dict:
    wheelhouse = args.wheelhouse
    if not wheelhouse.is_dir():
        raise SystemExit(f"no wheelhouse at {wheelhouse}: run scripts/install-deps")
    if not args.uv.exists():
        raise SystemExit(f"no uv at {args.uv}: run scripts/install-deps")
    runs = 1 if args.smoke else args.runs
    text = SMOKE_REQUIREMENTS if args.smoke else args.requirements.read_text()
    modules = SMOKE_IMPORTS if args.smoke else TYPICAL_IMPORTS
    work = Path(tempfile.mkdtemp(prefix="par-bench-", dir=args.workdir))
    quiet = logging.getLogger("par-bench")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    try:
        req = work / "requirements.txt"
        req.write_text(text)
        # venvs and caches on one filesystem, so uv can hardlink
        base = config.with_state_dir(config.from_dict(None), work / "state", work / "cache")
        # sandbox: false: this measures the installers (and runs without systemd); the
        # build unit adds one transient unit start per layer build
        ic = InstallerConfig(uv_path=args.uv, python=PYTHON, find_links=[str(wheelhouse)],
                             offline=True, timeout_s=600, sandbox=False)

        def manager(kind: str, compile_bytecode: bool = True) -> VenvManager:
            cfg = dataclasses.replace(base, installer=dataclasses.replace(
                ic, kind=kind, compile_bytecode=compile_bytecode))
            inst = UvInstaller(cfg, args.uv) if kind == "uv" else PipInstaller(cfg)
            return VenvManager(cfg, quiet, installer=inst)

        uv, pip, uv_nocompile = manager("uv"), manager("pip"), manager("uv", False)
        # Warm every cache once (not timed): the benchmark measures warm builds.
        # --smoke only checks that everything runs, so it skips the slow pip warm-ups.
        legacy_cache = work / "legacy-pip-cache"
        uv.prewarm(req)
        if not args.smoke:
            legacy_build(work / "legacy-warm", req, wheelhouse, legacy_cache)
            remove_tree(work / "legacy-warm")
            pip.prewarm(req)

        def ensure(m: VenvManager, agent: str, requirements: str = text):
            sha = hashlib.sha256(requirements.encode()).hexdigest()
            return m.ensure(agent, "bench@1.0", requirements, sha, set())

        def new_to_host(tag: str) -> str:
            """The same requirements with a comment line of their own: a new layer."""
            return f"{text.rstrip()}\n# {tag}\n"

        shared = [ensure(uv, "bench-shared-0").path]  # the layer (e) reuses: not timed
        a, b, c, d, e, b_nocompile = [], [], [], [], [], []
        uv_venvs, pip_venvs = [], []
        for i in range(runs):
            legacy = work / f"legacy-{i}"
            a.append(legacy_build(legacy, req, wheelhouse, legacy_cache))
            if i > 0:
                remove_tree(legacy)  # keep one for the disk comparison
            t = time.monotonic()
            uv_venvs.append(ensure(uv, f"bench-uv-{i}", new_to_host(f"uv {i}")).path)
            b.append(time.monotonic() - t)
            t = time.monotonic()
            shared.append(ensure(uv, f"bench-shared-{i + 1}").path)
            e.append(time.monotonic() - t)
            t = time.monotonic()
            pip_venvs.append(ensure(pip, f"bench-pip-{i}", new_to_host(f"pip {i}")).path)
            c.append(time.monotonic() - t)
            t = time.monotonic()
            reused = ensure(uv, "bench-uv-0", new_to_host("uv 0"))
            d.append(time.monotonic() - t)
            assert reused.reused, "reuse did not reuse"
            t = time.monotonic()
            ensure(uv_nocompile, f"bench-nobc-{i}", new_to_host(f"nobc {i}"))
            b_nocompile.append(time.monotonic() - t)
        for i in range(len(shared), 5):  # disk needs 5 same-requirement venvs
            shared.append(ensure(uv, f"bench-shared-{i}").path)

        uv_cache = base.paths.cache_dir / "uv"
        one = disk_usage(shared[:1])
        five = disk_usage(shared[:5])
        one_with_cache = disk_usage([shared[0], uv_cache])
        five_with_cache = disk_usage([*shared[:5], uv_cache])
        own_layer = disk_usage(uv_venvs[:1])
        legacy_one = disk_usage([work / "legacy-0"])
        pip_one = disk_usage(pip_venvs[:1])

        compiled = uv_venvs[0]
        uncompiled = next(layout.venvs(base).glob("bench-nobc-0_*"))
        import_runs = max(3, runs)
        imp_compiled = import_seconds(compiled, modules, import_runs, write_bytecode=False)
        imp_readonly = import_seconds(uncompiled, modules, import_runs, write_bytecode=False)
        # The first build on a host compiles every module (later ones link):
        # compile a fresh venv against an empty bytecode store.
        cold_venv = ensure(uv_nocompile, "bench-cold", new_to_host("cold")).path
        cold_cfg = dataclasses.replace(base, paths=dataclasses.replace(
            base.paths, cache_dir=work / "cold-cache"))
        cold = _check(compile_bytecode(cold_cfg, linked_layer(cold_venv) or cold_venv,
                                       600)).seconds

        ma, mb, mc, md, me = _median(a), _median(b), _median(c), _median(d), _median(e)
        return {
            "requirements": "smoke: " + text.replace("\n", " ").strip() if args.smoke
            else str(args.requirements.relative_to(REPO)),
            "runs": runs,
            "uv_version": uv.installer.version(),
            "pip_version": pip.installer.version(),
            "python": uv.base_python().version,
            "a_legacy_s": round(ma, 3),
            "b_par_uv_s": round(mb, 3),
            "c_par_pip_s": round(mc, 3),
            "d_reuse_ms": round(md * 1000, 1),
            "e_par_shared_layer_s": round(me, 3),
            "ratio_a_b": round(ma / mb, 1),
            "ratio_a_e": round(ma / me, 1),
            "ratio_a_c": round(ma / mc, 2),
            "disk_uv_1_venv_mb": round(one / MB, 1),
            "disk_uv_5_venvs_mb": round(five / MB, 1),
            "disk_uv_5_over_1": round(five / one, 2),
            "disk_uv_1_venv_plus_cache_mb": round(one_with_cache / MB, 1),
            "disk_uv_5_venvs_plus_cache_mb": round(five_with_cache / MB, 1),
            "disk_uv_5_over_1_with_cache": round(five_with_cache / one_with_cache, 2),
            "disk_uv_venv_with_own_layer_mb": round(own_layer / MB, 1),
            "disk_legacy_1_venv_mb": round(legacy_one / MB, 1),
            "disk_legacy_5_venvs_mb": round(5 * legacy_one / MB, 1),
            "disk_par_pip_1_venv_mb": round(pip_one / MB, 1),
            "bytecode_build_cost_s": round(mb - _median(b_nocompile), 3),
            "bytecode_first_build_s": round(cold, 3),
            "b_par_uv_no_bytecode_s": round(_median(b_nocompile), 3),
            "import_compiled_ms": round(imp_compiled * 1000, 1),
            "import_readonly_uncompiled_ms": round(imp_readonly * 1000, 1),
            "import_gain_ms": round((imp_readonly - imp_compiled) * 1000, 1),
            "raw": {"a": a, "b": b, "c": c, "d": d, "e": e, "b_no_bytecode": b_nocompile},
        }
    finally:
        if not args.keep:
            remove_tree(work)


def render(r: dict) -> str:
    lines = [
        f"requirements: {r['requirements']}  runs: {r['runs']}  python {r['python']}  "
        f"uv {r['uv_version']}  pip {r['pip_version']}",
        f"(a) python -m venv + pip install --cache-dir, warm  {r['a_legacy_s']:8.3f} s",
        f"(b) PAR uv, new requirements, warm cache            {r['b_par_uv_s']:8.3f} s",
        f"(e) PAR, requirements another venv has (its layer)  {r['e_par_shared_layer_s']:8.3f} s",
        f"(c) PAR pip, warm cache                             {r['c_par_pip_s']:8.3f} s",
        f"(d) reuse of a valid venv                           {r['d_reuse_ms']:8.1f} ms",
        f"a/b = {r['ratio_a_b']}   a/e = {r['ratio_a_e']}   a/c = {r['ratio_a_c']}",
        f"disk, uv: 1 venv {r['disk_uv_1_venv_mb']} MB, 5 venvs {r['disk_uv_5_venvs_mb']} MB "
        f"({r['disk_uv_5_over_1']}x); with the shared cache {r['disk_uv_1_venv_plus_cache_mb']} "
        f"-> {r['disk_uv_5_venvs_plus_cache_mb']} MB ({r['disk_uv_5_over_1_with_cache']}x)",
        f"disk, a venv with a layer of its own (uv): {r['disk_uv_venv_with_own_layer_mb']} MB",
        f"disk, legacy: 1 venv {r['disk_legacy_1_venv_mb']} MB, 5 venvs "
        f"{r['disk_legacy_5_venvs_mb']} MB; PAR pip: 1 venv {r['disk_par_pip_1_venv_mb']} MB",
        f"bytecode: build +{r['bytecode_build_cost_s']:.3f} s (uv without: "
        f"{r['b_par_uv_no_bytecode_s']:.3f} s; first build on a host compiles for "
        f"{r['bytecode_first_build_s']:.3f} s); import {r['import_compiled_ms']} ms compiled vs "
        f"{r['import_readonly_uncompiled_ms']} ms read-only uncompiled "
        f"(gain {r['import_gain_ms']} ms per start)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (>= 5)")
    parser.add_argument("--smoke", action="store_true", help="1 run with a tiny requirement set")
    parser.add_argument("--requirements", type=Path, default=TYPICAL)
    parser.add_argument("--wheelhouse", type=Path, default=REPO / ".cache" / "wheelhouse")
    parser.add_argument("--uv", type=Path, default=REPO / ".cache" / "tools" / "bin" / "uv")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to build (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if not args.smoke and args.runs < 5:
        parser.error("--runs must be >= 5 (use --smoke for a single quick run)")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
