"""Key-source worker threads: reused between calls, a hung call costs only its own thread."""

from __future__ import annotations

import threading

import pytest

from hybridkex import workers as _workers
from hybridkex.exceptions import HandshakeTimeout, KeyUnavailableError
from hybridkex.workers import call as call_with_timeout


def _run(pool: _workers._Pool, fn: object) -> object:
    box: list[object] = []
    done = threading.Event()
    pool.submit(fn, lambda value, error: (box.append(value), done.set()))  # type: ignore[arg-type]
    assert done.wait(5)
    return box[0]


def test_sequential_calls_reuse_one_thread() -> None:
    pool = _workers._Pool()  # a fresh pool: the shared one may hold idle workers from other tests
    idents = {_run(pool, threading.get_ident) for _ in range(50)}
    assert len(idents) == 1
    assert threading.get_ident() not in idents


def test_shared_pool_does_not_grow_with_sequential_calls() -> None:
    def workers() -> int:
        return sum(t.name == "hybridkex-key-source" for t in threading.enumerate())

    call_with_timeout(lambda: None, 5, "warm-up")
    before = workers()
    for _ in range(50):
        call_with_timeout(lambda: None, 5, "probe")
    assert workers() <= before


def test_errors_reach_the_caller() -> None:
    def fail() -> None:
        raise KeyUnavailableError("pool empty")

    with pytest.raises(KeyUnavailableError, match="pool empty"):
        call_with_timeout(fail, 5, "probe")


def test_a_hung_call_times_out_and_does_not_block_the_next() -> None:
    release = threading.Event()
    with pytest.raises(HandshakeTimeout, match="probe did not answer"):
        call_with_timeout(lambda: release.wait(30), 0.05, "probe")
    try:
        assert call_with_timeout(lambda: 42, 5, "next") == 42  # served by another worker
    finally:
        release.set()


def test_idle_workers_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_workers, "IDLE_SECONDS", 0.05)
    pool = _workers._Pool()
    seen: list[int] = []
    done = threading.Event()
    pool.submit(threading.get_ident, lambda value, error: (seen.append(value), done.set()))
    assert done.wait(5)
    worker = next(t for t in threading.enumerate() if t.ident == seen[0])
    worker.join(5)
    assert not worker.is_alive()
    assert pool._idle == 0
    # and the pool still serves after its worker left
    again = threading.Event()
    pool.submit(lambda: 1, lambda value, error: again.set())
    assert again.wait(5)
