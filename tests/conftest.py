"""Suite-wide: tests marked ``exclusive`` run alone while the rest run in parallel (pytest-xdist).

Most tests wait on real processes and sockets, so several xdist workers share two cores well.  A
few measure nothing but still depend on the machine not being saturated: a KME restart that a
client must ride out within its retry budget, 1,000 connections within a deadline, an attacker
table whose proxy must see every message in time.  Those take an exclusive lock; every other test
takes it shared.  A waiting exclusive test first holds a turnstile, so new shared holders queue
behind it instead of starving it (the classic writer-preferring readers-writer lock, on flock(2),
which every worker process of one run can open).

Each time an exclusive test waits, the other workers' in-flight tests must finish first (up to a
minute for the longest ones) while the waiting workers idle.  So the scopes that hold exclusive
tests are handed out first, their exclusive tests first within them, and a worker keeps the lock
from one exclusive test to the next: the exclusive tests run back to back at the start of the run,
while nothing long is in flight, instead of draining the whole run ten times.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

# The test extra installs uvloop, so that its event loop is tested (test_tunnel_fastpath.py starts a
# pair on each loop); every other tunnel process runs on asyncio's own loop, what a default install
# runs. A test that wants uvloop sets HYBRIDKEX_EVENT_LOOP in its process's environment.
os.environ.setdefault("HYBRIDKEX_EVENT_LOOP", "asyncio")

_DIR = pytest.StashKey[Path]()


_KEY = "hybridkex_lock_dir"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a serial run): one directory per run
        config.stash[_DIR] = Path(tempfile.mkdtemp(prefix="hybridkex-test-locks-"))


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_DIR, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: hand the run's lock directory to each worker."""
    node.workerinput[_KEY] = str(node.config.stash[_DIR])


def _lock_dir(config: pytest.Config) -> Path | None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return None  # one process: tests already run one at a time
    return Path(workerinput[_KEY])


def _is_exclusive(item: pytest.Item) -> bool:
    return item.get_closest_marker("exclusive") is not None


def _scope(item: pytest.Item) -> str:
    """The unit pytest-xdist's loadscope hands to one worker (its LoadScopeScheduling._split_scope)."""
    return item.nodeid.rsplit("::", 1)[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Scopes with an exclusive test first (exclusive tests first within them), then the others by
    size, largest first, as loadscope would order them (pyproject.toml turns its own reordering off
    so that this order stands).  Every worker collects, and so sorts, the same way."""
    scopes: dict[str, list[pytest.Item]] = {}
    for item in items:
        scopes.setdefault(_scope(item), []).append(item)
    units = [sorted(unit, key=lambda i: not _is_exclusive(i)) for unit in scopes.values()]  # stable
    units.sort(key=lambda unit: (not _is_exclusive(unit[0]), -len(unit)))  # stable: file order on ties
    items[:] = [item for unit in units for item in unit]


class _Held:
    """This worker's hold on the lock, kept across consecutive exclusive tests."""

    lock: IO[str] | None = None


def _acquire(directory: Path, exclusive: bool) -> IO[str]:
    with open(directory / "exclusive.turnstile", "a+") as turnstile:
        lock = open(directory / "exclusive.lock", "a+")  # noqa: SIM115 (held until _release)
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except BaseException:
            lock.close()
            raise
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
    return lock


def _release(lock: IO[str]) -> None:
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    directory = _lock_dir(item.config)
    if directory is None:
        yield
        return
    exclusive = _is_exclusive(item)
    if _Held.lock is None:  # else: held exclusively since the previous test, itself exclusive
        _Held.lock = _acquire(directory, exclusive)
    try:
        yield
    finally:
        if not (exclusive and nextitem is not None and _is_exclusive(nextitem)):
            lock, _Held.lock = _Held.lock, None
            assert lock is not None
            _release(lock)
