"""Suite-wide: tests marked ``exclusive`` run alone while the rest run in parallel (pytest-xdist).

Most tests wait on real processes and sockets, so several xdist workers share two cores well.  A
few measure nothing but still depend on the machine not being saturated: a KME restart that a
client must ride out within its retry budget, 1,000 connections within a deadline, an attacker
table whose proxy must see every message in time.  Those take an exclusive lock; every other test
takes it shared.  A waiting exclusive test first holds a turnstile, so new shared holders queue
behind it instead of starving it (the classic writer-preferring readers-writer lock, on flock(2),
which every worker process of one run can open).
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    directory = _lock_dir(item.config)
    if directory is None:
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(directory / "exclusive.turnstile", "a+") as turnstile, open(directory / "exclusive.lock", "a+") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
