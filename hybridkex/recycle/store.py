"""Durable, crash-safe storage of recycled authentication keys.

After the bootstrap, two peers authenticate each other with a key taken from the QKD-mixed output
of their previous handshake (``CombinedSecret.next_auth_key()``).  This module keeps those keys.

Rotation semantics (docs/spec.md, "Recycled authentication"):

* Every key has a 16-byte public ``key_id`` and an ``epoch``; the bootstrap is epoch 0.
* A handshake is authenticated with one key both sides hold (the initiator lists what it holds,
  newest first; the responder picks the newest it also holds).  Success proves both hold that key.
* After a successful handshake authenticated with key ``X`` (epoch ``e``), one transaction
  (:meth:`AuthKeyStore.rotate`) marks ``X`` confirmed, deletes every key of an epoch below ``e``
  (superseded: the peer has proven it holds ``X``), and inserts the key this handshake derived at
  epoch ``e + 1``.  Keys of epoch ``e`` other than ``X`` stay: a concurrent handshake may have
  derived them and the peer may hold them.
* Nothing is deleted before the peer has proven it holds a newer key, so a crash or a lost final
  message at any point leaves both sides with at least one common key: no lockout.  A deleted key
  is never accepted again.  At most ``max_keys`` keys are kept per pair; beyond that the oldest
  *unconfirmed* keys go first.
* Superseded keys are *spent* at once (:meth:`is_spent`, never offered, never stored again) but,
  for ``grace`` seconds, still accepted by a responder (``keys(..., include_superseded=True)``):
  a handshake that started before the supersession (its Hello was built from an older snapshot,
  e.g. one of 20 concurrent handshakes of the pair) then still finds its key.  With a grace at
  least the handshake timeout every handshake in flight completes; ``grace=0`` deletes at once.

The SQLite implementation uses WAL mode and ``BEGIN IMMEDIATE`` transactions, so a process killed at
any instant leaves either the old or the new state.  Handshakes record their rotation with
:meth:`SQLiteAuthKeyStore.rotate_later` (write-behind: a background thread commits queued rotations
in batches, one fsync each, off the handshake's critical path).  Reads see only committed state, so
a key is never offered or accepted before it is durable (the condition for "no lockout" when a
process dies: docs/recycle.md, section 5), and a read of a pair first waits for that pair's
rotations queued before it, so a handshake sees those of the handshakes finished before it.  Other
databases can implement :class:`AuthKeyStore` (see docs/recycle.md for a PostgreSQL mapping shared
by replicas).
Key material is never logged and never appears in ``repr``; inspection returns metadata only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ..exceptions import ConfigurationError, InvalidKeyMaterial, StoreError
from ._writer import WriteBehind

__all__ = ["AuthKey", "AuthKeyStore", "BootstrapState", "PairSummary", "SQLiteAuthKeyStore", "StoreError",
           "WriteBehindStore"]

KEY_ID_LEN = 16
KEY_LEN = 32
#: Longest a read waits for its pair's queued rotations (seconds) before it uses what is committed.
READ_WAIT = 2.0

#: What a store knows about a pair's bootstrap credential: never seen (no record of the pair),
#: still accepted, or retired (after the first recycled success, or by the operator).
BootstrapState = Literal["unknown", "active", "retired"]


@dataclass(frozen=True, slots=True)
class AuthKey:
    """One recycled authentication key. The key bytes never appear in ``repr``."""

    key_id: bytes
    epoch: int
    key: bytes = field(repr=False)
    created_at: float
    confirmed: bool
    #: Superseded, still accepted during the grace period (only with ``include_superseded``).
    superseded: bool = False

    def __repr__(self) -> str:
        gone = ", superseded" if self.superseded else ""
        return (f"AuthKey(key_id={self.key_id.hex()}, epoch={self.epoch}, confirmed={self.confirmed}{gone}, "
                "key=<redacted>)")


@dataclass(frozen=True, slots=True)
class PairSummary:
    """What an operator may see about a peer pair: epochs and times, never key material."""

    local_id: str
    peer_id: str
    keys: int
    newest_epoch: int | None
    confirmed_epoch: int | None
    bootstrap_retired: bool
    last_rotation_at: float | None
    rotations: int


class AuthKeyStore(Protocol):
    """Storage for recycled authentication keys of (local identity, peer identity) pairs."""

    def keys(self, local_id: str, peer_id: str, *, include_superseded: bool = False) -> list[AuthKey]:
        """Every key held for the pair, newest epoch first (ties: newest first); with
        ``include_superseded`` also superseded keys still inside the grace period (a responder's view)."""
        ...

    def find(self, local_id: str, peer_id: str, key_ids: Sequence[bytes]) -> list[AuthKey]:
        """The keys among ``key_ids`` this side can accept (live, or superseded within the grace
        period), newest first: a responder's choice, without reading the whole window."""
        ...

    def rotate(self, local_id: str, peer_id: str, *, used_key_id: bytes | None, new_key_id: bytes,
               new_key: bytes) -> None:
        """Atomically record a successful handshake (see module docs). ``used_key_id=None``: bootstrap."""
        ...

    def bootstrap_retired(self, local_id: str, peer_id: str) -> bool:
        """Whether the bootstrap credential of the pair may no longer be used."""
        ...

    def bootstrap_state(self, local_id: str, peer_id: str) -> BootstrapState:
        """``"unknown"`` (no record of the pair), ``"active"`` or ``"retired"``."""
        ...

    def retire_bootstrap(self, local_id: str, peer_id: str) -> None: ...

    def rebootstrap(self, local_id: str, peer_id: str) -> None:
        """Forget every recycled key of the pair and accept the bootstrap credential again."""
        ...

    def summaries(self) -> list[PairSummary]: ...


@runtime_checkable
class WriteBehindStore(AuthKeyStore, Protocol):
    """A store that can record a rotation after returning (:class:`SQLiteAuthKeyStore`).

    The contract that keeps "no lockout" (docs/recycle.md, section 5): rotations become durable in
    the order they were queued, and no read returns what a queued rotation has not made durable yet.
    """

    def rotate_later(self, local_id: str, peer_id: str, *, used_key_id: bytes | None, new_key_id: bytes,
                     new_key: bytes) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class _Rotation:
    """One rotation waiting for the writer (key bytes never in ``repr``)."""

    local_id: str
    peer_id: str
    used: bytes | None
    new_id: bytes
    new_key: bytes = field(repr=False)


def _rotation_error(exc: BaseException, path: Path) -> BaseException:
    """The typed error a failed rotation raises (or logs): a collision or spent ID, or the store."""
    if isinstance(exc, sqlite3.IntegrityError):
        return InvalidKeyMaterial("derived authentication key ID collides with a stored one")
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"cannot record key rotation in {path}: {exc}")
    return exc


_SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_keys (
    local_id   TEXT NOT NULL,
    peer_id    TEXT NOT NULL,
    key_id     BLOB NOT NULL,
    epoch      INTEGER NOT NULL,
    key        BLOB NOT NULL,
    created_at REAL NOT NULL,
    confirmed  INTEGER NOT NULL DEFAULT 0,
    superseded_at REAL,
    PRIMARY KEY (local_id, peer_id, key_id)
);
CREATE TABLE IF NOT EXISTS pairs (
    local_id          TEXT NOT NULL,
    peer_id           TEXT NOT NULL,
    bootstrap_retired INTEGER NOT NULL DEFAULT 0,
    rotations         INTEGER NOT NULL DEFAULT 0,
    last_rotation_at  REAL,
    PRIMARY KEY (local_id, peer_id)
);
CREATE TABLE IF NOT EXISTS spent_key_ids (
    local_id TEXT NOT NULL,
    peer_id  TEXT NOT NULL,
    key_id   BLOB NOT NULL,
    spent_at REAL NOT NULL,
    PRIMARY KEY (local_id, peer_id, key_id)
);
CREATE TABLE IF NOT EXISTS audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    local_id TEXT NOT NULL,
    peer_id  TEXT NOT NULL,
    event    TEXT NOT NULL,
    epoch    INTEGER,
    at       REAL NOT NULL
);
"""


#: SQLite ``PRAGMA application_id`` of a hybridkex key store ("HKXS"); 0.1.0 stores have 0.
APPLICATION_ID = 0x484B5853
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: The columns each table of a store has at least.
_REQUIRED: dict[str, frozenset[str]] = {
    "auth_keys": frozenset({"local_id", "peer_id", "key_id", "epoch", "key", "created_at", "confirmed"}),
    "pairs": frozenset({"local_id", "peer_id", "bootstrap_retired", "rotations", "last_rotation_at"}),
    "spent_key_ids": frozenset({"local_id", "peer_id", "key_id", "spent_at"}),
    "audit": frozenset({"id", "local_id", "peer_id", "event", "epoch", "at"}),
}


def _uri(path: Path, mode: str, *, immutable: bool = False) -> str:
    # as_uri() percent-encodes '?' and '#', so no file name can smuggle URI parameters in.
    return f"{path.resolve().as_uri()}?mode={mode}" + ("&immutable=1" if immutable else "")


def _not_a_store(path: Path, why: str) -> StoreError:
    return StoreError(f"not a hybridkex key store: {path} ({why}); it was left untouched. Pass the store "
                      "file the application created, or a path that does not exist yet")


def _check_store(path: Path, *, upgradable: bool) -> Literal["empty", "store"]:
    """Whether ``path`` is an empty file or a hybridkex store; raise StoreError otherwise.

    Reads only: the header by hand, then the schema through a read-only connection that is also
    ``immutable`` when no WAL file exists, so not even SQLite's ``-shm``/``-wal`` files appear next to
    a file that turns out not to be ours.
    """
    if not path.is_file():
        raise _not_a_store(path, "not a regular file")
    with path.open("rb") as f:
        header = f.read(100)
    if not header:
        if upgradable:
            return "empty"
        raise _not_a_store(path, "an empty file")
    if not header.startswith(_SQLITE_MAGIC) or len(header) < 100:
        raise _not_a_store(path, "not an SQLite database")
    app_id = int.from_bytes(header[68:72], "big")
    if app_id not in (0, APPLICATION_ID):
        raise _not_a_store(path, f"an SQLite database of another application, application_id {app_id:#010x}")
    immutable = not path.with_name(path.name + "-wal").exists()
    try:
        db = sqlite3.connect(_uri(path, "ro", immutable=immutable), uri=True, timeout=30)
        try:
            tables = {name: frozenset(r[1] for r in db.execute(f"PRAGMA table_info({name})"))
                      for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                      if name in _REQUIRED}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise _not_a_store(path, f"unreadable as SQLite: {exc}") from exc
    # auth_keys identifies a store; the other tables and superseded_at arrived during development
    # before 0.1.0, and a read-write open adds them.
    if "auth_keys" not in tables:
        raise _not_a_store(path, "no table auth_keys")
    for name, columns in tables.items():
        if missing := _REQUIRED[name] - columns:
            raise _not_a_store(path, f"table {name} lacks {', '.join(sorted(missing))}")
    if not upgradable and (len(tables) < len(_REQUIRED) or "superseded_at" not in tables["auth_keys"]):
        raise StoreError(f"{path} was written by a development version before hybridkex 0.1.0; open it "
                         "read-write once (any write command) to upgrade it")
    return "store"


class SQLiteAuthKeyStore:
    """:class:`AuthKeyStore` in one SQLite file (WAL, created 0600). Safe across threads and processes.

    Opening for writing (the default) creates a new store when ``path`` does not exist (or is an
    empty file) and otherwise accepts only a valid hybridkex store: any other file, an SQLite
    database of another application included, is refused with :class:`StoreError` and left
    untouched.  ``read_only=True`` (inspection: ``hybridkex recycle list``) never creates, writes or
    chmods anything; it opens the file through SQLite's ``mode=ro`` and refuses writes.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_keys: int = 8, grace: float = 60.0,
                 clock: Callable[[], float] = time.time,
                 crash_hook: Callable[[str], None] | None = None, read_only: bool = False,
                 write_behind: bool = True) -> None:
        if max_keys < 2:
            raise ConfigurationError("max_keys must be at least 2 (a two-key window)", field="max_keys")
        if not isinstance(grace, int | float) or isinstance(grace, bool) or not 0 <= grace <= 3600:
            raise ConfigurationError("grace must be 0..3600 seconds (at least the handshake timeout)",
                                     field="grace")
        self.path = Path(path)
        self.read_only = read_only
        #: Whether this call created the store (a new file, or an empty one).
        self.created = False
        self._max_keys = max_keys
        self._grace = float(grace)
        self._clock = clock
        # Test hook: called with a stage name inside the rotation transaction (crash-injection tests).
        self._crash_hook = crash_hook
        self._lock = threading.Lock()
        # Write-behind (rotate_later): its own connection, so reads (WAL snapshots) never wait for its fsync.
        self._wdb: sqlite3.Connection | None = None
        self._writer: WriteBehind[_Rotation] | None = None
        try:
            self._db = self._open_read_only() if read_only else self._open_read_write()
            if write_behind and not read_only:
                self._wdb = self._connect_writer()
                self._writer = WriteBehind(self._commit_batch, f"hybridkex-recycle-writer {self.path.name}",
                                           lambda: StoreError(f"{self.path} is closed; rotation not recorded"))
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open authentication-key store {self.path}: {exc}") from exc

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise StoreError(f"no key store at {self.path} (a read-only open creates nothing)")
        _check_store(self.path, upgradable=False)
        return sqlite3.connect(_uri(self.path, "ro"), uri=True, timeout=30, isolation_level=None,
                               check_same_thread=False)

    def _open_read_write(self) -> sqlite3.Connection:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            self.created = True
        except FileExistsError:
            # Never adopt a file that is not ours: validate before anything writes to it.
            self.created = _check_store(path, upgradable=True) == "empty"
        os.chmod(path, 0o600)  # a new file, an empty one, or a valid store: it holds key material
        db = sqlite3.connect(_uri(path, "rw"), uri=True, timeout=30, isolation_level=None,
                             check_same_thread=False)
        try:
            if self.created:
                # Schema and application ID are written before WAL mode is on, so they are in the main
                # file itself: a read-only validation sees them even while a writer holds the WAL.
                db.executescript(f"BEGIN; PRAGMA application_id={APPLICATION_ID}; {_SCHEMA} COMMIT;")
            else:
                if db.execute("PRAGMA application_id").fetchone()[0] == 0:  # a 0.1.0 store: mark it
                    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.executescript(_SCHEMA)  # IF NOT EXISTS: adds what a development version lacked
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            columns = {r[1] for r in db.execute("PRAGMA table_info(auth_keys)")}
            if "superseded_at" not in columns:  # a store written before the grace period existed
                db.execute("ALTER TABLE auth_keys ADD COLUMN superseded_at REAL")
        except BaseException:
            db.close()
            raise
        return db

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(_uri(self.path, "rw"), uri=True, timeout=30, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA synchronous=FULL")  # per connection: each batch is durable at COMMIT
        return db

    def __repr__(self) -> str:
        return f"SQLiteAuthKeyStore({str(self.path)!r})"

    def close(self) -> None:
        """Write what is queued (a failure is logged), then close."""
        if self._writer is not None:
            self._writer.close()
        with self._lock:
            self._db.close()
            if self._wdb is not None:
                self._wdb.close()

    def __enter__(self) -> SQLiteAuthKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ------------------------------------------------------------------------------------------

    def keys(self, local_id: str, peer_id: str, *, include_superseded: bool = False) -> list[AuthKey]:
        # Superseded keys past the grace period may linger until the next rotation purges them;
        # they are never returned.
        self._drain(local_id, peer_id)
        horizon = self._clock() - self._grace if include_superseded else float("inf")
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT key_id, epoch, key, created_at, confirmed, superseded_at FROM auth_keys "
                    "WHERE local_id=? AND peer_id=? AND (superseded_at IS NULL OR superseded_at > ?) "
                    "ORDER BY epoch DESC, created_at DESC, rowid DESC",
                    (local_id, peer_id, horizon),
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read authentication keys: {exc}") from exc
        return [AuthKey(bytes(r[0]), r[1], bytes(r[2]), r[3], bool(r[4]), r[5] is not None) for r in rows]

    def find(self, local_id: str, peer_id: str, key_ids: Sequence[bytes]) -> list[AuthKey]:
        ids = list(dict.fromkeys(bytes(k) for k in key_ids))[:64]  # bounded: a Hello lists at most 16
        if not ids:
            return []
        self._drain(local_id, peer_id)
        horizon = self._clock() - self._grace
        rows = []
        with self._lock:
            try:
                for key_id in ids:  # one primary-key lookup each
                    row = self._db.execute(
                        "SELECT key_id, epoch, key, created_at, confirmed, superseded_at, rowid FROM auth_keys "
                        "WHERE local_id=? AND peer_id=? AND key_id=? AND (superseded_at IS NULL OR superseded_at > ?)",
                        (local_id, peer_id, key_id, horizon)).fetchone()
                    if row is not None:
                        rows.append(row)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read authentication keys: {exc}") from exc
        rows.sort(key=lambda r: (r[1], r[3], r[6]), reverse=True)
        return [AuthKey(bytes(r[0]), r[1], bytes(r[2]), r[3], bool(r[4]), r[5] is not None) for r in rows]

    def _query(self, sql: str, params: tuple[object, ...], pair: tuple[str, str] | None = None) -> list[Any]:
        """Run a read under the lock once the pair's (None: every pair's) rotations queued so far are
        committed; a database failure becomes a StoreError naming the file."""
        self._drain(*(pair or (None, None)))
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read authentication-key store {self.path}: {exc}") from exc

    def bootstrap_retired(self, local_id: str, peer_id: str) -> bool:
        rows = self._query("SELECT bootstrap_retired FROM pairs WHERE local_id=? AND peer_id=?", (local_id, peer_id),
                           (local_id, peer_id))
        return bool(rows and rows[0][0])

    def bootstrap_state(self, local_id: str, peer_id: str) -> BootstrapState:
        """``"unknown"`` when the store has no record of the pair (never rotated, never armed by
        :meth:`rebootstrap`), else ``"active"`` or ``"retired"``."""
        self._drain(local_id, peer_id)
        with self._lock:
            try:
                row = self._db.execute("SELECT bootstrap_retired FROM pairs WHERE local_id=? AND peer_id=?",
                                       (local_id, peer_id)).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read authentication-key store {self.path}: {exc}") from exc
        if row is None:
            return "unknown"
        return "retired" if row[0] else "active"

    def is_spent(self, local_id: str, peer_id: str, key_id: bytes) -> bool:
        """Whether ``key_id`` was held once and has since been superseded: never offered or stored
        again, and never accepted again once the grace period is over."""
        return bool(self._query("SELECT 1 FROM spent_key_ids WHERE local_id=? AND peer_id=? AND key_id=?",
                                (local_id, peer_id, key_id), (local_id, peer_id)))

    def summaries(self) -> list[PairSummary]:
        rows = self._query(
                "SELECT p.local_id, p.peer_id, p.bootstrap_retired, p.rotations, p.last_rotation_at, "
                "(SELECT COUNT(*) FROM auth_keys k WHERE k.local_id=p.local_id AND k.peer_id=p.peer_id "
                " AND k.superseded_at IS NULL), "
                "(SELECT MAX(epoch) FROM auth_keys k WHERE k.local_id=p.local_id AND k.peer_id=p.peer_id "
                " AND k.superseded_at IS NULL), "
                "(SELECT MAX(epoch) FROM auth_keys k WHERE k.local_id=p.local_id AND k.peer_id=p.peer_id "
                " AND k.confirmed=1 AND k.superseded_at IS NULL) FROM pairs p ORDER BY p.local_id, p.peer_id", ())
        return [PairSummary(r[0], r[1], r[5], r[6], r[7], bool(r[2]), r[4], r[3]) for r in rows]

    def audit_log(self, local_id: str, peer_id: str) -> list[tuple[str, int | None, float]]:
        """(event, epoch, timestamp) rows of the pair, oldest first."""
        rows = self._query("SELECT event, epoch, at FROM audit WHERE local_id=? AND peer_id=? ORDER BY id",
                           (local_id, peer_id), (local_id, peer_id))
        return [(r[0], r[1], r[2]) for r in rows]

    # -- writes -----------------------------------------------------------------------------------------

    def rotate(self, local_id: str, peer_id: str, *, used_key_id: bytes | None, new_key_id: bytes,
               new_key: bytes) -> None:
        """Record a rotation now, durably (one fsync'd transaction), before returning."""
        rotation = self._rotation(local_id, peer_id, used_key_id, new_key_id, new_key)
        self._drain()  # after every rotation queued before it
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._hook("begin")
                self._rotate_in(self._db, rotation, self._clock())
                self._hook("before-commit")
                self._db.execute("COMMIT")
                self._hook("after-commit")
            except BaseException as exc:
                self._rollback(self._db)
                err = _rotation_error(exc, self.path)
                if err is exc:
                    raise
                raise err from exc

    def rotate_later(self, local_id: str, peer_id: str, *, used_key_id: bytes | None, new_key_id: bytes,
                     new_key: bytes) -> None:
        """Queue a rotation for the background writer and return at once (``write_behind=False``:
        :meth:`rotate`).  Reads never see it before it is committed (and the next read of the pair
        waits for that); a failure is logged and raised by the next :meth:`flush` (the pair keeps its keys)."""
        if self._writer is None:
            self.rotate(local_id, peer_id, used_key_id=used_key_id, new_key_id=new_key_id, new_key=new_key)
            return
        rotation = self._rotation(local_id, peer_id, used_key_id, new_key_id, new_key)
        self._hook("queued")
        self._writer.submit((local_id, peer_id), rotation)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued rotation is durable; raise the first that failed since the last flush."""
        if self._writer is not None:
            self._writer.flush(timeout)

    def pending_rotations(self) -> int:
        """Rotations queued and not yet durable (0 without write-behind)."""
        return self._writer.pending() if self._writer is not None else 0

    def _rotation(self, local_id: str, peer_id: str, used_key_id: bytes | None, new_key_id: bytes,
                  new_key: bytes) -> _Rotation:
        if len(new_key_id) != KEY_ID_LEN or len(new_key) != KEY_LEN:
            raise InvalidKeyMaterial(f"recycled keys are {KEY_LEN} bytes with {KEY_ID_LEN}-byte IDs")
        self._check_writable()
        return _Rotation(local_id, peer_id, None if used_key_id is None else bytes(used_key_id),
                         bytes(new_key_id), bytes(new_key))

    def _commit_batch(self, batch: Sequence[_Rotation]) -> list[BaseException | None]:
        """The writer thread: every queued rotation in one transaction (one fsync), each in a savepoint
        so that one refused rotation (a colliding key ID) does not undo the others."""
        db = self._wdb
        assert db is not None
        results: list[BaseException | None] = []
        now = self._clock()
        try:
            db.execute("BEGIN IMMEDIATE")
            self._hook("begin")
            for rotation in batch:
                db.execute("SAVEPOINT rotation")
                try:
                    self._rotate_in(db, rotation, now)
                except (InvalidKeyMaterial, sqlite3.IntegrityError) as exc:
                    db.execute("ROLLBACK TO rotation")
                    results.append(_rotation_error(exc, self.path))
                else:
                    results.append(None)
                db.execute("RELEASE rotation")
            self._hook("before-commit")
            db.execute("COMMIT")
            self._hook("after-commit")
        except BaseException as exc:
            self._rollback(db)
            return [_rotation_error(exc, self.path)] * len(batch)
        return results

    def _rotate_in(self, db: sqlite3.Connection, r: _Rotation, now: float) -> None:
        """One rotation inside the caller's transaction (module docs: confirm, supersede, insert, evict)."""
        local_id, peer_id, used_key_id, new_key_id, new_key = r.local_id, r.peer_id, r.used, r.new_id, r.new_key
        db.execute("INSERT OR IGNORE INTO pairs(local_id, peer_id) VALUES (?, ?)", (local_id, peer_id))
        if used_key_id is None:
            used_epoch = 0
        else:
            row = db.execute(
                "SELECT epoch FROM auth_keys WHERE local_id=? AND peer_id=? AND key_id=?",
                (local_id, peer_id, used_key_id)).fetchone()
            if row is None:
                # Superseded by a concurrent rotation: the key this handshake derived is still
                # stored (the peer may hold it), but nothing older than what exists is deleted.
                used_epoch = db.execute(
                    "SELECT COALESCE(MIN(epoch), 1) FROM auth_keys WHERE local_id=? AND peer_id=? "
                    "AND superseded_at IS NULL", (local_id, peer_id)).fetchone()[0]
            else:
                used_epoch = row[0]
                db.execute("UPDATE auth_keys SET confirmed=1 WHERE local_id=? AND peer_id=? AND key_id=?",
                           (local_id, peer_id, used_key_id))
                # The peer proved it holds `used`: every older epoch is superseded.
                db.execute(
                    "INSERT OR IGNORE INTO spent_key_ids SELECT local_id, peer_id, key_id, ? FROM auth_keys "
                    "WHERE local_id=? AND peer_id=? AND epoch < ?", (now, local_id, peer_id, used_epoch))
                # Spent at once; kept (never offered) for the grace period, for handshakes in flight.
                db.execute("UPDATE auth_keys SET superseded_at=? WHERE local_id=? AND peer_id=? "
                           "AND epoch < ? AND superseded_at IS NULL", (now, local_id, peer_id, used_epoch))
                db.execute("UPDATE pairs SET bootstrap_retired=1 WHERE local_id=? AND peer_id=? "
                           "AND bootstrap_retired=0", (local_id, peer_id))
        db.execute("DELETE FROM auth_keys WHERE local_id=? AND peer_id=? AND superseded_at IS NOT "
                   "NULL AND superseded_at <= ?", (local_id, peer_id, now - self._grace))
        self._hook("after-delete")
        if db.execute("SELECT 1 FROM spent_key_ids WHERE local_id=? AND peer_id=? AND key_id=?",
                      (local_id, peer_id, new_key_id)).fetchone():
            raise InvalidKeyMaterial("derived authentication key ID was already used once")
        db.execute(
            "INSERT INTO auth_keys(local_id, peer_id, key_id, epoch, key, created_at) VALUES (?,?,?,?,?,?)",
            (local_id, peer_id, new_key_id, used_epoch + 1, new_key, now))
        self._evict(db, local_id, peer_id, now)
        db.execute("UPDATE pairs SET rotations=rotations+1, last_rotation_at=? WHERE local_id=? "
                   "AND peer_id=?", (now, local_id, peer_id))
        db.execute("INSERT INTO audit(local_id, peer_id, event, epoch, at) VALUES (?,?,?,?,?)",
                   (local_id, peer_id, "rotate", used_epoch + 1, now))

    def _evict(self, db: sqlite3.Connection, local_id: str, peer_id: str, now: float) -> None:
        # Only live keys count: superseded ones are already spent and expire with the grace period.
        count = db.execute("SELECT COUNT(*) FROM auth_keys WHERE local_id=? AND peer_id=? AND "
                           "superseded_at IS NULL", (local_id, peer_id)).fetchone()[0]
        excess = count - self._max_keys
        if excess <= 0:
            return
        victims = db.execute(
            "SELECT key_id FROM auth_keys WHERE local_id=? AND peer_id=? AND superseded_at IS NULL "
            "ORDER BY confirmed ASC, epoch ASC, created_at ASC LIMIT ?", (local_id, peer_id, excess)).fetchall()
        for (key_id,) in victims:
            db.execute("INSERT OR IGNORE INTO spent_key_ids VALUES (?,?,?,?)", (local_id, peer_id, key_id, now))
            db.execute("DELETE FROM auth_keys WHERE local_id=? AND peer_id=? AND key_id=?",
                       (local_id, peer_id, key_id))

    def retire_bootstrap(self, local_id: str, peer_id: str) -> None:
        self._simple_write(local_id, peer_id, "retire-bootstrap",
                           "UPDATE pairs SET bootstrap_retired=1 WHERE local_id=? AND peer_id=?")

    def rebootstrap(self, local_id: str, peer_id: str) -> None:
        self._simple_write(local_id, peer_id, "rebootstrap",
                           "UPDATE pairs SET bootstrap_retired=0 WHERE local_id=? AND peer_id=?",
                           "DELETE FROM auth_keys WHERE local_id=? AND peer_id=?")

    def _simple_write(self, local_id: str, peer_id: str, event: str, *statements: str) -> None:
        self._check_writable()
        self._drain()  # a queued rotation must not bring back keys a rebootstrap forgets
        now = self._clock()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT OR IGNORE INTO pairs(local_id, peer_id) VALUES (?, ?)", (local_id, peer_id))
                if event == "rebootstrap":
                    self._db.execute("INSERT OR IGNORE INTO spent_key_ids SELECT local_id, peer_id, key_id, ? "
                                     "FROM auth_keys WHERE local_id=? AND peer_id=?", (now, local_id, peer_id))
                for sql in statements:
                    self._db.execute(sql, (local_id, peer_id))
                self._db.execute("INSERT INTO audit(local_id, peer_id, event, epoch, at) VALUES (?,?,?,?,?)",
                                 (local_id, peer_id, event, None, now))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(self._db)
                raise StoreError(f"cannot update {self.path}: {exc}") from exc

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} was opened read-only; open it without read_only=True to change it")

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):  # no transaction was open
            db.execute("ROLLBACK")

    def _drain(self, local_id: str | None = None, peer_id: str | None = None) -> None:
        """Wait for the rotations of the pair (None: of every pair) queued before this call: a
        handshake then sees the rotations of every handshake that finished before it started."""
        key = None if local_id is None else (local_id, peer_id)
        if self._writer is not None and self._writer.pending(key):
            # Bounded: a writer stuck on a lock held by another process must not stall handshakes.
            # Going on is safe, reads see only committed keys; at worst the previous key once more.
            self._writer.wait(key, READ_WAIT)

    def _hook(self, stage: str) -> None:
        if self._crash_hook is not None:
            self._crash_hook(stage)
