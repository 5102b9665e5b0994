"""``hybridkex state check|migrate|purge``: one line each, exit 0, or one line on stderr and exit 10."""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import pytest
from statehelpers import PG, SEAL_KEY

from hybridkex import cli
from hybridkex.state import open_state
from hybridkex.state.postgres import MIGRATIONS


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    code = cli.main(["state", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), [ln for ln in err.splitlines() if ln.strip()]


def test_check_and_purge(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "state.key"
    key.write_text(SEAL_KEY.hex())
    key.chmod(0o600)
    with open_state(url, seal_key=SEAL_KEY) as s:  # what a server leaves: one live, one expired ticket
        s.put_ticket("steady", b"live", b"x", expires_at=time.time() + 600)
        s.put_ticket("steady", b"gone", b"x", expires_at=time.time() - 1)
        assert s.spend("qkd:a", ["k1"])
    code, out, err = _run(capsys, "check", "--url", url, "--key-file", str(key))
    assert (code, err) == (0, []) and "schema version 2, writable, the state key opens its tickets" in out[0]
    code, out, _ = _run(capsys, "purge", "--url", url)
    assert code == 0 and out == [f"purged 1 expired rows from {out[0].split(' from ')[1]}"]
    code, out, _ = _run(capsys, "purge", "--url", url, "--spent-older-than", "0")
    assert code == 0 and out[0].startswith("purged 2 ")  # the spent key ID and the check's probe row
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert s.get_ticket("steady", b"live") is not None and not s.is_spent("qkd:a", "k1")


def test_errors_are_one_line(pg: PG, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "check", "--url", str(tmp_path / "none.sqlite3"))
    assert code == 2 and len(err) == 1 and "no state file" in err[0]
    code, _, err = _run(capsys, "check", "--url", f"postgresql://hkx:secret@/hkx?host={tmp_path}")
    assert code == 10 and len(err) == 1 and "unreachable" in err[0] and "secret" not in err[0]
    url = pg.new_url()
    database = urllib.parse.urlsplit(url).path.lstrip("/")
    # An older schema: refused by check (and by servers), migrated by migrate, then fine.
    pg.admin(url, "CREATE TABLE hybridkex_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL "
                  "DEFAULT now())")
    for statement in MIGRATIONS[0]:
        pg.admin(url, statement)
    pg.admin(url, "INSERT INTO hybridkex_schema (version) VALUES (1)")
    code, _, err = _run(capsys, "check", "--url", url)
    assert code == 10 and len(err) == 1 and "schema version 1" in err[0] and "hybridkex state migrate" in err[0]
    code, out, err = _run(capsys, "migrate", "--url", url)
    assert (code, err) == (0, []) and out[0].endswith("schema version 2")
    assert _run(capsys, "check", "--url", url)[0] == 0
    pg.admin(pg.server.get_uri(), f"ALTER DATABASE {database} SET default_transaction_read_only = on")
    code, _, err = _run(capsys, "purge", "--url", url)
    assert code == 10 and len(err) == 1 and "read-only" in err[0]
