"""Where an agent's writable state lives, and clearing it (attack 9).

An agent's `StateDirectory=` is scoped by its org: `par-agents/<org key>/<agentAppId>`
(below /var/lib; with `DynamicUser=` systemd keeps it in /var/lib/private and links
it).  A deployment of the same agentAppId from another org gets another folder, so it
never reads the first org's files, and a failed cross-org replacement that rolls back
finds the first org's state untouched.  The org key is a digest, since orgIds are
free text.  Purging an org's last deployment of an agent deletes its folder.

Before this scheme the folder was `par-agent/<agentAppId>`; `migrate_legacy` moves such
a folder to the scoped name of the org that runs the agent when it next starts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from par.fsutil import remove_tree

VAR_LIB = Path("/var/lib")
TOP = "par-agents"
LEGACY_TOP = "par-agent"


def org_key(org_id: str) -> str:
    """A short, path-safe name for an org (orgIds are free text)."""
    return hashlib.sha256(org_id.encode("utf-8")).hexdigest()[:16]


def state_directory(agent_id: str, org_id: str) -> str:
    """The agent's `StateDirectory=`, relative to /var/lib."""
    return f"{TOP}/{org_key(org_id)}/{agent_id}"


def _places(relative: str, var_lib: Path) -> tuple[Path, Path]:
    # DynamicUser=: the real folder below private/, a symlink at the plain name
    return var_lib / "private" / relative, var_lib / relative


def clear(agent_id: str, org_id: str, var_lib: Path = VAR_LIB) -> list[str]:
    """Delete the agent's state folder for `org_id` (the unit must be stopped);
    return what was deleted."""
    removed = []
    for path in _places(state_directory(agent_id, org_id), var_lib):
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(str(path))
        elif path.is_dir():
            remove_tree(path)
            removed.append(str(path))
        try:
            path.parent.rmdir()  # the org's folder, once it holds no agent
        except OSError:
            pass
    for path in _places(f"{LEGACY_TOP}/{agent_id}", var_lib):
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            remove_tree(path)
            removed.append(str(path))
    return removed


def migrate_legacy(agent_id: str, org_id: str, var_lib: Path = VAR_LIB) -> bool:
    """Move a pre-scoping `par-agent/<id>` folder to the org-scoped name (once).

    The caller checks that `org_id` is the org that ran the agent before.
    """
    old_real, old_link = _places(f"{LEGACY_TOP}/{agent_id}", var_lib)
    new_real, _ = _places(state_directory(agent_id, org_id), var_lib)
    if not old_real.is_dir() or old_real.is_symlink() or new_real.exists():
        return False
    new_real.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.rename(old_real, new_real)
    if old_link.is_symlink():
        old_link.unlink()
    return True
