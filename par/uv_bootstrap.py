"""uv for a host that has none: fetched once from the configured index into state_dir/tools.

Debian 12 has no uv package.  With `installer.kind: auto`, pard starts a
background fetch of `installer.uv_version` at start (`UvBootstrap`); builds
meanwhile use pip, and the first build after it succeeded uses uv.  When the
index cannot be reached the fetch is tried again at a later build (at most
every `RETRY_S`), and the one-line reason is what `/health`, `parctl doctor`
and the deploy's events show.  Maintainer scripts never fetch anything.

`install_uv` does the fetch (also `parctl installer install-uv`): the host's pip
downloads `uv==<version>` (`--only-binary=:all: --no-deps`: no package code
runs) with the same index options and operator environment as builds.  pip
checks the file against the hash the index gives for it (`#sha256=` in a
simple index's link, PEP 503; pip does this whenever a link carries a hash), and
pard records the wheel's own sha256 in `tools/uv.json`.  The binary is taken
from the wheel's `.data/scripts/`, checked with `--version` (it must be the
version asked for) and renamed into place: a failure leaves the old binary (or
none) untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from par import layout, procs
from par.build_sandbox import build_env
from par.config import Config
from par.errors import ParError
from par.fsutil import atomic_write_text, fsync_dir, remove_tree
from par.host_pip import probe
from par.installers import TAIL_LINES, index_args
from par.log import event

_UV_SCRIPT_RE = re.compile(r"^uv-[^/]+\.data/scripts/uv$")
# Seconds between two fetches when the last one failed.
RETRY_S = 300.0
FETCH_TIMEOUT_S = 300.0
RECORD = "uv.json"


def _remaining(deadline: float, what: str, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ParError("uv_install_failed", f"{what}: timed out after {timeout:g} s", None, 504)
    return left


def one_line(text: str, limit: int = 300) -> str:
    """The last meaningful line of an installer's output (an error's reason), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith(("error", "warning: retrying"))]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def where_from(cfg: Config) -> str:
    """Where uv is fetched from, for messages: the index, the wheelhouses, or pip's default."""
    ic = cfg.installer
    if ic.offline:
        return "find_links " + " ".join(ic.find_links) if ic.find_links else "nowhere (offline)"
    return ic.index_url or os.environ.get("PIP_INDEX_URL") or "pip's default index"


