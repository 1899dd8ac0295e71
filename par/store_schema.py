"""The store's SQLite schema: its migrations, how a `Deployment` maps to a row, and
the checks and migration done when the file is opened.

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` brings a
store from version `i` to `i + 1`, each in one transaction.  A store newer than
this code, a corrupted file or a file locked by another writer is refused with
a `ParError`, and the file is left as it was.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from par.deployment import Deployment
from par.errors import ParError

# Version 1.  A migration is history: never edit it, append a new one.
_V1 = (
    """CREATE TABLE deployments (
        deployment_id  TEXT PRIMARY KEY NOT NULL,
        agent_app_id   TEXT NOT NULL,
        org_id         TEXT NOT NULL DEFAULT '',
        version        TEXT NOT NULL,
        package_url    TEXT NOT NULL,
        package_sha256 TEXT,
        request_json   TEXT NOT NULL DEFAULT '{}',
        env_json       TEXT NOT NULL DEFAULT '{}',
        status         TEXT NOT NULL CHECK (status IN ('pending', 'downloading', 'loading',
                           'starting', 'healthy', 'failed', 'stopping', 'stopped', 'removed')),
        desired_state  TEXT NOT NULL DEFAULT 'running'
                           CHECK (desired_state IN ('running', 'stopped', 'removed')),
        current        INTEGER NOT NULL DEFAULT 0 CHECK (current IN (0, 1)),
        error_code     TEXT,
        error_message  TEXT,
        error_field    TEXT,
        unit           TEXT,
        venv           TEXT,
        venv_reused    INTEGER NOT NULL DEFAULT 0 CHECK (venv_reused IN (0, 1)),
        ports_json     TEXT NOT NULL DEFAULT '{}',
        phases_json    TEXT NOT NULL DEFAULT '{}',
        created_at     REAL NOT NULL,
        updated_at     REAL NOT NULL
    )""",
    # At most one current deployment per agent, whatever the code above does.
    "CREATE UNIQUE INDEX deployments_one_current ON deployments (agent_app_id) WHERE current = 1",
    "CREATE INDEX deployments_agent_created ON deployments (agent_app_id, created_at)",
    "CREATE INDEX deployments_status ON deployments (status)",
    """CREATE TABLE events (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment_id TEXT REFERENCES deployments (deployment_id) ON DELETE CASCADE,
        agent_app_id  TEXT,
        ts            REAL NOT NULL,
        event         TEXT NOT NULL,
        message       TEXT NOT NULL DEFAULT '',
        fields_json   TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX events_deployment ON events (deployment_id, id)",
)
# Version 2: the SHA-256 of the package bytes a deployment runs (par.layout names its
# files by it); NULL for deployments made before, which use the flat layout.
_V2 = ("ALTER TABLE deployments ADD COLUMN package_digest TEXT",)
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2)

# ---- a Deployment as a row of `deployments` --------------------------------------

# Deployment fields stored as JSON text, and the column each lives in.
_JSON_COLUMNS = {"request": "request_json", "env": "env_json",
                 "ports": "ports_json", "phases": "phases_json"}
_BOOL_FIELDS = ("current", "venv_reused")
# Every field of a Deployment has a column (the JSON ones under their own name).
FIELD_NAMES = tuple(f.name for f in fields(Deployment))


def dumps(value: object) -> str:
    """Compact JSON, as stored in the *_json columns."""
    return json.dumps(value, separators=(",", ":"), default=str)


def column(name: str) -> str:
    """The column holding the Deployment field `name`."""
    return _JSON_COLUMNS.get(name, name)


SELECT = f"SELECT {', '.join(column(n) for n in FIELD_NAMES)} FROM deployments"


def encode(name: str, value: object) -> object:
    """The Deployment field `name`'s value as written to its column."""
    if name in _JSON_COLUMNS:
        return dumps(value)
    if name in _BOOL_FIELDS:
        return int(bool(value))
    return value


def from_row(row: sqlite3.Row) -> Deployment:
    """The Deployment a row selected with `SELECT` holds."""
    values: dict[str, Any] = {}
    for name in FIELD_NAMES:
        raw = row[column(name)]
        if name in _JSON_COLUMNS:
            values[name] = json.loads(raw)
        elif name in _BOOL_FIELDS:
            values[name] = bool(raw)
        else:
            values[name] = raw
    return Deployment(**values)


# ---- opening: errors, checks, migrations -------------------------------------------


def translate(exc: sqlite3.Error, path: Path) -> ParError | None:
    """The ParError for an SQLite failure a person can act on, or None (a bug)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return ParError("store_locked",
                        f"the store {path} is locked by another process ({exc}); "
                        "is another pard running?", None, 503)
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return ParError("store_corrupt",
                        f"the store {path} is corrupted ({exc}); it was left untouched: "
                        "restore it from a backup or move it aside", None, 500)
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
                   sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        return ParError("store_unavailable", f"cannot use the store {path}: {exc}", None, 503)
    return None


def raise_translated(exc: sqlite3.Error, path: Path) -> NoReturn:
    """Raise `exc` as a ParError when it is one a person can act on, else unchanged (a bug)."""
    known = translate(exc, path)
    if known is None:
        raise exc
    raise known from exc


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def prepare(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]]) -> None:
    """Check the file, then set the connection up and migrate.

    The checks only read: a corrupted or too-new file is refused before
    anything (journal mode, schema) is written to it.
    """
    try:
        version = _user_version(conn)  # the first read: "not a database" shows here
        if version > len(migrations):
            raise ParError("store_too_new",
                           f"the store {path} has schema version {version}, newer than this "
                           f"pard knows ({len(migrations)}): upgrade PAR", None, 500)
        problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise ParError("store_corrupt",
                           f"the store {path} is corrupted ({'; '.join(problems[:3])}); it was "
                           "left untouched: restore it from a backup or move it aside",
                           None, 500)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ParError("store_unavailable",
                           f"the store {path} cannot use WAL mode (got {mode!r})", None, 503)
        # FULL: in WAL mode one fsync of the WAL per commit, so a deploy answered
        # 202 survives a power cut too (NORMAL could lose the last commits).  PAR
        # writes a few rows per deploy phase, so the fsync costs nothing noticeable.
        conn.execute("PRAGMA synchronous = FULL")
        _migrate(conn, path, migrations)
        # After migrating: table rebuilds in a migration need foreign keys off.
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        raise_translated(exc, path)


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]]) -> None:
    """Apply the missing migrations, each in one transaction with its new user_version."""
    for target in range(_user_version(conn) + 1, len(migrations) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            if _user_version(conn) >= target:
                conn.execute("ROLLBACK")
                continue
            for statement in migrations[target - 1]:
                conn.execute(statement)
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise sqlite3.IntegrityError(f"{len(broken)} rows break a foreign key")
            conn.execute(f"PRAGMA user_version = {int(target)}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            known = translate(exc, path)
            if known is not None:
                raise known from exc
            raise ParError("store_migration_failed",
                           f"the store {path} could not be migrated to schema version "
                           f"{target} ({exc}); it stays at version {target - 1}",
                           None, 500) from exc
