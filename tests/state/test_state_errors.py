"""One clear line when the state database is unreachable, read-only or of another schema version."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest
from statehelpers import PG, SEAL_KEY

from hybridkex.exceptions import StateError, StateReadOnly, StateSchemaError, StateUnavailable, StoreError
from hybridkex.state import SCHEMA_VERSION, open_state, redact_url
from hybridkex.state.postgres import MIGRATIONS


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_state_errors_are_store_errors() -> None:
    for cls in (StateUnavailable, StateReadOnly, StateSchemaError):
        assert issubclass(cls, StateError) and issubclass(cls, StoreError)


def test_unreachable_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://hkx:s3cret-pw@/hkx?host={tmp_path}&connect_timeout=2"
    with pytest.raises(StateUnavailable) as exc:
        open_state(url)
    text = _one_line(exc)
    assert "unreachable" in text and "s3cret-pw" not in text and "hkx:***@" in text
    assert exc.value.__cause__ is None and exc.value.__suppress_context__  # no psycopg traceback chained


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@db.example:5433/x") == "postgresql://u:***@db.example:5433/x"
    assert "pw" not in redact_url("postgresql://db.example/x?user=u&password=pw")
    assert redact_url("postgresql://u@db.example/x") == "postgresql://u@db.example/x"


def test_read_only_database(pg: PG) -> None:
    url = pg.new_url()
    database = urllib.parse.urlsplit(url).path.lstrip("/")
    pg.admin(url, f"ALTER DATABASE {database} SET default_transaction_read_only = on")
    with pytest.raises(StateReadOnly) as exc:
        open_state(url)
    assert "read-only" in _one_line(exc)


def test_becoming_read_only_while_open(pg: PG) -> None:
    url = pg.new_url()
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert s.spend("s", ["a"])
        # Every connection read-only from now on (as after a fail-over to a standby): the pooled ones end.
        database = urllib.parse.urlsplit(url).path.lstrip("/")
        pg.admin(pg.server.get_uri(), f"ALTER DATABASE {database} SET default_transaction_read_only = on")
        pg.admin(pg.server.get_uri(), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                      f"datname = '{database}' AND pid <> pg_backend_pid()")
        with pytest.raises(StateReadOnly) as exc:
            s.spend("s", ["b"])
        assert "read-only" in _one_line(exc)


def test_newer_schema_is_refused(url: str) -> None:
    with open_state(url) as s:
        if s.backend == "postgresql":
            s.run("test", lambda c: c.execute("INSERT INTO hybridkex_schema (version) VALUES (%s)",
                                              (SCHEMA_VERSION + 1,)))
    if not url.startswith("postgresql"):
        import sqlite3

        db = sqlite3.connect(url)
        db.execute("UPDATE state_schema SET version = ?", (SCHEMA_VERSION + 1,))
        db.commit()
        db.close()
    with pytest.raises(StateSchemaError) as exc:
        open_state(url)
    assert f"schema version {SCHEMA_VERSION + 1}" in _one_line(exc)


def test_older_schema_is_migrated_only_when_asked(pg: PG) -> None:
    url = pg.new_url()
    pg.admin(url, "CREATE TABLE hybridkex_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL "
                  "DEFAULT now())")
    for statement in MIGRATIONS[0]:
        pg.admin(url, statement)
    pg.admin(url, "INSERT INTO hybridkex_schema (version) VALUES (1)")
    pg.admin(url, "INSERT INTO state_spent VALUES ('s', 'old', 0)")
    with pytest.raises(StateSchemaError) as exc:
        open_state(url)
    assert "migrate" in _one_line(exc)
    with open_state(url, seal_key=SEAL_KEY, migrate=True) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert not s.spend("s", ["old"])  # what version 1 held is kept
        s.auth_keys().rotate("a", "b", used_key_id=None, new_key_id=b"\x01" * 16, new_key=b"\x02" * 32)
    with open_state(url) as s:
        assert s.schema_version() == SCHEMA_VERSION


def test_tables_not_made_by_hybridkex_are_refused(pg: PG) -> None:
    url = pg.new_url()
    pg.admin(url, "CREATE TABLE state_spent (x int)")
    with pytest.raises(StateSchemaError) as exc:
        open_state(url)
    assert "not created by hybridkex" in _one_line(exc)


def test_concurrent_first_opens_create_the_schema_once(pg: PG) -> None:
    import threading

    url = pg.new_url()
    errors: list[BaseException] = []

    def go() -> None:
        try:
            open_state(url).close()
        except BaseException as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)
    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open_state(url) as s:
        assert s.schema_version() == SCHEMA_VERSION


def test_a_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError) as exc:
        open_state(path)
    assert "not a hybridkex key store" in _one_line(exc)
    assert path.read_bytes() == before


def test_a_down_database_costs_one_connection_attempt_per_interval(pg: PG) -> None:
    """After a failed attempt, calls fail at once with the same line (no new attempt) until RETRY_AFTER:
    an event loop calling the state is not held up by a connection attempt per call."""
    import time

    from hybridkex.state import postgres

    url = pg.new_url()
    with open_state(url) as s:
        assert s.spend("a", ["b"])
        pg.admin(pg.server.get_uri(), f"DROP DATABASE {urllib.parse.urlsplit(url).path.lstrip('/')} WITH (FORCE)")
        with pytest.raises(StateUnavailable) as first:
            s.spend("a", ["c"])
        assert s._down is not None
        until = s._down[0]
        with pytest.raises(StateUnavailable) as second:
            s.spend("a", ["d"])
        assert str(second.value) == str(first.value) and s._down[0] == until  # no new attempt
        time.sleep(postgres.RETRY_AFTER + 0.05)
        with pytest.raises(StateUnavailable):
            s.spend("a", ["e"])
        assert s._down[0] > until  # a new attempt, after the interval
