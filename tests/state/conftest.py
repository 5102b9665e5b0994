"""Fixtures of the shared-state tests: a real PostgreSQL 16 started by the suite (pgserver), both backends."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from statehelpers import PG, SEAL_KEY, state_url

from hybridkex.state import SharedState, open_state


@pytest.fixture(scope="session")
def pg() -> Iterator[PG]:
    """One PostgreSQL server for the session (about a second to start); skipped only if it cannot start."""
    try:
        with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset in CI, /tmp is used instead
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:  # pragma: no cover - pgserver is in the [test] extra
        pytest.skip(f"pgserver is not installed ({exc}); pip install -e '.[test]'")
    # A short path: the server's Unix socket lives in the data directory (sun_path is 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="hkx-pg-"))
    try:
        server = pgserver.get_server(root / "data", cleanup_mode="delete")
    except Exception as exc:  # pragma: no cover - depends on the machine
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pgserver cannot start PostgreSQL here: {type(exc).__name__}: {exc}")
    yield PG(server)
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


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
