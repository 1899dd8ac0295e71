"""The agent host as agents run it: a copy in PAR's state, with its bytecode compiled.

Agents import the host from `state_dir/host/<digest>/par_agent_host`, not from
where PAR is installed, for two reasons:

- Units run with `PYTHONDONTWRITEBYTECODE` and a read-only view of the host, so a
  host without bytecode would be compiled again at every agent start (tens of
  milliseconds of every redeploy and restart).  The copy is compiled once, by
  the interpreter the venvs are built from, so the bytecode matches theirs.
- An agent that systemd restarts after the `par` package was removed (not
  purged) still finds its host: the copy belongs to PAR's state, not to dpkg.

`<digest>` covers the host's sources: an upgraded PAR installs a new copy next
to the old one, which agents started before the upgrade keep using until
they are redeployed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from par import layout, procs
from par.config import Config
from par.errors import ParError
from par.fsutil import fsync_dir, remove_tree

HOST_SOURCE = Path(__file__).resolve().parent / "agent_host"
PACKAGE = "par_agent_host"
COMPLETE_MARKER = ".complete"
COMPILE_TIMEOUT_S = 120


def _sources(source: Path) -> list[Path]:
    return sorted(p for p in (source / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)


def host_digest(source: Path = HOST_SOURCE) -> str:
    """A short digest of the host's sources (paths and contents)."""
    h = hashlib.sha256()
    for path in _sources(source):
        h.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def host_dir(cfg: Config, digest: str) -> Path:
    """The folder agents get on their PYTHONPATH (it holds `par_agent_host` alone)."""
    return layout.host_root(cfg) / digest


def install_host(cfg: Config, source: Path = HOST_SOURCE) -> Path:
    """Copy the host into PAR's state and compile it, unless that copy is already complete.

    Built in a temporary folder beside its final place and renamed into it, so a
    crash leaves either no copy or a complete one (stale temporary folders are
    removed here too).  Raises ParError when the copy cannot be made.
    """
    digest = host_digest(source)
    target = host_dir(cfg, digest)
    if (target / COMPLETE_MARKER).is_file():
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    os.chmod(parent, 0o755)
    for stale in parent.glob(".tmp-*"):
        remove_tree(stale)
    remove_tree(target)  # an incomplete copy (no marker) is never used
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest}-", dir=parent))
    try:
        for path in _sources(source):
            dest = tmp / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)  # keeps mtimes: the bytecode records the source's
        res = procs.run([str(cfg.installer.python), "-I", "-m", "compileall", "-q", str(tmp)],
                        timeout=COMPILE_TIMEOUT_S, env=procs.child_env())
        if not res.ok:
            raise ParError("host_install_failed",
                           f"cannot compile the agent host with {cfg.installer.python}: "
                           f"{res.tail(5)}", "installer.python", 500)
        (tmp / COMPLETE_MARKER).write_text(digest + "\n")
        for root, _dirs, files in os.walk(tmp):
            # agents run as their own users: the host must be readable by all
            os.chmod(root, 0o755)
            for name in files:
                path = Path(root) / name
                os.chmod(path, 0o644)
                with path.open("rb") as fh:  # durable before the rename makes it "complete"
                    os.fsync(fh.fileno())
        os.rename(tmp, target)
        fsync_dir(parent)
    except BaseException:
        remove_tree(tmp)
        raise
    return target
