"""Recycled-authentication keys in PostgreSQL: :class:`~hybridkex.recycle.AuthKeyStore`, shared by a fleet.

The same rotation as :class:`~hybridkex.recycle.SQLiteAuthKeyStore` (docs/recycle.md: confirm,
supersede older epochs with a grace period, insert the new key, evict beyond ``max_keys``; nothing is
deleted before the peer proved it holds a newer key, so no lockout), one transaction each.  Where
SQLite serialises every writer on its file lock, here a rotation locks its pair's row
(``SELECT ... FOR UPDATE``): rotations of one pair, from any host, run one at a time; other pairs
do not wait.  The key bytes are stored sealed under the host's state key, bound to their row.
Times (created, superseded, the grace period) are the database's clock, so replicas whose clocks
differ agree on when a superseded key stops being accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError, InvalidKeyMaterial
from ..recycle.store import KEY_ID_LEN, KEY_LEN, AuthKey, BootstrapState, PairSummary
from .base import Sealer, aad

if TYPE_CHECKING:
    import psycopg

    from .postgres import PostgresState

__all__ = ["PostgresAuthKeyStore"]

def _db_now(c: psycopg.Connection[Any]) -> float:
    """The database's clock, in seconds since the epoch (one clock for every replica)."""
    row = c.execute("SELECT extract(epoch FROM now())::double precision").fetchone()
    assert row is not None
    return float(row[0])


