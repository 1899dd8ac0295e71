"""Benchmark 4, disk: N agents with the same requirements under different agentAppIds.

Each agentAppId gets its own venv (`{agentAppId}_{sha[:7]}`), but its
site-packages links the one layer of installed packages those requirements
have on the host (uv hardlinked it from its cache, PAR hardlinked its bytecode
from its store), so N venvs cost little more than one.  Bytes on disk
(`st_blocks`), each hardlinked file and each shared layer counted once
(`par.venvs.disk_usage`).  Baseline: the pip path gives every agent a full
copy, N × one legacy venv (measured: the one kept by the cold-deploy baseline).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import MB, BenchPard, Row, Section, Sizes, Stats, ratio, write_agent
from par.venvs import disk_usage

TARGET_RATIO = 1.1


def run(pard: BenchPard, sizes: Sizes, work: Path, legacy_venv: Path) -> Section:
    started = time.monotonic()
    n = sizes.disk_agents
    # the agent's code does not matter here: it imports nothing, so it starts quickly
    agent = write_agent(work / "disk-agent", "disk-agent", sizes.requirements, (), False)
    apkg = pard.pack(agent)
    venvs = []
    for i in range(n):
        _, record = pard.deploy_timed(f"disk-{i}", apkg)
        venvs.append(pard.venv_path(record))
    cache = pard.root / "cache"  # uv's cache and the bytecode store
    one, all_ = disk_usage(venvs[:1]), disk_usage(venvs)
    one_c, all_c = disk_usage([venvs[0], cache]), disk_usage([*venvs, cache])
    legacy_one = disk_usage([legacy_venv])
    folders, count, own = unshared(venvs[-1])
    legacy_all = n * legacy_one

    def mb(value: float) -> Stats:
        return Stats.of([value / MB])

    r_par = ratio(all_, one)
    rows = [
        Row("PAR: 1 venv", mb(one), "MB"),
        Row(f"PAR: {n} venvs, hardlinks counted once (ratio: to 1 venv)", mb(all_), "MB",
            None, r_par, f"≤ {TARGET_RATIO:g}×", r_par is not None and r_par <= TARGET_RATIO,
            "ratio"),
        Row(f"PAR: {n} venvs with the shared uv cache and bytecode store (ratio: to 1 venv "
            "with them)", mb(all_c), "MB", None, ratio(all_c, one_c)),
        Row(f"baseline (pip): {n} venvs = {n} × 1 venv of {legacy_one / MB:.1f} MB "
            "(ratio: to 1 venv)", mb(legacy_all), "MB", None, float(n)),
        Row(f"PAR {n} venvs vs baseline {n} venvs (ratio: baseline / PAR)", mb(all_), "MB",
            mb(legacy_all), ratio(legacy_all, all_)),
    ]
    return Section(
        key="disk", title="4. Disk",
        what=(f"{n} agents with the same requirements, deployed through pard under different "
              "agentAppIds (so {n} venvs, linking one layer of installed packages). Bytes on "
              "disk (`st_blocks`), each hardlinked file and the shared layer counted once "
              "(`par.venvs.disk_usage`). One measurement: the byte counts do not vary "
              "between runs.").replace("{n}", str(n)),
        rows=rows,
        notes=[f"Each extra PAR venv costs {(all_ - one) / max(1, n - 1) / MB:.2f} MB: "
               f"{folders / MB:.2f} MB of folders ({count} of them) and {own / MB:.2f} MB of "
               "files of its own (pyvenv.cfg, its metadata and requirements); its bin/ "
               "entries and site-packages are links to the layer. "
               f"{TARGET_RATIO:g}× for {n} venvs of this size allows "
               f"{(TARGET_RATIO - 1) * one / max(1, n - 1) / MB:.2f} MB per extra venv. "
               "(Before layers, each venv hardlinked every file from uv's cache but kept "
               "~240 folders and uv's install records of its own: 1.3 MB, 1.26× for 10.)"],
        seconds=time.monotonic() - started,
    )


def unshared(venv: Path) -> tuple[int, int, int]:
    """(bytes of folders, number of folders, bytes of files with no other link) of a venv."""
    folders = count = own = 0
    for dirpath, _dirs, files in os.walk(venv):
        folders += os.lstat(dirpath).st_blocks * 512
        count += 1
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink == 1:
                own += st.st_blocks * 512
    return folders, count, own
