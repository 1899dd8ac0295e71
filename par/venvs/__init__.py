"""Per-agent venvs: reuse or atomic build, shared layers, locks, LRU eviction.

A venv is named `{agentAppId}_{sha[:7]}` (or `{name@version}_{sha[:7]}` when
there is no agentAppId), where `sha` is the SHA-256 of the effective
requirements (`naming`).  It is reused only when it validates (`validate`);
otherwise it is rebuilt, in a temporary sibling renamed into place (`atomic`).
Agents with the same requirements share their installed packages: a venv's
site-packages links a *layer* the installer ran into once (`layers`, `links`).
One lock file per venv name serializes threads and processes working on the
same venv (`locks`).  What PAR records about a venv is its metadata (`meta`);
the budget and LRU eviction keep the folder in bounds (`budget`, `sizes`,
`pyc`).  Every path comes from par.layout.

`VenvManager` (`manager`) is the facade the daemon uses; this package exports
it with the few functions and types its callers need.
"""

from par.venvs.atomic import cleanup_stale
from par.venvs.budget import EVICT_GRACE_S
from par.venvs.counters import VenvCounters
from par.venvs.links import linked_layer
from par.venvs.locks import venv_lock
from par.venvs.manager import VenvManager
from par.venvs.meta import (
    METADATA_FILE,
    REQUIREMENTS_FILE,
    SCHEMA_VERSION,
    VenvMeta,
    read_meta,
    write_meta,
)
from par.venvs.naming import layer_key, venv_name
from par.venvs.python import PythonInfo
from par.venvs.results import PrewarmResult, VenvInfo, VenvResult
from par.venvs.sizes import cache_on_same_filesystem, disk_usage

__all__ = [
    "EVICT_GRACE_S",
    "METADATA_FILE",
    "REQUIREMENTS_FILE",
    "SCHEMA_VERSION",
    "PrewarmResult",
    "PythonInfo",
    "VenvCounters",
    "VenvInfo",
    "VenvManager",
    "VenvMeta",
    "VenvResult",
    "cache_on_same_filesystem",
    "cleanup_stale",
    "disk_usage",
    "layer_key",
    "linked_layer",
    "read_meta",
    "venv_lock",
    "venv_name",
    "write_meta",
]