class _Collision(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


class PostgresAuthKeyStore:
    """:class:`~hybridkex.recycle.AuthKeyStore` in a :class:`~hybridkex.state.PostgresState`
    (``state.auth_keys()``).  Synchronous: :meth:`rotate` returns once the rotation is committed."""

    def __init__(self, state: PostgresState, sealer: Sealer, *, max_keys: int = 8, grace: float = 60.0) -> None:
        if max_keys < 2:
            raise ConfigurationError("max_keys must be at least 2 (a two-key window)", field="max_keys")
        if not 0 <= grace <= 3600:
            raise ConfigurationError("grace must be 0..3600 seconds (at least the handshake timeout)", field="grace")
        self._state = state
        self._sealer = sealer
        self._max_keys = max_keys
        self._grace = float(grace)

    def __repr__(self) -> str:
        return f"PostgresAuthKeyStore({self._state.where!r})"

    def _key(self, local_id: str, peer_id: str, row: Sequence[Any]) -> AuthKey:
        key_id = bytes(row[0])
        key = self._sealer.open(aad("authkey", local_id, peer_id, key_id), row[2])
        return AuthKey(key_id, int(row[1]), key, float(row[3]), bool(row[4]), row[5] is not None)

    # -- reads ------------------------------------------------------------------------------------

    def keys(self, local_id: str, peer_id: str, *, include_superseded: bool = False) -> list[AuthKey]:
        grace = self._grace if include_superseded else -1e18  # superseded keys only within the grace period
        rows = self._state.run("read authentication keys", lambda c: c.execute(
            "SELECT key_id, epoch, sealed_key, created_at, confirmed, superseded_at FROM auth_keys "
            "WHERE local_id = %s AND peer_id = %s AND (superseded_at IS NULL OR "
            "superseded_at > extract(epoch FROM now())::double precision - %s) "
            "ORDER BY epoch DESC, created_at DESC, seq DESC", (local_id, peer_id, grace)).fetchall())
        return [self._key(local_id, peer_id, r) for r in rows]

    def find(self, local_id: str, peer_id: str, key_ids: Sequence[bytes]) -> list[AuthKey]:
        ids = list(dict.fromkeys(bytes(k) for k in key_ids))[:64]  # bounded: a Hello lists at most 16
        if not ids:
            return []
        rows = self._state.run("read authentication keys", lambda c: c.execute(
            "SELECT key_id, epoch, sealed_key, created_at, confirmed, superseded_at FROM auth_keys "
            "WHERE local_id = %s AND peer_id = %s AND key_id = ANY(%s) AND (superseded_at IS NULL OR "
            "superseded_at > extract(epoch FROM now())::double precision - %s) "
            "ORDER BY epoch DESC, created_at DESC, seq DESC",
            (local_id, peer_id, ids, self._grace)).fetchall())
        return [self._key(local_id, peer_id, r) for r in rows]

    def bootstrap_retired(self, local_id: str, peer_id: str) -> bool:
        return self.bootstrap_state(local_id, peer_id) == "retired"

    def bootstrap_state(self, local_id: str, peer_id: str) -> BootstrapState:
        row = self._state.run("read a pair", lambda c: c.execute(
            "SELECT bootstrap_retired FROM auth_pairs WHERE local_id = %s AND peer_id = %s",
            (local_id, peer_id)).fetchone())
        if row is None:
            return "unknown"
        return "retired" if row[0] else "active"

    def is_spent(self, local_id: str, peer_id: str, key_id: bytes) -> bool:
        return self._state.run("read spent key IDs", lambda c: c.execute(
            "SELECT 1 FROM auth_spent WHERE local_id = %s AND peer_id = %s AND key_id = %s",
            (local_id, peer_id, bytes(key_id))).fetchone() is not None)

    def summaries(self) -> list[PairSummary]:
        rows = self._state.run("read pairs", lambda c: c.execute(
            "SELECT p.local_id, p.peer_id, p.bootstrap_retired, p.rotations, p.last_rotation_at, "
            "COUNT(k.key_id) FILTER (WHERE k.superseded_at IS NULL), "
            "MAX(k.epoch) FILTER (WHERE k.superseded_at IS NULL), "
            "MAX(k.epoch) FILTER (WHERE k.superseded_at IS NULL AND k.confirmed) "
            "FROM auth_pairs p LEFT JOIN auth_keys k ON k.local_id = p.local_id AND k.peer_id = p.peer_id "
            "GROUP BY p.local_id, p.peer_id ORDER BY p.local_id, p.peer_id").fetchall())
        return [PairSummary(r[0], r[1], int(r[5]), r[6], r[7], bool(r[2]), r[4], int(r[3])) for r in rows]

    def audit_log(self, local_id: str, peer_id: str) -> list[tuple[str, int | None, float]]:
        rows = self._state.run("read the audit log", lambda c: c.execute(
            "SELECT event, epoch, at FROM auth_audit WHERE local_id = %s AND peer_id = %s ORDER BY id",
            (local_id, peer_id)).fetchall())
        return [(r[0], r[1], float(r[2])) for r in rows]

    # -- writes -----------------------------------------------------------------------------------

    def rotate(self, local_id: str, peer_id: str, *, used_key_id: bytes | None, new_key_id: bytes,
               new_key: bytes) -> None:
        if len(new_key_id) != KEY_ID_LEN or len(new_key) != KEY_LEN:
            raise InvalidKeyMaterial(f"recycled keys are {KEY_LEN} bytes with {KEY_ID_LEN}-byte IDs")
        used = None if used_key_id is None else bytes(used_key_id)
        new_id, sealed = bytes(new_key_id), self._sealer.seal(aad("authkey", local_id, peer_id, bytes(new_key_id)),
                                                              new_key)

        def go(c: psycopg.Connection[Any]) -> None:
            pair = (local_id, peer_id)
            self._lock_pair(c, local_id, peer_id)
            t = _db_now(c)
            used_epoch = 0
            if used is not None:
                row = c.execute("SELECT epoch FROM auth_keys WHERE local_id = %s AND peer_id = %s AND key_id = %s",
                                (*pair, used)).fetchone()
                if row is None:  # superseded by a concurrent rotation: delete nothing older than what exists
                    row = c.execute("SELECT COALESCE(MIN(epoch), 1) FROM auth_keys WHERE local_id = %s AND "
                                    "peer_id = %s AND superseded_at IS NULL", pair).fetchone()
                    used_epoch = int(row[0]) if row is not None else 1
                else:
                    used_epoch = int(row[0])
                    c.execute("UPDATE auth_keys SET confirmed = true WHERE local_id = %s AND peer_id = %s AND "
                              "key_id = %s", (*pair, used))
                    c.execute("INSERT INTO auth_spent SELECT local_id, peer_id, key_id, %s FROM auth_keys WHERE "
                              "local_id = %s AND peer_id = %s AND epoch < %s ON CONFLICT DO NOTHING",
                              (t, *pair, used_epoch))
                    c.execute("UPDATE auth_keys SET superseded_at = %s WHERE local_id = %s AND peer_id = %s AND "
                              "epoch < %s AND superseded_at IS NULL", (t, *pair, used_epoch))
                    c.execute("UPDATE auth_pairs SET bootstrap_retired = true WHERE local_id = %s AND peer_id = %s",
                              pair)
            c.execute("DELETE FROM auth_keys WHERE local_id = %s AND peer_id = %s AND superseded_at IS NOT NULL "
                      "AND superseded_at <= %s", (*pair, t - self._grace))
            if c.execute("SELECT 1 FROM auth_spent WHERE local_id = %s AND peer_id = %s AND key_id = %s",
                         (*pair, new_id)).fetchone():
                raise _Collision("derived authentication key ID was already used once")
            if c.execute("INSERT INTO auth_keys (local_id, peer_id, key_id, epoch, sealed_key, created_at) "
                         "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (*pair, new_id, used_epoch + 1, sealed, t)).rowcount == 0:
                raise _Collision("derived authentication key ID collides with a stored one")
            self._evict(c, local_id, peer_id, t)
            c.execute("UPDATE auth_pairs SET rotations = rotations + 1, last_rotation_at = %s WHERE local_id = %s "
                      "AND peer_id = %s", (t, *pair))
            c.execute("INSERT INTO auth_audit (local_id, peer_id, event, epoch, at) VALUES (%s, %s, 'rotate', %s, %s)",
                      (*pair, used_epoch + 1, t))
        try:
            self._state.run("record a key rotation", go)
        except _Collision as exc:
            raise InvalidKeyMaterial(str(exc)) from None

    @staticmethod
    def _lock_pair(c: psycopg.Connection[Any], local_id: str, peer_id: str) -> None:
        """Rotations of one pair, from every host, one at a time (the pair row's lock until commit)."""
        c.execute("INSERT INTO auth_pairs (local_id, peer_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                  (local_id, peer_id))
        c.execute("SELECT 1 FROM auth_pairs WHERE local_id = %s AND peer_id = %s FOR UPDATE", (local_id, peer_id))

    def _evict(self, c: psycopg.Connection[Any], local_id: str, peer_id: str, t: float) -> None:
        row = c.execute("SELECT COUNT(*) FROM auth_keys WHERE local_id = %s AND peer_id = %s AND superseded_at IS NULL",
                        (local_id, peer_id)).fetchone()
        excess = (int(row[0]) if row is not None else 0) - self._max_keys
        if excess <= 0:
            return
        victims = [bytes(r[0]) for r in c.execute(
            "SELECT key_id FROM auth_keys WHERE local_id = %s AND peer_id = %s AND superseded_at IS NULL "
            "ORDER BY confirmed ASC, epoch ASC, created_at ASC, seq ASC LIMIT %s", (local_id, peer_id, excess))]
        c.execute("INSERT INTO auth_spent SELECT local_id, peer_id, key_id, %s FROM auth_keys WHERE local_id = %s "
                  "AND peer_id = %s AND key_id = ANY(%s) ON CONFLICT DO NOTHING", (t, local_id, peer_id, victims))
        c.execute("DELETE FROM auth_keys WHERE local_id = %s AND peer_id = %s AND key_id = ANY(%s)",
                  (local_id, peer_id, victims))

    def retire_bootstrap(self, local_id: str, peer_id: str) -> None:
        self._pair_event(local_id, peer_id, "retire-bootstrap")

    def rebootstrap(self, local_id: str, peer_id: str) -> None:
        self._pair_event(local_id, peer_id, "rebootstrap")

    def _pair_event(self, local_id: str, peer_id: str, event: str) -> None:
        def go(c: psycopg.Connection[Any]) -> None:
            pair = (local_id, peer_id)
            self._lock_pair(c, local_id, peer_id)
            t = _db_now(c)
            if event == "rebootstrap":
                c.execute("INSERT INTO auth_spent SELECT local_id, peer_id, key_id, %s FROM auth_keys WHERE "
                          "local_id = %s AND peer_id = %s ON CONFLICT DO NOTHING", (t, *pair))
                c.execute("DELETE FROM auth_keys WHERE local_id = %s AND peer_id = %s", pair)
            c.execute("UPDATE auth_pairs SET bootstrap_retired = %s WHERE local_id = %s AND peer_id = %s",
                      (event != "rebootstrap", *pair))
            c.execute("INSERT INTO auth_audit (local_id, peer_id, event, epoch, at) VALUES (%s, %s, %s, NULL, %s)",
                      (*pair, event, t))
        self._state.run(event.replace("-", " "), go)

    def close(self) -> None:
        """Nothing of its own to close: the connection is the state's."""
