"""Fixtures of the shared-state tests: a real PostgreSQL 16 started by the suite (pgserver), both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from statehelpers import PG, SEAL_KEY, pg_session, state_url

from hybridkex.state import SharedState, open_state


@pytest.fixture(scope="session")
def pg() -> Iterator[PG]:
    """One PostgreSQL server for the session; skipped only if it cannot start."""
    yield from pg_session()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh state of each backend (a new SQLite file; a new PostgreSQL database)."""
    pg = request.getfixturevalue("pg") if request.param == "postgresql" else None
    return state_url(request.param, tmp_path, pg)


@pytest.fixture
def state(url: str) -> Iterator[SharedState]:
    s = open_state(url, seal_key=SEAL_KEY)
    yield s
    s.close()