def _extract(wheel: Path, staged: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if _UV_SCRIPT_RE.match(n)]
        if not members:
            raise ParError("uv_install_failed", f"{wheel.name} has no uv binary in its scripts",
                           None, 502)
        with zf.open(members[0]) as src, open(staged, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
    staged.chmod(0o755)  # the build user runs it


def install_uv(cfg: Config, version: str | None = None, timeout: float = FETCH_TIMEOUT_S) -> Path:
    """Fetch uv `version` (default `installer.uv_version`) from the configured index and put
    its binary at `layout.tools(cfg) / "uv"`; return that path.  ParError says why not."""
    version = version or cfg.installer.uv_version
    tools = layout.tools(cfg)
    tools.mkdir(parents=True, exist_ok=True)
    tools.chmod(0o755)
    deadline = time.monotonic() + timeout
    work = Path(tempfile.mkdtemp(prefix=".install-uv-", dir=tools))
    try:
        download = work / "download"
        argv = [
            *probe(cfg.installer.python).command(), "download", f"uv=={version}",
            "--only-binary=:all:", "--no-deps", "--no-input", "--disable-pip-version-check",
            "--progress-bar", "off", "--dest", str(download),
            *index_args(cfg.installer, uv=False),
        ]
        # the operator's index, proxy and CA variables, as builds get them; no pip.conf
        env = build_env({"HOME": "/tmp", "PIP_CONFIG_FILE": os.devnull})
        result = procs.run(argv, timeout=_remaining(deadline, "downloading uv", timeout),
                           env=env)
        if not result.ok:
            why = "timed out" if result.timed_out else one_line(result.output)
            raise ParError("uv_install_failed",
                           f"downloading uv {version} from {where_from(cfg)} failed: {why}\n"
                           f"{result.tail(TAIL_LINES)}", None, 502)
        wheels = sorted(download.glob("uv-*.whl"))
        if not wheels:
            raise ParError("uv_install_failed", "pip download produced no uv wheel", None, 502)
        digest = hashlib.sha256(wheels[-1].read_bytes()).hexdigest()
        staged = work / "uv"
        _extract(wheels[-1], staged)
        result = procs.run([str(staged), "--version"],
                           timeout=_remaining(deadline, "checking uv", timeout), env=env)
        words = result.output.split()
        if not result.ok or words[:1] != ["uv"] or len(words) < 2 or words[1] != version:
            raise ParError("uv_install_failed",
                           f"the downloaded uv does not run as uv {version}: {result.tail(5)}",
                           None, 502)
        target = tools / "uv"
        os.replace(staged, target)  # same folder tree, so an atomic rename
        atomic_write_text(tools / RECORD, json.dumps(
            {"version": version, "wheel": wheels[-1].name, "sha256": digest,
             "from": where_from(cfg), "installed_at": round(time.time(), 3)}, indent=2) + "\n")
        fsync_dir(tools)
        return target
    finally:
        remove_tree(work)


@dataclass(frozen=True)
class BootstrapStatus:
    """Where the background fetch of uv stands."""

    state: str  # idle | fetching | ready | failed
    version: str
    reason: str | None = None  # the last failure, one line
    path: str | None = None

    def to_dict(self) -> dict:
        """The JSON form (`/health`'s installer.bootstrap)."""
        out: dict = {"state": self.state, "version": self.version}
        if self.reason:
            out["reason"] = self.reason
        if self.path:
            out["path"] = self.path
        return out


class UvBootstrap:
    """Fetches uv once in a background thread; `on_ready` runs when it is in place."""

    def __init__(self, cfg: Config, logger: logging.Logger,
                 on_ready: Callable[[], None] = lambda: None,
                 fetch: Callable[[Config], Path] = install_uv, retry_s: float = RETRY_S) -> None:
        self.cfg = cfg
        self.logger = logger
        self.on_ready = on_ready
        self._fetch = fetch
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._enabled = False
        self._status = BootstrapStatus("idle", cfg.installer.uv_version)
        self._failed_at: float | None = None

    def status(self) -> BootstrapStatus:
        """The current state."""
        with self._lock:
            return self._status

    def enable(self) -> None:
        """Allow fetches from now on (pard calls it at start; tests and tools never do)."""
        with self._lock:
            self._enabled = True

    def kick(self) -> bool:
        """Start a fetch unless one runs, uv is in place, fetches are not enabled, or the
        last failure is younger than `retry_s`.  Returns whether one started."""
        with self._lock:
            if not self._enabled or self._status.state in ("fetching", "ready"):
                return False
            if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_s:
                return False
            self._status = BootstrapStatus("fetching", self.cfg.installer.uv_version,
                                           self._status.reason)
            self._thread = threading.Thread(target=self._run, name="uv-bootstrap", daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: float | None = None) -> BootstrapStatus:
        """Wait for a running fetch to end (tests); returns the state."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    def _run(self) -> None:
        version = self.cfg.installer.uv_version
        event(self.logger, "Fetching uv", version=version, source=where_from(self.cfg))
        started = time.monotonic()
        try:
            path = self._fetch(self.cfg)
        except Exception as exc:  # noqa: BLE001 - any failure means: pip, and say why
            message = exc.message if isinstance(exc, ParError) else f"{type(exc).__name__}: {exc}"
            reason = message.splitlines()[0] if message else type(exc).__name__
            with self._lock:
                self._status = BootstrapStatus("failed", version, reason)
                self._failed_at = time.monotonic()
            event(self.logger, "Fetching uv failed; building with pip", logging.WARNING,
                  version=version, reason=reason, retry_after_s=self.retry_s)
            return
        with self._lock:
            self._status = BootstrapStatus("ready", version, None, str(path))
            self._failed_at = None
        event(self.logger, "uv installed", version=version, path=str(path),
              seconds=round(time.monotonic() - started, 3))
        self.on_ready()
