"""Use at most once under real concurrency: several processes race on one state, both backends."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import pytest
import statehelpers
from statehelpers import PG, SEAL_KEY, ctx

from hybridkex.state import open_state

PROCS = 4


def _race(target: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    return statehelpers.race(target, args)


def test_every_key_id_is_spent_exactly_once(url: str) -> None:
    ids = [f"key-{n:04d}" for n in range(300)]
    mid = statehelpers.ctx().Barrier(PROCS)
    got = _race(statehelpers.spend_worker, [(url, "qkd:kme", ids, seed, mid) for seed in range(PROCS)])
    counts = collections.Counter(k for g in got for k in g)
    assert sorted(counts) == ids  # every ID was spent ...
    assert set(counts.values()) == {1}  # ... by exactly one process
    assert sum(1 for g in got if g) >= 2  # they really raced
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert all(s.is_spent("qkd:kme", k) for k in ids)


def test_every_counter_is_accepted_exactly_once(url: str) -> None:
    got = _race(statehelpers.counter_worker, [(url, "steady:parent", 200, seed) for seed in range(PROCS)])
    counts = collections.Counter(i for g in got for i in g)
    assert sorted(counts) == list(range(1, 201)) and set(counts.values()) == {1}


def test_every_held_id_is_taken_exactly_once(url: str) -> None:
    ids = [f"held-{n:04d}" for n in range(300)]
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert s.hold("qkd:pool", ids, expires_at=time.time() + 600) == 300
    got = _race(statehelpers.take_worker, [(url, "qkd:pool") for _ in range(PROCS)])
    counts = collections.Counter(k for g in got for k in g)
    assert sorted(counts) == ids and set(counts.values()) == {1}
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert s.held("qkd:pool") == 0 and not s.spend("qkd:pool", [ids[0]])


def test_every_announced_key_is_taken_exactly_once(url: str) -> None:
    """Announced QKD keys pre-fetched by one process and shared sealed (take_ticket): of processes
    racing for the same keys, exactly one gets each."""
    handles = [b"%036d" % n for n in range(200)]
    with open_state(url, seal_key=SEAL_KEY) as s:
        for h in handles:
            s.put_ticket("qkd:sae-a", h, h * 2, expires_at=time.time() + 600)
    got = _race(statehelpers.ticket_take_worker, [(url, "qkd:sae-a", handles, seed) for seed in range(PROCS)])
    counts = collections.Counter(h for g in got for h in g)
    assert sorted(counts) == handles and set(counts.values()) == {1}
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert s.take_ticket("qkd:sae-a", handles[0]) is None


def test_concurrent_rotations_keep_a_common_key(url: str) -> None:
    """Processes rotating one pair at once (a responder's replicas): every rotation is recorded, the
    window stays bounded, keys of the newest epoch remain, and no spent key ID comes back."""
    rounds = 25
    done = _race(statehelpers.rotate_worker, [(url, ("srv", "cli"), 1000 * (p + 1), rounds) for p in range(PROCS)])
    assert done == [rounds] * PROCS
    with open_state(url, seal_key=SEAL_KEY) as s:
        store = s.auth_keys()
        held = store.keys("srv", "cli")
        assert 1 <= len(held) <= 8
        [summary] = store.summaries()
        assert summary.rotations == rounds * PROCS
        assert summary.newest_epoch == held[0].epoch and summary.bootstrap_retired
        assert all(not store.is_spent("srv", "cli", k.key_id) for k in held)
        assert [k.key for k in store.find("srv", "cli", [held[0].key_id])] == [held[0].key]


@pytest.mark.exclusive  # timing-sensitive under load: runs alone (tests/conftest.py)
def test_postgresql_restart_mid_run(pg: PG) -> None:
    """PostgreSQL killed (immediate stop) and started again while processes spend the same IDs:
    one-line StateUnavailable errors meanwhile, then recovery, and no ID ever accepted twice."""
    url = pg.new_url()
    workers = 3
    stop, failed, recovered = ctx().Event(), ctx().Semaphore(0), ctx().Semaphore(0)

    def restart() -> None:
        time.sleep(0.7)
        pg.stop()
        # Down for longer than a pooled call waits for a connection (connect_timeout, 2 s): every
        # worker meets the error (a shorter outage is ridden out by waiting).
        time.sleep(2.5)
        for _ in range(workers):
            assert failed.acquire(timeout=60), "a worker never met the outage"
        pg.start()
        for _ in range(workers):  # and back: every worker recovers (the pool's reconnect back-off is bypassed)
            assert recovered.acquire(timeout=60), "a worker never recovered"
        stop.set()

    out = statehelpers.race(statehelpers.restart_worker, [(url, "qkd:kme", stop, failed, recovered)] * workers,
                            during=restart)
    accepted = collections.Counter(k for o in out for k, ok in o["results"].items() if ok)
    assert accepted and max(accepted.values()) == 1  # never twice
    answered = set().union(*(o["results"] for o in out))
    lost = [k for k in answered if k not in accepted]  # a commit whose answer the restart swallowed
    errors = [e for o in out for e in o["errors"]]
    assert len(lost) <= len(errors)
    assert all(o["unavailable"] >= 1 for o in out), [o["errors"][:2] for o in out]
    assert all(o["recovered"] for o in out)
    for name, text, _ in errors:
        assert name == "StateUnavailable", (name, text)
        assert "\n" not in text and "unreachable" in text and "postgresql://" in text
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert all(s.is_spent("qkd:kme", k) for k in accepted)


def test_sqlite_state_is_one_file_for_every_process(tmp_path: Any) -> None:
    """The embedded default: the processes of one host share the file, recycled keys included."""
    url = str(tmp_path / "state.sqlite3")
    mid = statehelpers.ctx().Barrier(2)
    got = _race(statehelpers.spend_worker, [(url, "s", ["a", "b", "c"], seed, mid) for seed in range(2)])
    assert sorted(k for g in got for k in g) == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".sqlite3") == ["state.sqlite3"]
