"""The suite's readers-writer lock (tests/conftest.py) is really held while tests run in parallel."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest


def _lock_file(request: pytest.FixtureRequest) -> Path:
    workerinput = getattr(request.config, "workerinput", None)
    if workerinput is None:
        pytest.skip("a serial run (-n 0) takes no lock")
    return Path(workerinput["hybridkex_lock_dir"]) / "exclusive.lock"


@pytest.mark.exclusive
def test_an_exclusive_test_holds_the_lock_alone(request: pytest.FixtureRequest) -> None:
    with open(_lock_file(request)) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # nobody may share it now


def test_an_ordinary_test_shares_the_lock(request: pytest.FixtureRequest) -> None:
    with open(_lock_file(request)) as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held shared: an exclusive test must wait
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # ... while other ordinary tests go on
        fcntl.flock(other, fcntl.LOCK_UN)


def test_the_exclusive_tests_come_first(request: pytest.FixtureRequest) -> None:
    """Every scope (module or class) that holds an exclusive test is collected before any other,
    its exclusive tests first; a scope is never split (loadscope hands each to one worker)."""
    marks: dict[str, list[bool]] = {}  # scope -> exclusive or not, per test, in collection order
    runs: list[str] = []
    for item in request.session.items:
        scope = item.nodeid.rsplit("::", 1)[0]
        if not runs or runs[-1] != scope:
            runs.append(scope)
        marks.setdefault(scope, []).append(item.get_closest_marker("exclusive") is not None)
    assert len(runs) == len(set(runs))  # each scope is one contiguous run
    assert any(marks[request.node.nodeid.rsplit("::", 1)[0]])  # this module's own exclusive test counts
    holds = [any(marks[scope]) for scope in runs]
    assert holds == sorted(holds, reverse=True)  # the scopes with an exclusive test first
    for scope, flags in marks.items():
        assert flags == sorted(flags, reverse=True), scope  # and their exclusive tests first
