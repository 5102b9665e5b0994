"""The SharedState contract, the same tests over both backends (SQLite file, real PostgreSQL)."""

from __future__ import annotations

import time

import pytest
from statehelpers import SEAL_KEY

from hybridkex.exceptions import ConfigurationError, StateError
from hybridkex.state import SharedState, open_state


def test_is_a_shared_state(state: SharedState) -> None:
    assert isinstance(state, SharedState)
    assert state.backend in ("sqlite", "postgresql")


def test_spend_is_once_and_all_or_none(state: SharedState) -> None:
    assert state.spend("qkd:kme-a", ["k1", "k2"])
    assert state.is_spent("qkd:kme-a", "k1") and state.is_spent("qkd:kme-a", "k2")
    assert not state.spend("qkd:kme-a", ["k1"])
    # k3 is new but k2 is not: nothing is spent, so k3 stays usable
    assert not state.spend("qkd:kme-a", ["k3", "k2"])
    assert not state.is_spent("qkd:kme-a", "k3")
    assert state.spend("qkd:kme-a", ["k3"])
    # scopes are independent (another KME's key IDs)
    assert state.spend("qkd:kme-b", ["k1"])


def test_spend_survives_reopening(url: str) -> None:
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert s.spend("s", ["once"])
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert not s.spend("s", ["once"])


def test_counter_window(state: SharedState) -> None:
    assert state.spend_counter("p", 5, window=8) is None
    assert state.spend_counter("p", 5, window=8) == "replayed"
    assert state.spend_counter("p", 3, window=8) is None  # out of order, inside the window
    assert state.spend_counter("p", 3, window=8) == "replayed"
    assert state.spend_counter("p", 20, window=8) is None
    assert state.spend_counter("p", 12, window=8) == "too old"  # 20 - 12 >= 8
    assert state.spend_counter("p", 13, window=8) is None
    assert state.spend_counter("p", 13, window=8) == "replayed"
    assert state.spend_counter("q", 13, window=8) is None  # another parent
    with pytest.raises(ConfigurationError):
        state.spend_counter("p", -1)


def test_counter_window_of_the_default_width(state: SharedState) -> None:
    assert state.spend_counter("p", 10_000) is None
    assert state.spend_counter("p", 10_000 - 4095) is None
    assert state.spend_counter("p", 10_000 - 4096) == "too old"
    assert state.spend_counter("p", 10_000 - 4095) == "replayed"


def test_hold_and_take(state: SharedState) -> None:
    later = time.time() + 60
    assert state.spend("qkd", ["used"])
    assert state.hold("qkd", ["a", "b", "c", "used"], expires_at=later) == 3  # a spent ID is never held
    assert state.held("qkd") == 3
    assert state.take("qkd", "b") == "b"
    assert state.take("qkd", "b") is None
    assert state.is_spent("qkd", "b")
    assert state.spend("qkd", ["c"])  # spent directly: no longer held
    assert state.take("qkd", "c") is None
    assert state.take("qkd") == "a"
    assert state.take("qkd") is None
    assert state.held("qkd") == 0


def test_expired_held_ids_are_not_taken(state: SharedState) -> None:
    assert state.hold("qkd", ["old"], expires_at=time.time() - 1) == 0
    assert state.take("qkd") is None and state.take("qkd", "old") is None
    assert state.purge() == 1
    assert not state.is_spent("qkd", "old")


def test_tickets_are_sealed_and_expire(state: SharedState) -> None:
    secret = b"\x42" * 32
    state.put_ticket("steady", b"h1", secret, meta=b"suite=x", expires_at=time.time() + 60)
    t = state.get_ticket("steady", b"h1")
    assert t is not None and t.secret == secret and t.meta == b"suite=x"
    assert secret.hex() not in repr(t) and "redacted" in repr(t)
    assert state.get_ticket("reconnect", b"h1") is None  # kinds are apart
    state.put_ticket("steady", b"h1", b"\x43" * 32, expires_at=time.time() + 60)  # replaced
    t = state.get_ticket("steady", b"h1")
    assert t is not None and t.secret == b"\x43" * 32
    state.put_ticket("steady", b"h2", secret, expires_at=time.time() - 1)
    assert state.get_ticket("steady", b"h2") is None
    assert state.drop_ticket("steady", b"h1") and not state.drop_ticket("steady", b"h1")
    assert state.get_ticket("steady", b"h1") is None


