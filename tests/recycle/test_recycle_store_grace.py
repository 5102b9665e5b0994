"""Store extensions for recycled authentication: the grace period of superseded keys, find(),
bootstrap_state(), and opening a store written before the grace period existed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hybridkex.exceptions import ConfigurationError, InvalidKeyMaterial
from hybridkex.recycle import SQLiteAuthKeyStore

A, B = "client.example", "server.example"


def kid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _chain(s: SQLiteAuthKeyStore, n: int) -> None:
    s.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes([1]) * 32)
    for i in range(2, n + 1):
        s.rotate(A, B, used_key_id=kid(i - 1), new_key_id=kid(i), new_key=bytes([i]) * 32)


def test_superseded_keys_are_spent_at_once_and_accepted_only_during_the_grace(tmp_path: Path) -> None:
    clock = Clock()
    s = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", grace=30, clock=clock)
    _chain(s, 3)  # using key 2 superseded key 1
    assert [k.key_id for k in s.keys(A, B)] == [kid(3), kid(2)]  # never offered again
    assert s.is_spent(A, B, kid(1))
    window = s.keys(A, B, include_superseded=True)
    assert [(k.key_id, k.superseded) for k in window] == [(kid(3), False), (kid(2), False), (kid(1), True)]
    assert [k.key_id for k in s.find(A, B, [kid(1), kid(9)])] == [kid(1)]  # a handshake in flight finds it
    assert [k.key_id for k in s.find(A, B, [kid(1), kid(3), kid(2)])] == [kid(3), kid(2), kid(1)]  # newest first
    with pytest.raises(InvalidKeyMaterial):
        s.rotate(A, B, used_key_id=kid(3), new_key_id=kid(1), new_key=bytes(32))
    clock.now += 31
    assert s.find(A, B, [kid(1)]) == [] and kid(1) not in {k.key_id for k in s.keys(A, B, include_superseded=True)}
    s.rotate(A, B, used_key_id=kid(3), new_key_id=kid(4), new_key=bytes([4]) * 32)  # purges expired rows
    rows = s._db.execute("SELECT COUNT(*) FROM auth_keys WHERE key_id=?", (kid(1),)).fetchone()[0]
    assert rows == 0 and s.is_spent(A, B, kid(1)) and s.is_spent(A, B, kid(2))
    (summary,) = s.summaries()
    assert (summary.keys, summary.newest_epoch) == (2, 4)  # superseded keys are not counted
    s.close()


def test_zero_grace_deletes_at_once(tmp_path: Path) -> None:
    s = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", grace=0)
    _chain(s, 3)
    assert s.find(A, B, [kid(1)]) == [] and s.keys(A, B, include_superseded=True)[-1].key_id == kid(2)
    assert s._db.execute("SELECT COUNT(*) FROM auth_keys").fetchone()[0] == 2
    for bad in (-1, 3601, True, "5"):
        with pytest.raises(ConfigurationError):
            SQLiteAuthKeyStore(tmp_path / "x.sqlite3", grace=bad)  # type: ignore[arg-type]
    s.close()


def test_superseded_keys_do_not_count_against_the_window(tmp_path: Path) -> None:
    s = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", max_keys=2)
    _chain(s, 6)
    assert len(s.keys(A, B)) == 2
    assert len(s.keys(A, B, include_superseded=True)) == 6  # 4 superseded, still acceptable in the grace
    s.close()


def test_bootstrap_state(tmp_path: Path) -> None:
    s = SQLiteAuthKeyStore(tmp_path / "k.sqlite3")
    assert s.bootstrap_state(A, B) == "unknown" and not s.bootstrap_retired(A, B)
    s.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
    assert s.bootstrap_state(A, B) == "active"
    s.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=bytes(32))
    assert s.bootstrap_state(A, B) == "retired"
    s.rebootstrap(A, B)
    assert s.bootstrap_state(A, B) == "active"
    s.rebootstrap(B, A)  # an operator arms a pair the store never saw
    assert s.bootstrap_state(B, A) == "active" and s.keys(B, A) == []
    s.close()


def test_a_store_written_before_the_grace_period_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE auth_keys (local_id TEXT NOT NULL, peer_id TEXT NOT NULL, key_id BLOB NOT NULL,
            epoch INTEGER NOT NULL, key BLOB NOT NULL, created_at REAL NOT NULL,
            confirmed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (local_id, peer_id, key_id));
    """)
    db.execute("INSERT INTO auth_keys VALUES (?, ?, ?, 1, ?, 1.0, 0)", (A, B, kid(1), bytes(32)))
    db.commit()
    db.close()
    s = SQLiteAuthKeyStore(path)
    assert [k.key_id for k in s.keys(A, B)] == [kid(1)]
    s.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=bytes(32))
    assert [k.epoch for k in s.keys(A, B)] == [2, 1]
    s.close()
