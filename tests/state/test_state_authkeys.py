"""Recycled-authentication keys kept in the shared state: the AuthKeyStore contract on both backends,
and real handshakes whose responder is two replicas sharing one PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from recyclehelpers import INI_ID, RES_ID, QKDPair, loopback_pair, recycled_configs
from statehelpers import PG, SEAL_KEY

from hybridkex.exceptions import InvalidKeyMaterial, StateError
from hybridkex.protocol import Session
from hybridkex.recycle import AuthKeyStore, SQLiteAuthKeyStore
from hybridkex.state import open_state

A, B = "client.example", "server.example"


def kid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def key(n: int) -> bytes:
    return bytes([n % 256]) * 32


@pytest.fixture
def store(url: str) -> Iterator[AuthKeyStore]:
    with open_state(url, seal_key=SEAL_KEY, max_keys=3, grace=0) as s:
        yield s.auth_keys()


def ids(s: AuthKeyStore) -> list[tuple[int, int]]:
    return [(int.from_bytes(k.key_id, "big"), k.epoch) for k in s.keys(A, B)]


def test_rotation_chain(store: AuthKeyStore) -> None:
    assert store.bootstrap_state(A, B) == "unknown"
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    assert ids(store) == [(1, 1)] and store.bootstrap_state(A, B) == "active"
    store.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=key(2))
    assert ids(store) == [(2, 2), (1, 1)] and store.bootstrap_retired(A, B)
    store.rotate(A, B, used_key_id=kid(2), new_key_id=kid(3), new_key=key(3))
    assert ids(store) == [(3, 3), (2, 2)]
    assert store.is_spent(A, B, kid(1))
    assert [k.key for k in store.find(A, B, [kid(3), kid(1), kid(9)])] == [key(3)]
    assert [e for e, _, _ in store.audit_log(A, B)].count("rotate") == 3


def test_spent_key_id_is_never_stored_again(store: AuthKeyStore) -> None:
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    store.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=key(2))
    store.rotate(A, B, used_key_id=kid(2), new_key_id=kid(3), new_key=key(3))
    with pytest.raises(InvalidKeyMaterial):
        store.rotate(A, B, used_key_id=kid(3), new_key_id=kid(1), new_key=key(9))
    with pytest.raises(InvalidKeyMaterial):
        store.rotate(A, B, used_key_id=kid(3), new_key_id=kid(3), new_key=key(9))
    assert ids(store) == [(3, 3), (2, 2)]  # the failed rotations changed nothing


def test_window_is_bounded_unconfirmed_first(store: AuthKeyStore) -> None:
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    for n in range(2, 10):  # final messages always lost: nothing confirmed
        store.rotate(A, B, used_key_id=None, new_key_id=kid(n), new_key=key(n))
    assert [i for i, _ in ids(store)] == [9, 8, 7]


def test_rebootstrap_and_retire(store: AuthKeyStore) -> None:
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    store.retire_bootstrap(A, B)
    assert store.bootstrap_state(A, B) == "retired"
    store.rebootstrap(A, B)
    assert store.bootstrap_state(A, B) == "active" and store.keys(A, B) == []
    assert store.is_spent(A, B, kid(1))


def test_inspection_never_shows_key_material(store: AuthKeyStore) -> None:
    secret = bytes(range(32))
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=secret)
    text = repr(store.summaries()) + repr(store.keys(A, B)) + repr(store)
    assert secret.hex() not in text and "redacted" in text
    (summary,) = store.summaries()
    assert (summary.keys, summary.newest_epoch, summary.rotations) == (1, 1, 1)


def test_sqlite_state_keeps_keys_in_its_own_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "state.sqlite3"
    with open_state(path) as s:
        s.auth_keys().rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
        assert s.spend("qkd", ["x"])
    with SQLiteAuthKeyStore(path) as keys:  # the recycle CLI reads the same file
        assert [k.key_id for k in keys.keys(A, B)] == [kid(1)]


def test_postgresql_keys_need_the_state_key(pg: PG) -> None:
    url = pg.new_url()
    with open_state(url) as s, pytest.raises(StateError, match="no state key"):
        s.auth_keys()
    with open_state(url, seal_key=SEAL_KEY) as s:
        s.auth_keys().rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    with open_state(url, seal_key=bytes(32)) as s, pytest.raises(StateError, match="state key"):
        s.auth_keys().keys(A, B)


def test_handshakes_served_by_two_replicas_sharing_postgresql(pg: PG, tmp_path: object) -> None:
    """The responder is two replicas (two states on one database, as two hosts): each handshake of the
    pair may reach either, and every one after the bootstrap is authenticated with a recycled key."""
    from pathlib import Path

    url = pg.new_url()
    qkd = QKDPair.create()
    ini_store = SQLiteAuthKeyStore(Path(str(tmp_path)) / "initiator.sqlite3")
    replicas = [open_state(url, seal_key=SEAL_KEY) for _ in range(2)]
    try:
        configs = [recycled_configs(ini_store, r.auth_keys()) for r in replicas]
        modes = []
        for n in range(6):
            ini_cfg, _ = configs[0]
            _, res_cfg = configs[n % 2]
            ini, res = loopback_pair(ini_cfg, res_cfg, qkd)
            assert isinstance(ini, Session) and isinstance(res, Session), (ini, res)
            assert ini.info.auth_key_id == res.info.auth_key_id
            modes.append(res.info.auth_mode)
        assert modes == ["psk"] + ["recycled"] * 5
        server_keys = replicas[1].auth_keys()
        (summary,) = server_keys.summaries()
        assert summary.rotations == 6 and summary.bootstrap_retired
        held = {k.key_id for k in server_keys.keys(RES_ID, INI_ID)}
        assert held & {k.key_id for k in ini_store.keys(INI_ID, RES_ID)}  # still a common key: no lockout
    finally:
        ini_store.close()
        for r in replicas:
            r.close()


def test_recycled_authenticator_from_state(url: str) -> None:
    from hybridkex.exceptions import ConfigurationError
    from hybridkex.recycle import RecycledAuthenticator

    with open_state(url, seal_key=SEAL_KEY) as s:
        auth = RecycledAuthenticator.from_state("bootstrap-once", state=s)
        assert auth.store is s.auth_keys()
    by_url = RecycledAuthenticator.from_state(state_url=url, seal_key=SEAL_KEY)
    by_url.store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    assert [k.key_id for k in by_url.store.keys(A, B)] == [kid(1)]
    by_url.store.close()
    with pytest.raises(ConfigurationError, match="exactly one"):
        RecycledAuthenticator.from_state()
