"""Which environment variables an agent may set for itself (pure logic).

An agent's own variables come from three places: the package's `.env`, its
`agent.yaml` `environment:` and the deploy request's `env`.  They go to the
unit's `EnvironmentFile=`, which systemd applies *after* `Environment=` and
after the variables it sets itself (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, ...):
a key there overrides them all.  So every key is classified before it gets
there (docs/security.md, "Environment an agent may set"):

- refused: the dynamic loader's and the interpreter's knobs, `PATH`, what
  systemd sets for the service and PAR's reserved `PAR_*`.  They would run
  code before the agent host, change which Python or which libraries it runs,
  or cut the host off from systemd.  The deploy fails naming the key and
  where it came from.
- PAR's: the deployment variables PAR sets itself (`AGENT_APP_ID`,
  `REST_PORT`, `BASE_PATH`, `PYTHONPATH`, `HOME`, ...).  PAR's value wins and
  the agent's is dropped (and logged): packages written for the old runtime
  carry them in `.env` for local runs (`REST_PORT=8000`, `PYTHONPATH=src`),
  and refusing would break them for no gain.
- anything else is the agent's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from par.errors import ParError

REFUSED = "refused"
PARS = "par"

# Where a variable came from: the error's field and how its message names it.
SOURCE_REQUEST = "request"
SOURCE_MANIFEST = "manifest"
SOURCE_DOTENV = "dotenv"


@dataclass(frozen=True)
class EnvRule:
    """One row of the table: keys (exact) and prefixes, the decision and why."""

    name: str
    decision: str  # REFUSED | PARS
    why: str
    keys: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def matches(self, key: str) -> bool:
        return key in self.keys or key.startswith(self.prefixes)


# ld.so(8): every variable the dynamic loader reads (LD_* by name: LD_ is also a
# common prefix of applications' own keys, e.g. LaunchDarkly's).
LOADER_KEYS = frozenset({
    "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_BIND_NOW", "LD_BIND_NOT",
    "LD_DEBUG", "LD_DEBUG_OUTPUT", "LD_DYNAMIC_WEAK", "LD_HWCAP_MASK", "LD_ORIGIN_PATH",
    "LD_POINTER_GUARD", "LD_PROFILE", "LD_PROFILE_OUTPUT", "LD_SHOW_AUXV",
    "LD_TRACE_LOADED_OBJECTS", "LD_USE_LOAD_BIAS", "LD_VERBOSE", "LD_WARN",
    "LD_ASSUME_KERNEL", "LD_LIBRARY_PATH_64", "GLIBC_TUNABLES",
})
# The interpreter's knobs that change which Python runs or which code it loads
# (PYTHONPATH, PYTHONUNBUFFERED and PYTHONDONTWRITEBYTECODE are PAR's: below).
INTERPRETER_KEYS = frozenset({
    "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONEXECUTABLE", "PYTHONPLATLIBDIR",
    "PYTHONUSERBASE", "PYTHONNOUSERSITE", "PYTHONSAFEPATH", "PYTHONPYCACHEPREFIX",
    "PYTHONCASEOK", "PYTHONFROZENMODULES", "__PYVENV_LAUNCHER__",
})
# What systemd sets for a service (systemd.exec(5), "Environment Variables in
# Spawned Processes"), which an EnvironmentFile= key would override.
SYSTEMD_KEYS = frozenset({
    "NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM", "MAINPID", "MANAGERPID",
    "USER", "LOGNAME", "SHELL", "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "CACHE_DIRECTORY",
    "LOGS_DIRECTORY", "CONFIGURATION_DIRECTORY", "CREDENTIALS_DIRECTORY",
    "SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS", "MEMORY_PRESSURE_WATCH", "MEMORY_PRESSURE_WRITE",
})
SYSTEMD_PREFIXES = ("WATCHDOG_", "LISTEN_", "SYSTEMD_", "MONITOR_", "TRIGGER_")
# The deployment variables PAR sets in every agent's `Environment=`
# (par.agent_unit.par_environment; tests/unit/test_agent_env.py keeps them in step).
PAR_SET_KEYS = frozenset({
    "AGENT_APP_ID", "DEPLOYMENT_ID", "ORG_ID", "REST_PORT", "A2A_PORT", "UI_PORT",
    "AGENT_PACKAGE_PATH", "AGENT_VENV_PATH", "BASE_PATH", "MULTIPLEXED", "HOME",
    "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
})

RULES: tuple[EnvRule, ...] = (
    EnvRule("dynamic loader", REFUSED,
            "runs or swaps native code in the agent host before it starts",
            keys=LOADER_KEYS),
    EnvRule("interpreter", REFUSED,
            "changes which Python runs or which code it loads before the agent host",
            keys=INTERPRETER_KEYS),
    EnvRule("command search path", REFUSED,
            "repoints every command the host and the agent's libraries run; "
            "the unit gets systemd's fixed PATH",
            keys=frozenset({"PATH"})),
    EnvRule("systemd's", REFUSED,
            "set by systemd for the service; the agent's file would override them "
            "(READY=1 sent elsewhere, a wrong watchdog, a forged invocation)",
            keys=SYSTEMD_KEYS, prefixes=SYSTEMD_PREFIXES),
    EnvRule("PAR's reserved", REFUSED,
            "reserved for PAR and its agent host (PAR_BIND_ADDRESS, PAR_AGENT_SPEC, ...)",
            prefixes=("PAR_",)),
    EnvRule("PAR's deployment variables", PARS,
            "PAR sets them for every agent; its value wins and the agent's is dropped",
            keys=PAR_SET_KEYS),
)


def rule_for(key: str) -> EnvRule | None:
    """The rule a variable name falls under; None: the agent's own."""
    for rule in RULES:
        if rule.matches(key):
            return rule
    return None


def _refusal(key: str, source: str, rule: EnvRule) -> ParError:
    if source == SOURCE_REQUEST:
        field, where = f"env.{key}", f"env.{key}"
    elif source == SOURCE_MANIFEST:
        field, where = f"environment.{key}", f"agent.yaml: environment.{key}"
    else:
        field, where = ".env", f".env: {key}"
    return ParError("env_forbidden",
                    f"{where}: an agent may not set {key} ({rule.name} variable: {rule.why})",
                    field, 400)


def check(env: Mapping[str, str], source: str) -> None:
    """Raise `env_forbidden` (400) for the first refused key of `env`, naming it and
    `source` (SOURCE_REQUEST: field `env.KEY`; SOURCE_MANIFEST: `environment.KEY`;
    SOURCE_DOTENV: `.env`).  Names only: values may be secrets."""
    for key in env:
        rule = rule_for(key)
        if rule is not None and rule.decision == REFUSED:
            raise _refusal(key, source, rule)


@dataclass(frozen=True)
class MergedEnv:
    """The agent's own variables, and the keys dropped because PAR sets them."""

    env: dict[str, str]
    dropped: tuple[str, ...]


def merge(manifest: Mapping[str, str], dotenv: Mapping[str, str],
          request: Mapping[str, str]) -> MergedEnv:
    """The agent's variables: manifest `environment`, then `.env`, then the request's `env`
    (the operator's values win over the package's); refused keys raise, PAR's are dropped."""
    check(manifest, SOURCE_MANIFEST)
    check(dotenv, SOURCE_DOTENV)
    check(request, SOURCE_REQUEST)
    env = {**manifest, **dotenv, **request}
    dropped = tuple(sorted(k for k in env if (r := rule_for(k)) is not None and r.decision == PARS))
    return MergedEnv({k: v for k, v in env.items() if k not in dropped}, dropped)
