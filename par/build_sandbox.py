"""Where installers run: as the unprivileged build user, in a sandboxed transient unit.

An sdist runs its setup.py or build backend while uv/pip install it, so whatever
runs the installer runs code from the package index.  `UnitRunner` runs it as
`par-build-<random>.service` through `systemd-run --pipe --wait`: as the static
system user `installer.build_user` (the package creates it with sysusers), with
the OS read-only, no home folders, a private /tmp, no way back to root, and
PAR's folders hidden except the venv being built and the installer's cache
(read-write) and the inputs the installer reads (read-only).  Its output comes
back through the pipe; `RuntimeMaxSec=` kills the whole unit at the install
timeout.  This module and par.units are the only ones that talk to systemd.

`RootRunner` is the documented opt-out (`installer.sandbox: false`, for hosts
without systemd): the installer then runs as pard's own user, unsandboxed.
Nothing falls back to it silently: with the sandbox on and no systemd or no
build user, a build fails with a ParError that says why.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from par import layout, procs
from par.config import Config
from par.errors import ParError

SYSTEMD_RUN = "/usr/bin/systemd-run"
SYSTEMCTL = "/usr/bin/systemctl"
# Seconds systemd-run may take beyond the unit's RuntimeMaxSec= before pard gives up on it.
GRACE_S = 15.0
STOP_TIMEOUT_S = 30.0
# The variables of pard's environment a build keeps: what an operator sets for
# par.service (a systemd drop-in, docs/security.md) to reach an index: proxies,
# CAs, the index and its credentials, timeouts; and the locale.  Nothing else of
# pard's passes (no PYTHON*, no other PIP_*/UV_* such as PIP_TARGET or
# UV_PYTHON), and nothing of a package's: a build gets no agent's environment.
# PAR's own options (cache, link mode, no config files) are set after these and win.
PASSED_ENV = (
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
    "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST", "PIP_CERT",
    "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES",
    "UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_FIND_LINKS",
    "UV_INSECURE_HOST", "UV_NATIVE_TLS", "UV_SYSTEM_CERTS", "UV_HTTP_TIMEOUT",
    "UV_HTTP_RETRIES", "UV_INDEX_STRATEGY", "UV_KEYRING_PROVIDER",
    "LANG", "LC_ALL", "LC_CTYPE")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Paths go into space-separated unit properties: refuse what would split them.
_SAFE_PATH_RE = re.compile(r"^/[^\s:\"'\\]*$")


def build_env(overrides: Mapping[str, str | None], base: Mapping[str, str] | None = None
              ) -> dict[str, str]:
    """The environment of an installer run: PASSED_ENV from `base` (default: ours),
    a fixed PATH, then `overrides` (None removes a variable)."""
    source = os.environ if base is None else base
    env = {k: source[k] for k in PASSED_ENV if k in source}
    env["PATH"] = DEFAULT_PATH
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass(frozen=True)
class BuildUser:
    """The system user builds run as."""

    name: str
    uid: int
    gid: int


def build_user(cfg: Config) -> BuildUser:
    """`installer.build_user`, looked up; ParError when it does not exist or is root."""
    name = cfg.installer.build_user
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ParError(
            "build_user_missing",
            f"the build user {name} does not exist: reinstall pixell-agent-runtime or run "
            "systemd-sysusers (it ships /usr/lib/sysusers.d/pixell-agent-runtime.conf)",
            "installer.build_user", 500) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ParError("build_user_invalid", f"the build user {name} must not be root",
                       "installer.build_user", 500)
    return BuildUser(name, entry.pw_uid, entry.pw_gid)


def chown_tree(top: Path, uid: int, gid: int, *, shared_files: bool = True) -> None:
    """Give `top` and everything below it to uid:gid, never following a symlink.

    `shared_files=False` leaves files with more than one link alone (a cache's files
    that a published layer links: they stay root-owned and read-only)."""
    os.lchown(top, uid, gid)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not shared_files and not os.path.isdir(path) and st.st_nlink > 1:
                continue
            os.lchown(path, uid, gid)


def _hidden_roots(cfg: Config) -> tuple[Path, ...]:
    return (cfg.paths.state_dir, cfg.paths.cache_dir)


# What ProtectHome=yes and PrivateTmp=yes hide from a build.
SANDBOX_HIDES = (Path("/root"), Path("/home"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _checked(paths: Iterable[Path]) -> list[str]:
    out = []
    for path in paths:
        text = str(path)
        if not _SAFE_PATH_RE.match(text):
            raise ParError("build_sandbox_path",
                           f"{text!r} cannot be given to the build sandbox (whitespace, ':' "
                           "or quotes in a path)", None, 500)
        out.append(text)
    return out


def unit_properties(cfg: Config, user: str, writable: Sequence[Path], readable: Sequence[Path],
                    env_file: Path | None, timeout: float) -> list[str]:
    """The `systemd-run --property=` values of a build unit (pure; unit-tested)."""
    hidden = _hidden_roots(cfg)
    props = [
        f"User={user}", f"Group={user}",
        "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
        "NoNewPrivileges=yes", "RestrictSUIDSGID=yes", "CapabilityBoundingSet=",
        "AmbientCapabilities=", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes", "ProtectControlGroups=yes", "ProtectClock=yes",
        "ProtectHostname=yes", "ProtectProc=invisible", "RestrictNamespaces=yes",
        "RestrictRealtime=yes", "LockPersonality=yes", "RemoveIPC=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service", "SystemCallErrorNumber=EPERM",
        # agents read what the build writes
        "UMask=0022",
        # the private /tmp: no project config (uv.toml, pyproject.toml) is found above it
        "WorkingDirectory=/tmp",
        # PAR's folders appear empty: the store, packages, other venvs and layers,
        # the other caches, the bytecode store
        "TemporaryFileSystem=" + " ".join(f"{p}:ro" for p in _checked(hidden)),
        # the daemon's config and TCP token, wherever the token is kept
        "InaccessiblePaths=-/etc/par -" + _checked([cfg.listen.token_file])[0],
        f"RuntimeMaxSec={max(int(timeout), 1)}s",
        "TimeoutStopSec=5s",
    ]
    if writable:
        props.append("BindPaths=" + " ".join(_checked(writable)))
    # inputs the sandbox would hide: below PAR's folders, or in a home or temporary
    # folder (a source checkout's uv and wheelhouse, say) that ProtectHome=/PrivateTmp= hide
    inputs = [p for p in readable if _under(p, [*hidden, *SANDBOX_HIDES]) and p.exists()]
    if inputs:
        props.append("BindReadOnlyPaths=" + " ".join(_checked(inputs)))
    if env_file is not None:
        props.append(f"EnvironmentFile={_checked([env_file])[0]}")
    return props


def _env_file_text(env: Mapping[str, str]) -> str:
    lines = []
    for key, value in sorted(env.items()):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or "\n" in value:
            raise ParError("build_env_invalid", f"environment variable {key!r} cannot be "
                           "passed to a build", None, 500)
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{escaped}"\n')
    return "".join(lines)


class Runner(ABC):
    """Runs an installer command where builds run."""

    @abstractmethod
    def build_uid(self) -> int | None:
        """The user the build runs as (None: pard's own)."""

    @abstractmethod
    def prepare(self, writable: Sequence[Path]) -> None:
        """Make `writable` (a venv being built, an installer cache) writable by the build."""

    @abstractmethod
    def run(self, argv: Sequence[str], *, env: Mapping[str, str], writable: Sequence[Path],
            readable: Sequence[Path], timeout: float) -> procs.ProcResult:
        """Run `argv` to completion or `timeout`; only `writable` may be written.
        `readable`: inputs it reads (the uv binary, find_links folders)."""


class RootRunner(Runner):
    """`installer.sandbox: false`: the installer runs as pard's own user, unsandboxed."""

    def build_uid(self) -> int | None:
        return None

    def prepare(self, writable: Sequence[Path]) -> None:
        for path in writable:
            path.mkdir(parents=True, exist_ok=True)

    def run(self, argv: Sequence[str], *, env: Mapping[str, str], writable: Sequence[Path],
            readable: Sequence[Path], timeout: float) -> procs.ProcResult:
        return procs.run(argv, timeout=timeout, env=env)


class UnitRunner(Runner):
    """Runs the installer as a sandboxed transient unit of the build user (systemd-run)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def _user(self) -> BuildUser:
        if not Path("/run/systemd/system").is_dir():
            raise ParError(
                "build_sandbox_unavailable",
                "builds run in a systemd unit, and systemd is not running (PID 1); "
                "installer.sandbox: false builds as root, unsandboxed (unsafe)",
                "installer.sandbox", 500)
        return build_user(self.cfg)

    def build_uid(self) -> int | None:
        return self._user().uid

    def prepare(self, writable: Sequence[Path]) -> None:
        user = self._user()
        for path in writable:
            path.mkdir(parents=True, exist_ok=True)
            st = path.lstat()
            if (st.st_uid, st.st_gid) != (user.uid, user.gid):
                # a venv skeleton pard just made, or a cache an older PAR filled as root:
                # files a published layer links stay root's (read-only to the build)
                chown_tree(path, user.uid, user.gid, shared_files=False)

    def run(self, argv: Sequence[str], *, env: Mapping[str, str], writable: Sequence[Path],
            readable: Sequence[Path], timeout: float) -> procs.ProcResult:
        user = self._user()
        unit = f"par-build-{secrets.token_hex(6)}.service"
        folder = layout.builds(self.cfg)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # the environment goes in a root-only file: a unit's Environment= is readable
        # by every local user, and a proxy URL may hold a password
        fd, name = tempfile.mkstemp(prefix=".env-", dir=folder)
        env_file = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(_env_file_text(env))
            props = unit_properties(self.cfg, user.name, writable, readable, env_file, timeout)
            command = [SYSTEMD_RUN, "--pipe", "--wait", "--collect", "--quiet",
                       f"--unit={unit}", "--service-type=exec",
                       *(f"--property={p}" for p in props), "--", *argv]
            result = procs.run(command, timeout=timeout + GRACE_S,
                               env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"})
        finally:
            env_file.unlink(missing_ok=True)
        if result.timed_out:
            # systemd-run itself hung: stop the unit, whatever it still runs
            procs.run([SYSTEMCTL, "stop", unit], timeout=STOP_TIMEOUT_S)
        elif not result.ok and result.seconds >= timeout:
            # RuntimeMaxSec= ended it: systemd-run --quiet says nothing, only fails
            result = procs.ProcResult(result.argv, None, result.output, result.seconds, True)
        return result


def runner_for(cfg: Config) -> Runner:
    """The runner `installer.sandbox` asks for."""
    return UnitRunner(cfg) if cfg.installer.sandbox else RootRunner()