def test_tickets_need_the_key_that_sealed_them(url: str) -> None:
    with open_state(url, seal_key=SEAL_KEY) as s:
        s.put_ticket("steady", b"h", b"\x01" * 32, expires_at=time.time() + 60)
    with open_state(url, seal_key=b"\x00" * 32) as s, pytest.raises(StateError, match="state key"):
        s.get_ticket("steady", b"h")
    with open_state(url) as s, pytest.raises(StateError, match="no state key"):
        s.get_ticket("steady", b"h")


def test_secrets_never_stored_in_clear(url: str, tmp_path: object) -> None:
    secret = bytes(range(100, 132))
    with open_state(url, seal_key=SEAL_KEY) as s:
        s.put_ticket("steady", b"h", secret, expires_at=time.time() + 60)
        if s.backend == "postgresql":
            s.auth_keys().rotate("a", "b", used_key_id=None, new_key_id=b"\x01" * 16, new_key=secret)
            dump = _pg_dump(url)
        else:
            s.close()
            dump = b"".join(p.read_bytes() for p in s.path.parent.glob(s.path.name + "*"))
    assert secret not in dump


def _pg_dump(url: str) -> bytes:
    import psycopg

    out = b""
    with psycopg.connect(url) as c:
        for table in ("state_tickets", "auth_keys"):
            for row in c.execute(f"SELECT * FROM {table}"):
                out += b"|".join(bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode() for v in row)
    return out


def test_names_are_bounded(state: SharedState) -> None:
    with pytest.raises(ConfigurationError):
        state.spend("", ["x"])
    with pytest.raises(ConfigurationError):
        state.spend("s", ["x" * 513])


def test_url_forms(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError, match="unknown state backend"):
        open_state("mysql://x/y")
    with pytest.raises(ConfigurationError, match="three slashes"):
        open_state("sqlite://relative.db")


def test_spend_claim_spends_the_counter_then_the_ids(state: SharedState) -> None:
    assert state.spend_claim("steady:p", 1, "qkd", ["k1"]) is None
    assert state.is_spent("qkd", "k1")
    assert state.spend_claim("steady:p", 1, "qkd", ["k2"]) == "replayed"
    assert not state.is_spent("qkd", "k2")  # a refused counter spends nothing
    assert state.spend_claim("steady:p", 2, "qkd", ["k1"]) == "key used"
    assert state.spend_claim("steady:p", 2, "qkd", ["k3"]) == "replayed"  # the counter stayed spent: fail closed
    assert state.spend_claim("steady:p", 3, "qkd", ["k3", "k1"]) == "key used"
    assert not state.is_spent("qkd", "k3")  # all IDs or none
    assert state.spend_claim("steady:p", 4, "qkd", []) is None
    assert state.spend_claim("steady:p", 4 + 4096, "qkd", []) is None
    assert state.spend_claim("steady:p", 4, "qkd", []) == "too old"


def test_counter_windows_of_other_widths(state: SharedState) -> None:
    """Bits survive a shift by less than the width, vanish beyond it (both backends' encodings)."""
    for i in (100, 90, 37):
        assert state.spend_counter("w", i, window=64) is None
    assert state.spend_counter("w", 130, window=64) is None  # shift 30: 100 and 90 still recorded
    assert state.spend_counter("w", 100, window=64) == "replayed"
    assert state.spend_counter("w", 90, window=64) == "replayed"
    assert state.spend_counter("w", 37, window=64) == "too old"
    assert state.spend_counter("w", 91, window=64) is None
    assert state.spend_counter("w", 1000, window=64) is None  # beyond the width: a new window
    assert state.spend_counter("w", 999, window=64) is None
    assert state.spend_counter("w", 999, window=64) == "replayed"


def test_take_and_swap_tickets(state: SharedState) -> None:
    t = time.time() + 60
    state.swap_tickets("qkd:m", [(b"k1", b"one"), (b"k2", b"two")], expires_at=t)
    taken = state.take_ticket("qkd:m", b"k1")
    assert taken is not None and taken.secret == b"one" and state.take_ticket("qkd:m", b"k1") is None
    state.swap_tickets("qkd:m", [(b"k3", b"three")], [b"k2"], expires_at=t)  # one in, one out
    assert state.get_ticket("qkd:m", b"k2") is None and state.get_ticket("qkd:m", b"k3") is not None
    state.swap_tickets("qkd:m", [(b"k4", b"four")], expires_at=time.time() - 1)
    assert state.take_ticket("qkd:m", b"k4") is None  # expired: never handed out
