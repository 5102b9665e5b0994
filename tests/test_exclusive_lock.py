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
