"""The deployment store: SQLite (WAL) at `state/par.db`, deployments and their events.

`pard` opens one `Store` (one connection, guarded by a lock, shared by the API
and the deploy workers).  Every write is one transaction started with
`BEGIN IMMEDIATE`: the write lock is taken up front, so a read-modify-write
(phases, current) never has to upgrade a read lock, which SQLite refuses at
once with "database is locked" instead of waiting for the busy timeout.

Every status change writes its event in the same transaction, so after a
kill -9 at any moment a deployment's row and its history agree.

The record is par.deployment's `Deployment`; the schema, its migrations and the
checks made on opening are in par.store_schema.  Both are re-exported here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from par.deployment import DESIRED_STATES, IN_FLIGHT, REDACTED, STATUSES, Deployment
from par.errors import NotFound, ParError
from par.store_schema import (
    FIELD_NAMES,
    MIGRATIONS,
    SELECT,
    column,
    dumps,
    encode,
    from_row,
    prepare,
    raise_translated,
)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "DESIRED_STATES",
    "IN_FLIGHT",
    "MIGRATIONS",
    "REDACTED",
    "STATUSES",
    "Deployment",
    "Store",
]

DEFAULT_BUSY_TIMEOUT_MS = 5000
# Fields `update` may change; identity, timestamps and `current` have their own methods.
_FROZEN_FIELDS = ("deployment_id", "agent_app_id", "request", "env", "current",
                  "created_at", "updated_at")
_UPDATABLE = frozenset(FIELD_NAMES) - frozenset(_FROZEN_FIELDS)


class Store:
    """Deployments and events in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path, conn: sqlite3.Connection,
                 clock: Callable[[], float], max_events: int | None = None) -> None:
        """Use `Store.open`."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._clock = clock
        # events kept per deployment (per agent for agent-wide ones); None: all
        self._max_events = max_events
        self._lock = threading.Lock()
        # notified after every commit (and on close): what `wait_for_change` waits on
        self._changed = threading.Condition(self._lock)
        self._commits = 0  # counts commits, for `wait_for_commit`

    # ---- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
             migrations: Sequence[Sequence[str]] = MIGRATIONS,
             clock: Callable[[], float] = time.time,
             max_events: int | None = None) -> Store:
        """Open (or create) the store at `path`, check it and migrate it to the latest schema.

        `max_events`: each deployment keeps its newest `max_events` events (agent-wide
        events: per agent); older ones are deleted as new ones are written.

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
            raise_translated(exc, path)
        try:
            conn.row_factory = sqlite3.Row
            prepare(conn, path, migrations)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, clock, max_events)

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
                    self._commits += 1
                    self._changed.notify_all()
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise_translated(exc, self.path)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read; each single SELECT in autocommit mode sees one consistent snapshot."""
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise_translated(exc, self.path)

    def _event(self, conn: sqlite3.Connection, deployment_id: str | None,
               agent_app_id: str | None, ts: float, event: str, message: str,
               fields: dict[str, object]) -> None:
        conn.execute(
            "INSERT INTO events (deployment_id, agent_app_id, ts, event, message, fields_json)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (deployment_id, agent_app_id, ts, event, message, dumps(fields)),
        )
        if self._max_events is not None:
            self._trim_events(conn, deployment_id, agent_app_id, self._max_events)

    @staticmethod
    def _trim_events(conn: sqlite3.Connection, deployment_id: str | None,
                     agent_app_id: str | None, keep: int) -> None:
        """Delete all but the newest `keep` events of one deployment (or, for
        agent-wide events, of one agent); cheap on the (deployment_id, id) index."""
        where = ("deployment_id = ?", (deployment_id,)) if deployment_id is not None else \
            ("deployment_id IS NULL AND agent_app_id IS ?", (agent_app_id,))
        conn.execute(
            f"DELETE FROM events WHERE {where[0]} AND id <= (SELECT id FROM events WHERE "
            f"{where[0]} ORDER BY id DESC LIMIT 1 OFFSET ?)", (*where[1], *where[1], keep))

    @staticmethod
    def _find(conn: sqlite3.Connection, deployment_id: str) -> Deployment | None:
        row = conn.execute(f"{SELECT} WHERE deployment_id = ?", (deployment_id,)).fetchone()
        return from_row(row) if row else None

    @classmethod
    def _get(cls, conn: sqlite3.Connection, deployment_id: str) -> Deployment:
        found = cls._find(conn, deployment_id)
        if found is None:
            raise NotFound(f"no deployment {deployment_id!r}", "deploymentId")
        return found

    @staticmethod
    def _save(conn: sqlite3.Connection, d: Deployment, names: Sequence[str]) -> None:
        """Write the fields `names` of `d` to its row."""
        sets = ", ".join(f"{column(n)} = ?" for n in names)
        values = [encode(n, getattr(d, n)) for n in names]
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
            columns = ", ".join(column(n) for n in FIELD_NAMES)
            marks = ", ".join("?" for _ in FIELD_NAMES)
            conn.execute(f"INSERT INTO deployments ({columns}) VALUES ({marks})",
                         [encode(n, getattr(d, n)) for n in FIELD_NAMES])
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
                    raise_translated(exc, self.path)
                remaining = deadline - time.monotonic()
                if current.updated_at != since or remaining <= 0:
                    return current
                self._changed.wait(remaining)

    def wait_for_commit(self, seen: int, timeout: float) -> int:
        """The number of commits so far, once it differs from `seen` (the caller's last
        answer) or after `timeout` seconds: how the front door's routes follow the store."""
        with self._changed:
            if self._commits == seen and self._conn is not None:
                self._changed.wait(timeout)
            return self._commits

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
                f"{SELECT}{clause} ORDER BY created_at DESC, rowid DESC", params
            ).fetchall()
        return [from_row(r) for r in rows]

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

    def set_env(self, deployment_id: str, env: dict[str, str]) -> Deployment:
        """Replace the deployment's own variables (`parctl env set --no-restart`): the
        values in `env`, their names (redacted) in the stored request; an event says
        which names changed, never a value."""
        with self._write() as conn:
            old = self._get(conn, deployment_id)
            request = dict(old.request)
            request["env"] = dict(env)  # Deployment redacts it
            now = self._clock()
            new = replace(old, request=request, env=dict(env), updated_at=now)
            self._save(conn, new, ["request", "env", "updated_at"])
            changed = sorted(k for k in set(env) | set(old.env) if env.get(k) != old.env.get(k))
            self._event(conn, deployment_id, new.agent_app_id, now, "env",
                        f"variables changed: {', '.join(changed) or 'none'}", {"keys": changed})
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
        row = conn.execute(f"{SELECT} WHERE agent_app_id = ? AND current = 1",
                           (agent_app_id,)).fetchone()
        return from_row(row) if row else None

    def current(self, agent_app_id: str) -> Deployment | None:
        """The agent's current (serving) deployment, or None."""
        with self._read() as conn:
            return self._current(conn, agent_app_id)

    def currents(self) -> list[Deployment]:
        """Every agent's current deployment, by agent id (what reconcile keeps running)."""
        with self._read() as conn:
            rows = conn.execute(f"{SELECT} WHERE current = 1 ORDER BY agent_app_id").fetchall()
        return [from_row(r) for r in rows]

    def latest_per_agent(self) -> list[Deployment]:
        """Each agent's newest deployment that was not removed, by agent id."""
        with self._read() as conn:
            rows = conn.execute(
                f"{SELECT} WHERE rowid IN (SELECT rowid FROM deployments d WHERE status != "
                "'removed' AND NOT EXISTS (SELECT 1 FROM deployments n WHERE n.agent_app_id = "
                "d.agent_app_id AND n.status != 'removed' AND (n.created_at > d.created_at OR "
                "(n.created_at = d.created_at AND n.rowid > d.rowid)))) ORDER BY agent_app_id"
            ).fetchall()
        return [from_row(r) for r in rows]

    def in_flight(self) -> list[Deployment]:
        """Deployments in pending/downloading/loading/starting/stopping, oldest first."""
        marks = ", ".join("?" for _ in IN_FLIGHT)
        with self._read() as conn:
            rows = conn.execute(f"{SELECT} WHERE status IN ({marks})"
                                " ORDER BY created_at, rowid", IN_FLIGHT).fetchall()
        return [from_row(r) for r in rows]

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


    # ---- retention (par.retention decides when) --------------------------------

    def prune_events(self, keep: int) -> int:
        """Keep the newest `keep` events of every deployment (agent-wide events: of every
        agent); return how many were deleted."""
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER "
                "(PARTITION BY deployment_id, agent_app_id ORDER BY id DESC) AS n FROM events) "
                "WHERE n > ?)", (max(keep, 0),))
            return cur.rowcount

    def prune_history(self, keep: int, updated_before: float) -> list[str]:
        """Delete past deployments (neither current nor in flight) beyond the newest
        `keep`, or last updated before `updated_before`; their events go with them.
        Return the deleted ids."""
        marks = ", ".join("?" for _ in IN_FLIGHT)
        with self._write() as conn:
            rows = conn.execute(
                "SELECT deployment_id, updated_at FROM deployments WHERE current = 0 AND "
                f"status NOT IN ({marks}) ORDER BY updated_at DESC, rowid DESC",
                IN_FLIGHT).fetchall()
            doomed = [r["deployment_id"] for i, r in enumerate(rows)
                      if i >= keep or r["updated_at"] < updated_before]
            for i in range(0, len(doomed), 500):  # SQLite's bound on host parameters
                chunk = doomed[i:i + 500]
                conn.execute("DELETE FROM deployments WHERE deployment_id IN "
                             f"({', '.join('?' for _ in chunk)})", chunk)
            return doomed


def _ended(phase: dict[str, float | None], now: float) -> dict[str, float | None]:
    start = phase.get("start")
    # Wall-clock time can step back; a negative duration helps no one.
    seconds = round(max(0.0, now - start), 3) if start is not None else None
    return {**phase, "end": now, "seconds": seconds}
