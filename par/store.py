"""The deployment store: SQLite (WAL) at `state/par.db`, deployments and their events.

`pard` opens one `Store` (one connection, guarded by a lock, shared by the API
and the deploy workers).  Every write is one transaction started with
`BEGIN IMMEDIATE`: the write lock is taken up front, so a read-modify-write
(phases, current) never has to upgrade a read lock, which SQLite refuses at
once with "database is locked" instead of waiting for the busy timeout.

Every status change writes its event in the same transaction, so after a
kill -9 at any moment a deployment's row and its history agree.

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` brings a
store from version `i` to `i + 1`, each in one transaction.  A store newer than
this code, a corrupted file or a file locked by another writer is refused with
a `ParError`, and the file is left as it was.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from par.errors import NotFound, ParError

STATUSES = (
    "pending", "downloading", "loading", "starting", "healthy",
    "failed", "stopping", "stopped", "removed",
)
# A deploy or stop is under way: reconcile finishes or fails these after a restart.
IN_FLIGHT = ("pending", "downloading", "loading", "starting", "stopping")
DESIRED_STATES = ("running", "stopped", "removed")
REDACTED = "***"
DEFAULT_BUSY_TIMEOUT_MS = 5000

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

# Deployment fields stored as JSON text, and the column each lives in.
_JSON_COLUMNS = {"request": "request_json", "env": "env_json",
                 "ports": "ports_json", "phases": "phases_json"}
_BOOL_FIELDS = ("current", "venv_reused")
# Fields `update` may change; identity, timestamps and `current` have their own methods.
_FROZEN_FIELDS = ("deployment_id", "agent_app_id", "request", "env", "current",
                  "created_at", "updated_at")


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Deployment:
    """One deployment as stored: a row of `deployments` with Python names.

    `request` is the deploy request as sent with its env values replaced by
    "***"; `env` holds the real values (the daemon needs them to re-create the
    unit after a reboot) and is never part of `to_api()`.  A request passed
    with real env values and an empty `env` is split accordingly.
    """

    deployment_id: str
    agent_app_id: str
    version: str
    package_url: str
    org_id: str = ""
    package_sha256: str | None = None  # as requested (packageSha256)
    request: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    status: str = "pending"
    desired_state: str = "running"
    current: bool = False
    error_code: str | None = None
    error_message: str | None = None
    error_field: str | None = None
    unit: str | None = None
    venv: str | None = None
    venv_reused: bool = False
    ports: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, float | None]] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    package_digest: str | None = None  # SHA-256 of the package bytes fetched

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if self.desired_state not in DESIRED_STATES:
            raise ValueError(f"unknown desired_state {self.desired_state!r}")
        # Copies: the caller's dicts may change later, a frozen record must not.
        request = copy.deepcopy(dict(self.request))
        env = dict(self.env)
        sent = request.get("env")
        if not env and isinstance(sent, dict):
            env = {str(k): v for k, v in sent.items()}
        if "env" in request or env:
            request["env"] = {k: REDACTED for k in env}
        object.__setattr__(self, "request", request)
        object.__setattr__(self, "env", env)
        object.__setattr__(self, "ports", dict(self.ports))
        object.__setattr__(self, "phases", copy.deepcopy(dict(self.phases)))

    @property
    def error(self) -> dict[str, str | None] | None:
        """`{code, message, field}` when the deployment failed, else None."""
        if self.error_code is None:
            return None
        return {"code": self.error_code, "message": self.error_message or "",
                "field": self.error_field}

    def full_request(self) -> dict[str, Any]:
        """The request as sent, real env values included (never return it to a caller)."""
        request = copy.deepcopy(self.request)
        if "env" in request:
            request["env"] = dict(self.env)
        return request

    def to_api(self) -> dict[str, Any]:
        """The deployment record of docs/api.md (camelCase; env values redacted)."""
        return {
            "deploymentId": self.deployment_id,
            "agentAppId": self.agent_app_id,
            "orgId": self.org_id,
            "version": self.version,
            "status": self.status,
            "current": self.current,
            "desiredState": self.desired_state,
            "error": self.error,
            "unit": self.unit,
            "venv": self.venv,
            "venvReused": self.venv_reused,
            "packageDigest": self.package_digest,
            "ports": dict(self.ports),
            "phases": copy.deepcopy(self.phases),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "request": copy.deepcopy(self.request),
        }


_FIELD_NAMES = tuple(f.name for f in fields(Deployment))
_UPDATABLE = frozenset(_FIELD_NAMES) - frozenset(_FROZEN_FIELDS)


def _column(name: str) -> str:
    return _JSON_COLUMNS.get(name, name)


_SELECT = f"SELECT {', '.join(_column(n) for n in _FIELD_NAMES)} FROM deployments"


def _encode(name: str, value: object) -> object:
    if name in _JSON_COLUMNS:
        return _dumps(value)
    if name in _BOOL_FIELDS:
        return int(bool(value))
    return value


def _from_row(row: sqlite3.Row) -> Deployment:
    values: dict[str, Any] = {}
    for name in _FIELD_NAMES:
        raw = row[_column(name)]
        if name in _JSON_COLUMNS:
            values[name] = json.loads(raw)
        elif name in _BOOL_FIELDS:
            values[name] = bool(raw)
        else:
            values[name] = raw
    return Deployment(**values)


def _translate(exc: sqlite3.Error, path: Path) -> ParError | None:
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


def _raise_translated(exc: sqlite3.Error, path: Path) -> NoReturn:
    """Raise `exc` as a ParError when it is one a person can act on, else unchanged (a bug)."""
    known = _translate(exc, path)
    if known is None:
        raise exc
    raise known from exc


class Store:
    """Deployments and events in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path, conn: sqlite3.Connection,
                 clock: Callable[[], float]) -> None:
        """Use `Store.open`."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._clock = clock
        self._lock = threading.Lock()
        # notified after every commit (and on close): what `wait_for_change` waits on
        self._changed = threading.Condition(self._lock)

    # ---- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
             migrations: Sequence[Sequence[str]] = MIGRATIONS,
             clock: Callable[[], float] = time.time) -> Store:
        """Open (or create) the store at `path`, check it and migrate it to the latest schema.

        Raises ParError `store_corrupt` (not a database, or quick_check fails),
        `store_too_new` (schema newer than this code), `store_locked` (another
        writer held the lock beyond `busy_timeout_ms`), `store_migration_failed`
        or `store_unavailable`.  On `store_corrupt` and `store_too_new` nothing
        has been written to the file.
        """
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite sees it: it holds agents' env values, and
            # SQLite gives the -wal and -shm files the database file's mode.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ParError("store_unavailable",
                           f"cannot create the store {path}: {exc.strerror}", None, 503) from exc
        try:
            conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            _raise_translated(exc, path)
        try:
            conn.row_factory = sqlite3.Row
            _prepare(conn, path, migrations)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, clock)

    def close(self) -> None:
        """Close the connection (later calls raise `store_closed`); idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._changed.notify_all()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transactions ----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ParError("store_closed", f"the store {self.path} is closed", None, 503)
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error)."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                    self._changed.notify_all()
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                _raise_translated(exc, self.path)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read; each single SELECT in autocommit mode sees one consistent snapshot."""
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                _raise_translated(exc, self.path)

    def _event(self, conn: sqlite3.Connection, deployment_id: str | None,
               agent_app_id: str | None, ts: float, event: str, message: str,
               fields: dict[str, object]) -> None:
        conn.execute(
            "INSERT INTO events (deployment_id, agent_app_id, ts, event, message, fields_json)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (deployment_id, agent_app_id, ts, event, message, _dumps(fields)),
        )

    @staticmethod
    def _find(conn: sqlite3.Connection, deployment_id: str) -> Deployment | None:
        row = conn.execute(f"{_SELECT} WHERE deployment_id = ?", (deployment_id,)).fetchone()
        return _from_row(row) if row else None

    @classmethod
    def _get(cls, conn: sqlite3.Connection, deployment_id: str) -> Deployment:
        found = cls._find(conn, deployment_id)
        if found is None:
            raise NotFound(f"no deployment {deployment_id!r}", "deploymentId")
        return found

    @staticmethod
    def _save(conn: sqlite3.Connection, d: Deployment, names: Sequence[str]) -> None:
        """Write the fields `names` of `d` to its row."""
        sets = ", ".join(f"{_column(n)} = ?" for n in names)
        values = [_encode(n, getattr(d, n)) for n in names]
        conn.execute(f"UPDATE deployments SET {sets} WHERE deployment_id = ?",
                     (*values, d.deployment_id))

    # ---- deployments -----------------------------------------------------------

    def insert_deployment(self, d: Deployment) -> tuple[Deployment, bool]:
        """Store a new deployment: `(d, True)`, or `(existing, False)` if the id is taken.

        created_at and updated_at are set to now; an `accepted` event is written
        in the same transaction.  `d.current` must be False (see `set_current`).
        """
        if d.current:
            raise ValueError("insert deployments with current=False, then call set_current")
        with self._write() as conn:
            existing = self._find(conn, d.deployment_id)
            if existing is not None:
                return existing, False
            now = self._clock()
            d = replace(d, created_at=now, updated_at=now)
            columns = ", ".join(_column(n) for n in _FIELD_NAMES)
            marks = ", ".join("?" for _ in _FIELD_NAMES)
            conn.execute(f"INSERT INTO deployments ({columns}) VALUES ({marks})",
                         [_encode(n, getattr(d, n)) for n in _FIELD_NAMES])
            self._event(conn, d.deployment_id, d.agent_app_id, now, "accepted",
                        f"deployment of {d.agent_app_id} {d.version} accepted",
                        {"status": d.status})
            return d, True

    def get(self, deployment_id: str) -> Deployment:
        """The deployment `deployment_id`; NotFound if there is none."""
        with self._read() as conn:
            return self._get(conn, deployment_id)

    def wait_for_change(self, deployment_id: str, since: float, timeout: float) -> Deployment:
        """The deployment once its `updated_at` differs from `since` (every change of
        its status, phases or fields sets it), or as it is after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                try:
                    current = self._get(self._connection(), deployment_id)
                except sqlite3.Error as exc:
                    _raise_translated(exc, self.path)
                remaining = deadline - time.monotonic()
                if current.updated_at != since or remaining <= 0:
                    return current
                self._changed.wait(remaining)

    def find(self, deployment_id: str) -> Deployment | None:
        """The deployment `deployment_id`, or None."""
        with self._read() as conn:
            return self._find(conn, deployment_id)

    def deployments(self, agent_app_id: str | None = None,
             status: str | None = None) -> list[Deployment]:
        """Deployments, newest first, optionally of one agent and/or in one status."""
        where, params = [], []
        if agent_app_id is not None:
            where.append("agent_app_id = ?")
            params.append(agent_app_id)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            rows = conn.execute(
                f"{_SELECT}{clause} ORDER BY created_at DESC, rowid DESC", params
            ).fetchall()
        return [_from_row(r) for r in rows]

    def update(self, deployment_id: str, /, **changes: Any) -> Deployment:
        """Change fields of a deployment (Python names), set updated_at; return the new record.

        `deployment_id`, `agent_app_id`, `request`, `env`, `current` and the
        timestamps cannot be changed here.  A status change writes a `status`
        event in the same transaction.
        """
        unknown = sorted(set(changes) - _UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update {', '.join(unknown)}")
        with self._write() as conn:
            old = self._get(conn, deployment_id)
            now = self._clock()
            new = replace(old, **changes, updated_at=now)
            self._save(conn, new, [*changes, "updated_at"])
            if new.status != old.status:
                self._event(conn, deployment_id, new.agent_app_id, now, "status",
                            f"{old.status} -> {new.status}",
                            {"status": new.status, "previous": old.status})
            return new

    def start_phase(self, deployment_id: str, phase: str, status: str) -> Deployment:
        """Record that `phase` started now and set `status`."""
        with self._write() as conn:
            old = self._get(conn, deployment_id)
            now = self._clock()
            phases = {**old.phases, phase: {"start": now, "end": None, "seconds": None}}
            new = replace(old, status=status, phases=phases, updated_at=now)
            self._save(conn, new, ["status", "phases", "updated_at"])
            self._event(conn, deployment_id, new.agent_app_id, now, "phase_started",
                        f"{phase} started", {"phase": phase, "status": status,
                                             "previous": old.status})
            return new

    def end_phase(self, deployment_id: str, phase: str) -> Deployment:
        """Record that `phase` ended now, with its duration in seconds."""
        with self._write() as conn:
            old = self._get(conn, deployment_id)
            if phase not in old.phases:
                raise ValueError(f"phase {phase!r} of {deployment_id} was never started")
            now = self._clock()
            phases = {**old.phases, phase: _ended(old.phases[phase], now)}
            new = replace(old, phases=phases, updated_at=now)
            self._save(conn, new, ["phases", "updated_at"])
            seconds = phases[phase]["seconds"]
            self._event(conn, deployment_id, new.agent_app_id, now, "phase_ended",
                        f"{phase} took {seconds} s", {"phase": phase, "seconds": seconds})
            return new

    def fail(self, deployment_id: str, code: str, message: str,
             field: str | None = None) -> Deployment:
        """Mark the deployment failed with an error; phases still open are ended now."""
        with self._write() as conn:
            old = self._get(conn, deployment_id)
            now = self._clock()
            phases = {name: (_ended(p, now) if p.get("end") is None else p)
                      for name, p in old.phases.items()}
            new = replace(old, status="failed", error_code=code, error_message=message,
                          error_field=field, phases=phases, updated_at=now)
            self._save(conn, new, ["status", "error_code", "error_message", "error_field",
                                   "phases", "updated_at"])
            self._event(conn, deployment_id, new.agent_app_id, now, "failed", message,
                        {"code": code, "field": field, "previous": old.status})
            return new

    def set_current(self, agent_app_id: str, deployment_id: str) -> Deployment | None:
        """Make `deployment_id` the agent's current one; return the one it replaced, or None.

        Both changes happen in one transaction (the old one is cleared first,
        so the one-current index never sees two).
        """
        with self._write() as conn:
            new = self._get(conn, deployment_id)
            if new.agent_app_id != agent_app_id:
                raise ParError("conflict", f"deployment {deployment_id} belongs to "
                               f"{new.agent_app_id}, not {agent_app_id}", "agentAppId", 409)
            previous = self._current(conn, agent_app_id)
            if previous is not None and previous.deployment_id == deployment_id:
                return None
            now = self._clock()
            if previous is not None:
                previous = replace(previous, current=False, updated_at=now)
                self._save(conn, previous, ["current", "updated_at"])
                self._event(conn, previous.deployment_id, agent_app_id, now, "replaced",
                            f"replaced by {deployment_id}", {"by": deployment_id})
            self._save(conn, replace(new, current=True, updated_at=now),
                       ["current", "updated_at"])
            self._event(conn, deployment_id, agent_app_id, now, "current",
                        f"{deployment_id} is now the current deployment of {agent_app_id}",
                        {"previous": previous.deployment_id if previous else None})
            return previous

    def clear_current(self, agent_app_id: str) -> Deployment | None:
        """Leave the agent with no current deployment; return the one that was, or None."""
        with self._write() as conn:
            previous = self._current(conn, agent_app_id)
            if previous is None:
                return None
            now = self._clock()
            previous = replace(previous, current=False, updated_at=now)
            self._save(conn, previous, ["current", "updated_at"])
            self._event(conn, previous.deployment_id, agent_app_id, now, "not_current",
                        f"{agent_app_id} has no current deployment", {})
            return previous

    @staticmethod
    def _current(conn: sqlite3.Connection, agent_app_id: str) -> Deployment | None:
        row = conn.execute(f"{_SELECT} WHERE agent_app_id = ? AND current = 1",
                           (agent_app_id,)).fetchone()
        return _from_row(row) if row else None

    def current(self, agent_app_id: str) -> Deployment | None:
        """The agent's current (serving) deployment, or None."""
        with self._read() as conn:
            return self._current(conn, agent_app_id)

    def currents(self) -> list[Deployment]:
        """Every agent's current deployment, by agent id (what reconcile keeps running)."""
        with self._read() as conn:
            rows = conn.execute(f"{_SELECT} WHERE current = 1 ORDER BY agent_app_id").fetchall()
        return [_from_row(r) for r in rows]

    def latest_per_agent(self) -> list[Deployment]:
        """Each agent's newest deployment that was not removed, by agent id."""
        with self._read() as conn:
            rows = conn.execute(
                f"{_SELECT} WHERE rowid IN (SELECT rowid FROM deployments d WHERE status != "
                "'removed' AND NOT EXISTS (SELECT 1 FROM deployments n WHERE n.agent_app_id = "
                "d.agent_app_id AND n.status != 'removed' AND (n.created_at > d.created_at OR "
                "(n.created_at = d.created_at AND n.rowid > d.rowid)))) ORDER BY agent_app_id"
            ).fetchall()
        return [_from_row(r) for r in rows]

    def in_flight(self) -> list[Deployment]:
        """Deployments in pending/downloading/loading/starting/stopping, oldest first."""
        marks = ", ".join("?" for _ in IN_FLIGHT)
        with self._read() as conn:
            rows = conn.execute(f"{_SELECT} WHERE status IN ({marks})"
                                " ORDER BY created_at, rowid", IN_FLIGHT).fetchall()
        return [_from_row(r) for r in rows]

    def counts_by_status(self) -> dict[str, int]:
        """Count by status of the deployments that matter now, every status present (0 too).

        Counted: every current deployment, plus every in-flight one (a deploy
        under way, not yet current).  Old, replaced or failed deployments that
        are not current are history and are not counted.
        """
        marks = ", ".join("?" for _ in IN_FLIGHT)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT status, COUNT(*) FROM deployments"
                f" WHERE current = 1 OR status IN ({marks}) GROUP BY status", IN_FLIGHT
            ).fetchall()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({status: n for status, n in rows})
        return counts

    def delete(self, deployment_id: str) -> Deployment:
        """Delete a deployment and its events; return what was deleted (NotFound if none)."""
        with self._write() as conn:
            old = self._get(conn, deployment_id)
            conn.execute("DELETE FROM deployments WHERE deployment_id = ?", (deployment_id,))
            return old

    # ---- events ----------------------------------------------------------------

    def add_event(self, deployment_id: str | None, agent_app_id: str | None, event: str,
                  message: str = "", **fields: object) -> None:
        """Append an event (`deployment_id` None: about the agent or the daemon)."""
        with self._write() as conn:
            if deployment_id is not None:
                self._get(conn, deployment_id)
            self._event(conn, deployment_id, agent_app_id, self._clock(), event, message,
                        fields)

    def events(self, deployment_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """A deployment's events `{ts, event, message, fields}`, oldest first.

        With `limit`, the newest `limit` events (still oldest first).  An
        unknown deployment has no events (no NotFound).
        """
        sql = "SELECT ts, event, message, fields_json FROM events WHERE deployment_id = ?"
        with self._read() as conn:
            if limit is None:
                rows = conn.execute(f"{sql} ORDER BY id", (deployment_id,)).fetchall()
            else:
                rows = conn.execute(f"{sql} ORDER BY id DESC LIMIT ?",
                                    (deployment_id, max(limit, 0))).fetchall()
                rows.reverse()
        return [{"ts": r["ts"], "event": r["event"], "message": r["message"],
                 "fields": json.loads(r["fields_json"])} for r in rows]


def _ended(phase: dict[str, float | None], now: float) -> dict[str, float | None]:
    start = phase.get("start")
    # Wall-clock time can step back; a negative duration helps no one.
    seconds = round(max(0.0, now - start), 3) if start is not None else None
    return {**phase, "end": now, "seconds": seconds}


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _prepare(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]]) -> None:
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
        _raise_translated(exc, path)


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
            known = _translate(exc, path)
            if known is not None:
                raise known from exc
            raise ParError("store_migration_failed",
                           f"the store {path} could not be migrated to schema version "
                           f"{target} ({exc}); it stays at version {target - 1}",
                           None, 500) from exc
