"""The embedded default: :class:`SharedState` in one SQLite file, correct across the processes of one host.

WAL mode, and every write a ``BEGIN IMMEDIATE`` transaction: SQLite then serialises writers on the
file's lock, across threads and processes, so "check, then mark used" cannot interleave.  The
recycled-authentication keys are the file's :class:`~hybridkex.recycle.SQLiteAuthKeyStore` tables
(the same file, validated and created by that store first).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..exceptions import StateError, StateReadOnly, StateSchemaError, StoreError
from ..recycle.store import SQLiteAuthKeyStore
from .base import SCHEMA_VERSION, Sealer, StateBase, advance_window

__all__ = ["SQLiteState"]

T = TypeVar("T")

_TABLES = """
CREATE TABLE IF NOT EXISTS state_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state_spent (
    scope TEXT NOT NULL, key_id TEXT NOT NULL, spent_at REAL NOT NULL, PRIMARY KEY (scope, key_id));
CREATE TABLE IF NOT EXISTS state_counters (
    scope TEXT PRIMARY KEY, top INTEGER NOT NULL, win BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state_held (
    scope TEXT NOT NULL, key_id TEXT NOT NULL, held_at REAL NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (scope, key_id));
CREATE TABLE IF NOT EXISTS state_tickets (
    kind TEXT NOT NULL, handle BLOB NOT NULL, secret BLOB NOT NULL, meta BLOB NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (kind, handle));
"""


class SQLiteState(StateBase):
    """:class:`~hybridkex.state.SharedState` in one SQLite file (created 0600).

    Args:
        path: the file; a new one is created, an existing one must be a hybridkex store.
        seal_key: the host's 32-byte state key (tickets are sealed under it; none: no tickets).
        max_keys, grace: the recycled-key store's window and grace period.
    """

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, seal_key: bytes | None = None, max_keys: int = 8,
                 grace: float = 60.0) -> None:
        self.path = Path(path)
        self._sealer = Sealer(seal_key) if seal_key is not None else None
        # The key store validates (or creates) the file before any table of ours is added to it.
        self._keys = SQLiteAuthKeyStore(self.path, max_keys=max_keys, grace=grace)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self._keys_uri(), uri=True, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._init_schema()
        except sqlite3.Error as exc:
            self._keys.close()
            raise self._error(exc, "open") from exc
        except BaseException:
            self._keys.close()
            raise

    def _keys_uri(self) -> str:
        return f"{self.path.resolve().as_uri()}?mode=rw"

    def __repr__(self) -> str:
        return f"SQLiteState({str(self.path)!r})"

    def _init_schema(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _TABLES.split(";"):  # not executescript: it would commit first
                if statement.strip():
                    db.execute(statement)
            rows = db.execute("SELECT version FROM state_schema").fetchall()
            if not rows:
                db.execute("INSERT INTO state_schema VALUES (?)", (SCHEMA_VERSION,))
            elif rows[0][0] != SCHEMA_VERSION:
                raise StateSchemaError(f"the state file {self.path} has schema version {rows[0][0]}; this hybridkex "
                                       f"uses {SCHEMA_VERSION} (open it with the hybridkex that wrote it)")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def schema_version(self) -> int:
        return int(self._read("read the schema version",
                              lambda db: db.execute("SELECT version FROM state_schema").fetchone()[0]))

    def _error(self, exc: sqlite3.Error, what: str) -> StateError:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "readonly" in text or "read-only" in text:
            return StateReadOnly(f"the state file {self.path} is read-only ({text}); {what} needs to write it")
        return StateError(f"cannot {what} in the state file {self.path}: {text}")

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: the file's write lock is taken before anything is read."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error(exc, what) from exc
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc, what) from exc
                raise

    def _read(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise self._error(exc, what) from exc

    # -- rows (checked and sealed by StateBase) ---------------------------------------------------

    @staticmethod
    def _spend_in(db: sqlite3.Connection, scope: str, ids: list[str], t: float) -> bool:
        for k in ids:
            if db.execute("INSERT OR IGNORE INTO state_spent VALUES (?,?,?)", (scope, k, t)).rowcount == 0:
                return False  # the caller rolls back the IDs inserted before it: all or none
            db.execute("DELETE FROM state_held WHERE scope=? AND key_id=?", (scope, k))
        return True

    def _spend_ids(self, scope: str, ids: list[str], t: float) -> bool:
        try:
            with self._write("spend key IDs") as db:
                if not self._spend_in(db, scope, ids, t):
                    raise _Refused
        except _Refused:
            return False
        return True

    def _is_spent(self, scope: str, key_id: str) -> bool:
        return self._read("read spent key IDs", lambda db: db.execute(
            "SELECT 1 FROM state_spent WHERE scope=? AND key_id=?", (scope, key_id)).fetchone() is not None)

    def _spend_counter(self, scope: str, index: int, window: int) -> str | None:
        with self._write("spend a counter") as db:
            return self._counter_in(db, scope, index, window)

    @staticmethod
    def _counter_in(db: sqlite3.Connection, scope: str, index: int, window: int) -> str | None:
        row = db.execute("SELECT top, win FROM state_counters WHERE scope=?", (scope,)).fetchone()
        top, win = (row[0], int.from_bytes(row[1], "big")) if row else (0, 0)
        top, win, why = advance_window(top, win, index, window)
        if why is None:
            db.execute("INSERT OR REPLACE INTO state_counters VALUES (?,?,?)",
                       (scope, top, win.to_bytes((window + 7) // 8, "big")))
        return why

    def _spend_claim(self, counter_scope: str, index: int, window: int, scope: str, ids: list[str], *,
                     t: float) -> str | None:
        with self._write("spend a steady-state claim") as db:
            why = self._counter_in(db, counter_scope, index, window)
            if why is not None:
                return why
            db.execute("SAVEPOINT ids")  # the counter stays spent whatever follows (fail closed)
            ok = self._spend_in(db, scope, ids, t)
            if not ok:
                db.execute("ROLLBACK TO ids")
            db.execute("RELEASE ids")
        return None if ok else "key used"

    def _hold(self, scope: str, ids: list[str], t: float, expires_at: float) -> int:
        with self._write("hold key IDs") as db:
            for k in ids:
                db.execute("INSERT OR IGNORE INTO state_held SELECT ?,?,?,? WHERE NOT EXISTS "
                           "(SELECT 1 FROM state_spent WHERE scope=? AND key_id=?)",
                           (scope, k, t, expires_at, scope, k))
            return int(db.execute("SELECT COUNT(*) FROM state_held WHERE scope=? AND expires_at > ?",
                                  (scope, t)).fetchone()[0])

    def _take(self, scope: str, key_id: str | None, t: float) -> str | None:
        with self._write("take a held key ID") as db:
            if key_id is None:
                row = db.execute("SELECT key_id FROM state_held WHERE scope=? AND expires_at > ? "
                                 "ORDER BY held_at, key_id LIMIT 1", (scope, t)).fetchone()
            else:
                row = db.execute("SELECT key_id FROM state_held WHERE scope=? AND key_id=? AND expires_at > ?",
                                 (scope, key_id, t)).fetchone()
            if row is None:
                return None
            taken = str(row[0])
            db.execute("DELETE FROM state_held WHERE scope=? AND key_id=?", (scope, taken))
            if db.execute("INSERT OR IGNORE INTO state_spent VALUES (?,?,?)", (scope, taken, t)).rowcount == 0:
                return None  # spent directly meanwhile: never handed out
            return taken

    def _held(self, scope: str, t: float) -> int:
        return self._read("count held key IDs", lambda db: int(db.execute(
            "SELECT COUNT(*) FROM state_held WHERE scope=? AND expires_at > ?", (scope, t)).fetchone()[0]))

    def _put_ticket(self, kind: str, handle: bytes, blob: bytes, meta: bytes, expires_at: float) -> None:
        with self._write("store a ticket") as db:
            db.execute("INSERT OR REPLACE INTO state_tickets VALUES (?,?,?,?,?)",
                       (kind, handle, blob, meta, expires_at))

    def _get_ticket(self, kind: str, handle: bytes, t: float, *, take: bool) -> tuple[bytes, bytes, float] | None:
        if take:
            with self._write("take a ticket") as db:
                row = db.execute("DELETE FROM state_tickets WHERE kind=? AND handle=? AND expires_at > ? "
                                 "RETURNING secret, meta, expires_at", (kind, handle, t)).fetchone()
        else:
            row = self._read("read a ticket", lambda db: db.execute(
                "SELECT secret, meta, expires_at FROM state_tickets WHERE kind=? AND handle=? AND expires_at > ?",
                (kind, handle, t)).fetchone())
        return None if row is None else (bytes(row[0]), bytes(row[1]), float(row[2]))

    def _drop_ticket(self, kind: str, handle: bytes) -> bool:
        with self._write("drop a ticket") as db:
            return bool(db.execute("DELETE FROM state_tickets WHERE kind=? AND handle=?", (kind, handle)).rowcount)

    def _swap_tickets(self, kind: str, put: list[tuple[bytes, bytes]], drop: list[bytes], expires_at: float) -> None:
        with self._write("store tickets") as db:
            db.executemany("DELETE FROM state_tickets WHERE kind=? AND handle=?", [(kind, h) for h in drop])
            db.executemany("INSERT OR REPLACE INTO state_tickets VALUES (?,?,?,?,?)",
                           [(kind, h, blob, b"", expires_at) for h, blob in put])

    def _purge(self, t: float, spent_before: float | None) -> int:
        with self._write("purge expired state") as db:
            n = db.execute("DELETE FROM state_tickets WHERE expires_at <= ?", (t,)).rowcount
            n += db.execute("DELETE FROM state_held WHERE expires_at <= ?", (t,)).rowcount
            if spent_before is not None:
                n += db.execute("DELETE FROM state_spent WHERE spent_at < ?", (spent_before,)).rowcount
            return int(n)

    def auth_keys(self) -> SQLiteAuthKeyStore:
        return self._keys

    def close(self) -> None:
        with contextlib.suppress(StoreError):  # a failed queued rotation: logged by the store's writer
            self._keys.close()
        with self._lock:
            self._db.close()

    def __enter__(self) -> SQLiteState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Refused(Exception):
    """Internal: one ID of a spend was used before; the transaction is rolled back."""
