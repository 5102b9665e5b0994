""":class:`SharedState` in PostgreSQL (psycopg 3), for fleets: every process of every host shares it.

"Use at most once" is PostgreSQL's to enforce, not ours: a spend is ``INSERT ... ON CONFLICT DO
NOTHING`` on a primary key (a second inserter waits for the first's commit, then inserts nothing),
a counter window is read ``FOR UPDATE`` (one writer per scope at a time), and a pooled ID is taken
with ``FOR UPDATE SKIP LOCKED`` (concurrent takers get different rows, none waits).  Every call is
one transaction under READ COMMITTED, which these statements make sufficient.  The spends on a
connection's critical path are server-side functions (schema migration 1): one round trip each.

The schema is versioned (table ``hybridkex_schema``); a new database gets every migration, an older
one is migrated only when asked (``migrate=True``: a fleet upgrades its schema once, deliberately),
a newer one is refused.  Failures are one line: :class:`~hybridkex.exceptions.StateUnavailable`
(unreachable, restarting), :class:`~hybridkex.exceptions.StateReadOnly`,
:class:`~hybridkex.exceptions.StateSchemaError`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..exceptions import (
    ConfigurationError,
    StateError,
    StateReadOnly,
    StateSchemaError,
    StateUnavailable,
    UnsupportedAlgorithm,
)
from . import base
from .base import SCHEMA_VERSION, Sealer, StateBase
from .pgkeys import PostgresAuthKeyStore

if TYPE_CHECKING:
    import psycopg

__all__ = ["MIGRATIONS", "PostgresState"]

T = TypeVar("T")

#: Schema migrations, in order: version N is MIGRATIONS[N - 1].  Append only; never edit a released one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: anti-replay and tickets.  The spends are functions: one round trip each, atomic as one statement.
    ("CREATE TABLE state_spent (scope text NOT NULL, key_id text NOT NULL, spent_at double precision NOT NULL, "
     "PRIMARY KEY (scope, key_id))",
     # win: bit o (from the left, 0-based) set when counter top - o was accepted (IPsec's window)
     "CREATE TABLE state_counters (scope text PRIMARY KEY, top bigint NOT NULL, win varbit NOT NULL)",
     "CREATE TABLE state_held (scope text NOT NULL, key_id text NOT NULL, held_at double precision NOT NULL, "
     "expires_at double precision NOT NULL, PRIMARY KEY (scope, key_id))",
     "CREATE INDEX state_held_order ON state_held (scope, held_at, key_id)",
     "CREATE TABLE state_tickets (kind text NOT NULL, handle bytea NOT NULL, secret bytea NOT NULL, "
     "meta bytea NOT NULL, expires_at double precision NOT NULL, PRIMARY KEY (kind, handle))",
     """CREATE FUNCTION hybridkex_spend_ids(p_scope text, p_ids text[], p_at double precision) RETURNS boolean
        LANGUAGE plpgsql AS $f$
        DECLARE n bigint;
        BEGIN
          -- A second inserter of an ID waits for the first's commit, then inserts nothing.
          INSERT INTO state_spent SELECT p_scope, k, p_at FROM unnest(p_ids) AS k ON CONFLICT DO NOTHING;
          GET DIAGNOSTICS n = ROW_COUNT;
          IF n < cardinality(p_ids) THEN
            RAISE EXCEPTION USING ERRCODE = 'HK001';  -- undoes this block's inserts: all or none
          END IF;
          DELETE FROM state_held WHERE scope = p_scope AND key_id = ANY(p_ids);
          RETURN true;
        EXCEPTION WHEN SQLSTATE 'HK001' THEN
          RETURN false;
        END $f$""",
     """CREATE FUNCTION hybridkex_spend_counter(p_scope text, p_index bigint, p_width integer) RETURNS text
        LANGUAGE plpgsql AS $f$
        DECLARE v_top bigint; v_win varbit; v_off bigint;
        BEGIN
          INSERT INTO state_counters VALUES (p_scope, 0, repeat('0', p_width)::varbit) ON CONFLICT DO NOTHING;
          SELECT top, win INTO v_top, v_win FROM state_counters WHERE scope = p_scope FOR UPDATE;
          IF length(v_win) <> p_width THEN  -- another window width than before: keep what fits
            v_win := substring(v_win || repeat('0', p_width)::varbit FROM 1 FOR p_width);
          END IF;
          IF p_index > v_top THEN
            IF p_index - v_top >= p_width THEN
              v_win := repeat('0', p_width)::varbit;
            ELSE
              v_win := v_win >> (p_index - v_top)::integer;
            END IF;
            UPDATE state_counters SET top = p_index, win = set_bit(v_win, 0, 1) WHERE scope = p_scope;
            RETURN NULL;
          END IF;
          v_off := v_top - p_index;
          IF v_off >= p_width THEN
            RETURN 'too old';
          END IF;
          IF get_bit(v_win, v_off::integer) = 1 THEN
            RETURN 'replayed';
          END IF;
          UPDATE state_counters SET win = set_bit(v_win, v_off::integer, 1) WHERE scope = p_scope;
          RETURN NULL;
        END $f$""",
     """CREATE FUNCTION hybridkex_spend_claim(p_counter text, p_index bigint, p_width integer, p_scope text,
                                              p_ids text[], p_at double precision) RETURNS text
        LANGUAGE plpgsql AS $f$
        DECLARE why text;
        BEGIN
          why := hybridkex_spend_counter(p_counter, p_index, p_width);
          IF why IS NOT NULL THEN
            RETURN why;
          END IF;
          -- the counter stays spent whatever follows (fail closed)
          IF cardinality(p_ids) > 0 AND NOT hybridkex_spend_ids(p_scope, p_ids, p_at) THEN
            RETURN 'key used';
          END IF;
          RETURN NULL;
        END $f$"""),
    # 2: recycled-authentication keys (hybridkex.state.pgkeys), the key bytes sealed
    ("CREATE TABLE auth_pairs (local_id text NOT NULL, peer_id text NOT NULL, "
     "bootstrap_retired boolean NOT NULL DEFAULT false, rotations bigint NOT NULL DEFAULT 0, "
     "last_rotation_at double precision, PRIMARY KEY (local_id, peer_id))",
     "CREATE TABLE auth_keys (local_id text NOT NULL, peer_id text NOT NULL, key_id bytea NOT NULL, "
     "epoch bigint NOT NULL, sealed_key bytea NOT NULL, created_at double precision NOT NULL, "
     "confirmed boolean NOT NULL DEFAULT false, superseded_at double precision, seq bigserial, "
     "PRIMARY KEY (local_id, peer_id, key_id))",
     "CREATE TABLE auth_spent (local_id text NOT NULL, peer_id text NOT NULL, key_id bytea NOT NULL, "
     "spent_at double precision NOT NULL, PRIMARY KEY (local_id, peer_id, key_id))",
     "CREATE TABLE auth_audit (id bigserial PRIMARY KEY, local_id text NOT NULL, peer_id text NOT NULL, "
     "event text NOT NULL, epoch bigint, at double precision NOT NULL)"),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

#: Seconds after a failed connection attempt during which calls fail at once with the same error: a
#: database that is down costs one connection attempt per interval, not one per connection (the asyncio
#: servers call the state from their event loop).
RETRY_AFTER: Final = 0.5

#: pg_advisory_xact_lock key held while the schema is created or migrated ("HKXS").
_SCHEMA_LOCK: Final = 0x484B5853


def _pool_class() -> Any:
    try:
        from psycopg_pool import ConnectionPool  # noqa: PLC0415 - optional, as psycopg
    except ImportError:  # pragma: no cover - psycopg-pool is in the [postgresql] and [test] extras
        raise UnsupportedAlgorithm('the PostgreSQL state backend needs psycopg-pool: pip install '
                                   '"hybridkex[postgresql]"') from None
    return ConnectionPool


def _pool_timeout() -> type[Exception]:
    from psycopg_pool import PoolTimeout  # noqa: PLC0415 - imported with the pool

    return PoolTimeout


def _psycopg() -> Any:
    try:
        import psycopg  # noqa: PLC0415 - optional: only a PostgreSQL state needs it installed
    except ImportError:  # pragma: no cover - psycopg is in the [postgresql] and [test] extras
        raise UnsupportedAlgorithm('the PostgreSQL state backend needs psycopg 3: pip install "hybridkex[postgresql]"'
                                   ) from None
    return psycopg


class PostgresState(StateBase):
    """:class:`~hybridkex.state.SharedState` in a PostgreSQL database (thread-safe: a psycopg_pool
    pool of connections, each re-established after the server restarts).

    Args:
        url: ``postgresql://user@host/db`` (libpq URI or ``key=value`` string).
        seal_key: the host's 32-byte state key: tickets and recycled keys are stored only sealed under it.
        migrate: bring an older schema to this version (otherwise StateSchemaError).
        connect_timeout: seconds to wait for the server (libpq ``connect_timeout``, and for a pooled
            connection); after a failed attempt, calls fail at once for :data:`RETRY_AFTER` seconds.
        pool_size: connections at most (one per thread in a database call at once; one is kept open).
    """

    backend = "postgresql"

    def __init__(self, url: str, *, seal_key: bytes | None = None, migrate: bool = False, max_keys: int = 8,
                 grace: float = 60.0, connect_timeout: int = 2, pool_size: int = 4) -> None:
        self._pg = _psycopg()
        self._url = url
        self.where = base.redact_url(url)
        self._timeout = connect_timeout
        self._sealer = Sealer(seal_key) if seal_key is not None else None
        self._max_keys, self._grace = max_keys, grace
        self._keys: PostgresAuthKeyStore | None = None
        self._down: tuple[float, StateError] | None = None  # (until, error) after a failed connection
        if not 1 <= pool_size <= 256:
            raise ConfigurationError("must be 1..256", field="pool_size")
        self._size = pool_size
        conn = self._connect()  # the schema check on a connection of its own: its errors are one line
        try:
            self._init_schema(conn, migrate)
        finally:
            with contextlib.suppress(self._pg.Error):
                conn.close()
        self._renew = threading.Lock()
        self._pool = self._new_pool()

    def __repr__(self) -> str:
        return f"PostgresState({self.where!r})"

    # -- connection and errors ----------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        """A connection of its own (the schema check; the reason a pool cannot connect)."""
        try:
            conn = self._pg.connect(self._url, autocommit=True, connect_timeout=self._timeout,
                                    application_name="hybridkex")
        except self._pg.Error as exc:
            error = self._error(exc, "connect")
            self._down = (time.monotonic() + RETRY_AFTER, error)
            raise error from None
        self._down = None
        return conn  # type: ignore[no-any-return]

    def _error(self, exc: BaseException, what: str) -> StateError:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        text = lines[0] if lines else type(exc).__name__
        errors = self._pg.errors
        if isinstance(exc, errors.ReadOnlySqlTransaction):
            return StateReadOnly(f"the PostgreSQL state database {self.where} is read-only (a standby, or "
                                 f"default_transaction_read_only); cannot {what}: {text}")
        if isinstance(exc, self._pg.OperationalError):
            return StateUnavailable(f"the PostgreSQL state database {self.where} is unreachable (cannot {what}): "
                                    f"{text}")
        return StateError(f"the PostgreSQL state database {self.where} refused to {what}: {text}")

    def run(self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *, single: bool = False) -> T:
        """``fn(conn)`` on a pooled connection, in one transaction (``single``: ``fn`` runs one
        statement, its own transaction, saving the BEGIN and COMMIT round trips).  A pooled
        connection that broke since its last use (the server restarted) is discarded by the pool and
        the call runs on the next; a failure on every one is the caller's error.  Retrying after a
        commit whose answer was lost is safe: a spend then finds its IDs spent and refuses (fail
        closed), it never accepts twice."""
        down = self._down
        if down is not None and time.monotonic() < down[0]:
            raise type(down[1])(str(down[1]))
        timeout_error = _pool_timeout()
        for attempt in range(self._size + 1):
            try:
                with self._pool.connection(timeout=self._timeout) as conn:
                    if single:
                        return fn(conn)
                    with conn.transaction():
                        return fn(conn)
            except timeout_error:
                return self._direct(what, fn, single=single)
            except self._pg.OperationalError as exc:
                if attempt == self._size:
                    raise self._error(exc, what) from None
            except self._pg.Error as exc:
                raise self._error(exc, what) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _direct(self, what: str, fn: Callable[[psycopg.Connection[Any]], T], *, single: bool) -> T:
        """The pool gave no connection in time: one direct attempt, which says why in one line if the
        server is down.  If it is up again, the pool is still backing off its reconnects: this call
        runs on the direct connection and a fresh pool (no back-off) serves the next ones."""
        conn = self._connect()
        with self._renew:
            old, self._pool = self._pool, self._new_pool()
        threading.Thread(target=old.close, name="hybridkex-state-pool-close", daemon=True).start()
        try:
            if single:
                return fn(conn)
            with conn.transaction():
                return fn(conn)
        except self._pg.Error as exc:
            raise self._error(exc, what) from None
        finally:
            with contextlib.suppress(self._pg.Error):
                conn.close()

    def _new_pool(self) -> Any:
        pool = _pool_class()(
            self._url, min_size=1, max_size=self._size, open=False, timeout=self._timeout, name="hybridkex-state",
            # Every call is one statement or one explicit transaction: autocommit saves BEGIN/COMMIT
            # round trips.  psycopg prepares a statement after its 5th use on a connection.
            kwargs={"autocommit": True, "connect_timeout": self._timeout, "application_name": "hybridkex"})
        pool.open(wait=False)
        return pool

    def _init_schema(self, conn: psycopg.Connection[Any], migrate: bool) -> None:
        try:
            ro = conn.execute("SHOW transaction_read_only").fetchone()
            if ro is not None and ro[0] == "on":
                raise StateReadOnly(f"the PostgreSQL state database {self.where} is read-only (a standby, or "
                                    "default_transaction_read_only = on); hybridkex needs to write its state")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))  # one migrator at a time
                found = conn.execute("SELECT to_regclass('hybridkex_schema')").fetchone()
                if found is None or found[0] is None:
                    stray = conn.execute("SELECT to_regclass('state_spent')").fetchone()
                    if stray is not None and stray[0] is not None:
                        raise StateSchemaError(f"the PostgreSQL database {self.where} has hybridkex tables but "
                                               "no hybridkex_schema table; it was not created by hybridkex")
                    conn.execute("CREATE TABLE hybridkex_schema (version integer PRIMARY KEY, "
                                 "applied_at timestamptz NOT NULL DEFAULT now())")
                    version = 0
                else:
                    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM hybridkex_schema").fetchone()
                    version = int(row[0]) if row is not None else 0
                if version > SCHEMA_VERSION:
                    raise StateSchemaError(f"the PostgreSQL state database {self.where} has schema version {version}, "
                                           f"newer than this hybridkex's {SCHEMA_VERSION}; upgrade hybridkex")
                if 0 < version < SCHEMA_VERSION and not migrate:
                    raise StateSchemaError(f"the PostgreSQL state database {self.where} has schema version {version}; "
                                           f"this hybridkex needs {SCHEMA_VERSION}: migrate it once, after upgrading "
                                           "every server (hybridkex state migrate --url URL)")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[v - 1]:
                        conn.execute(statement)
                    conn.execute("INSERT INTO hybridkex_schema (version) VALUES (%s)", (v,))
        except StateError:
            raise
        except self._pg.Error as exc:
            raise self._error(exc, "check the schema") from None

    def schema_version(self) -> int:
        row = self.run("read the schema version",
                       lambda c: c.execute("SELECT MAX(version) FROM hybridkex_schema").fetchone())
        return int(row[0]) if row is not None else 0

    # -- rows (checked and sealed by StateBase) -----------------------------------------------------

    def _spend_ids(self, scope: str, ids: list[str], t: float) -> bool:
        row = self.run("spend key IDs", lambda c: c.execute(
            "SELECT hybridkex_spend_ids(%s, %s, %s)", (scope, ids, t)).fetchone(), single=True)
        return bool(row is not None and row[0])

    def _is_spent(self, scope: str, key_id: str) -> bool:
        return self.run("read spent key IDs", lambda c: c.execute(
            "SELECT 1 FROM state_spent WHERE scope = %s AND key_id = %s", (scope, key_id)).fetchone() is not None,
            single=True)

    def _spend_counter(self, scope: str, index: int, window: int) -> str | None:
        row = self.run("spend a counter", lambda c: c.execute(
            "SELECT hybridkex_spend_counter(%s, %s, %s)", (scope, index, window)).fetchone(), single=True)
        return None if row is None or row[0] is None else str(row[0])

    def _spend_claim(self, counter_scope: str, index: int, window: int, scope: str, ids: list[str], *,
                     t: float) -> str | None:
        row = self.run("spend a steady-state claim", lambda c: c.execute(
            "SELECT hybridkex_spend_claim(%s, %s, %s, %s, %s, %s)",
            (counter_scope, index, window, scope, ids, t)).fetchone(), single=True)
        return None if row is None or row[0] is None else str(row[0])

    def _hold(self, scope: str, ids: list[str], t: float, expires_at: float) -> int:
        def go(c: psycopg.Connection[Any]) -> int:
            for k in ids:
                c.execute("INSERT INTO state_held SELECT %s, %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM state_spent "
                          "WHERE scope = %s AND key_id = %s) ON CONFLICT DO NOTHING",
                          (scope, k, t, expires_at, scope, k))
            row = c.execute("SELECT COUNT(*) FROM state_held WHERE scope = %s AND expires_at > %s",
                            (scope, t)).fetchone()
            return int(row[0]) if row is not None else 0
        return self.run("hold key IDs", go)

    def _take(self, scope: str, key_id: str | None, t: float) -> str | None:
        def go(c: psycopg.Connection[Any]) -> str | None:
            for _ in range(64):  # rows spent directly meanwhile are skipped (deleted), never handed out
                if key_id is None:
                    row = c.execute("SELECT key_id FROM state_held WHERE scope = %s AND expires_at > %s "
                                    "ORDER BY held_at, key_id LIMIT 1 FOR UPDATE SKIP LOCKED", (scope, t)).fetchone()
                else:
                    row = c.execute("SELECT key_id FROM state_held WHERE scope = %s AND key_id = %s AND "
                                    "expires_at > %s FOR UPDATE", (scope, key_id, t)).fetchone()
                if row is None:
                    return None
                taken = str(row[0])
                c.execute("DELETE FROM state_held WHERE scope = %s AND key_id = %s", (scope, taken))
                if c.execute("INSERT INTO state_spent VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                             (scope, taken, t)).rowcount:
                    return taken
                if key_id is not None:
                    return None
            return None
        return self.run("take a held key ID", go)

    def _held(self, scope: str, t: float) -> int:
        row = self.run("count held key IDs", lambda c: c.execute(
            "SELECT COUNT(*) FROM state_held WHERE scope = %s AND expires_at > %s", (scope, t)).fetchone(),
            single=True)
        return int(row[0]) if row is not None else 0

    def _put_ticket(self, kind: str, handle: bytes, blob: bytes, meta: bytes, expires_at: float) -> None:
        self.run("store a ticket", lambda c: c.execute(
            "INSERT INTO state_tickets VALUES (%s, %s, %s, %s, %s) ON CONFLICT (kind, handle) DO UPDATE SET "
            "secret = EXCLUDED.secret, meta = EXCLUDED.meta, expires_at = EXCLUDED.expires_at",
            (kind, handle, blob, meta, expires_at)), single=True)

    def _get_ticket(self, kind: str, handle: bytes, t: float, *, take: bool) -> tuple[bytes, bytes, float] | None:
        # take: one DELETE ... RETURNING, so of concurrent takers exactly one gets the row
        sql = ("DELETE FROM state_tickets WHERE kind = %s AND handle = %s AND expires_at > %s "
               "RETURNING secret, meta, expires_at" if take else
               "SELECT secret, meta, expires_at FROM state_tickets WHERE kind = %s AND handle = %s AND expires_at > %s")
        row = self.run("take a ticket" if take else "read a ticket",
                       lambda c: c.execute(sql, (kind, handle, t)).fetchone(), single=True)
        return None if row is None else (bytes(row[0]), bytes(row[1]), float(row[2]))

    def _drop_ticket(self, kind: str, handle: bytes) -> bool:
        return bool(self.run("drop a ticket", lambda c: c.execute(
            "DELETE FROM state_tickets WHERE kind = %s AND handle = %s", (kind, handle)).rowcount, single=True))

    def _swap_tickets(self, kind: str, put: list[tuple[bytes, bytes]], drop: list[bytes], expires_at: float) -> None:
        def go(c: psycopg.Connection[Any]) -> None:
            if drop:
                c.execute("DELETE FROM state_tickets WHERE kind = %s AND handle = ANY(%s)", (kind, drop))
            for h, blob in put:
                c.execute("INSERT INTO state_tickets VALUES (%s, %s, %s, %s, %s) ON CONFLICT (kind, handle) DO UPDATE "
                          "SET secret = EXCLUDED.secret, meta = EXCLUDED.meta, expires_at = EXCLUDED.expires_at",
                          (kind, h, blob, b"", expires_at))
        self.run("store tickets", go, single=not put or (len(put) == 1 and not drop))

    def _purge(self, t: float, spent_before: float | None) -> int:
        def go(c: psycopg.Connection[Any]) -> int:
            n = c.execute("DELETE FROM state_tickets WHERE expires_at <= %s", (t,)).rowcount
            n += c.execute("DELETE FROM state_held WHERE expires_at <= %s", (t,)).rowcount
            if spent_before is not None:
                n += c.execute("DELETE FROM state_spent WHERE spent_at < %s", (spent_before,)).rowcount
            return n
        return self.run("purge expired state", go)

    def auth_keys(self) -> PostgresAuthKeyStore:
        if self._keys is None:
            self._keys = PostgresAuthKeyStore(self, self.sealer(), max_keys=self._max_keys, grace=self._grace)
        return self._keys

    def close(self) -> None:
        self._pool.close(timeout=1.0)  # its workers may be backing off a down server: do not wait 5 s

    def __enter__(self) -> PostgresState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
