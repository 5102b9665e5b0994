"""A key store is opened read-only by inspection, and a file that is not a store is never touched.

``hybridkex recycle --store FILE list`` used to chmod FILE to 0600 and add hybridkex's tables to
whatever SQLite database FILE was.  Now ``list``/``audit`` open the store through SQLite's
``mode=ro``; every command refuses a file that is not a hybridkex store with one line and leaves
it byte- and mode-identical (no sidecar file appears next to it either); only the write commands
create, and only a new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hybridkex.cli import main
from hybridkex.exceptions import StoreError
from hybridkex.recycle import SQLiteAuthKeyStore

A, B = "server.example", "client.example"
COMMANDS = (("list",), ("list", "--json"), ("audit", "--local", A, "--peer", B),
            ("retire-bootstrap", "--local", A, "--peer", B), ("rebootstrap", "--local", A, "--peer", B))


def _cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI entry point, in this process (a subprocess per call would cost ~1 s each)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["recycle", "--store", str(store), *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _cli_process(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridkex", "recycle", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def _snapshot(path: Path) -> tuple[str, int, list[str]]:
    """Content hash, permission bits, and every file in the directory (sidecars would show here)."""
    return (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.stat().st_mode),
            sorted(os.listdir(path.parent)))


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a world-readable text file, not a key store\n")
    path.chmod(0o644)
    return path


def _foreign_db(tmp_path: Path, *, wal: bool = False) -> Path:
    path = tmp_path / "app.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO customers(name) VALUES ('alice')")
    # a table that shares a name with one of ours must not make it look like a store
    db.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT)")
    db.close()
    path.chmod(0o644)
    return path


@pytest.mark.parametrize("kind", ["text", "sqlite", "sqlite-wal"])
def test_every_command_refuses_a_foreign_file_and_leaves_it_identical(tmp_path: Path, kind: str) -> None:
    path = _text_file(tmp_path) if kind == "text" else _foreign_db(tmp_path, wal=kind == "sqlite-wal")
    before = _snapshot(path)
    first = _cli_process(path, "list")  # once as a real process: one line on stderr, exit status
    assert first.returncode == 10 and first.stderr.startswith("hybridkex: error: not a hybridkex key store: ")
    for command in COMMANDS:
        done = _cli(path, *command)
        assert done.returncode != 0, (command, done.stdout)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "not a hybridkex key store: " in done.stderr and str(path) in done.stderr, done.stderr
        assert _snapshot(path) == before, command
    if kind != "text":
        db = sqlite3.connect(path)
        assert {r[0] for r in db.execute("SELECT name FROM sqlite_master")} == {"customers", "audit"}
        db.close()


def test_the_library_refuses_foreign_files_too(tmp_path: Path) -> None:
    for path in (_text_file(tmp_path), _foreign_db(tmp_path)):
        before = _snapshot(path)
        for read_only in (False, True):
            with pytest.raises(StoreError, match="not a hybridkex key store"):
                SQLiteAuthKeyStore(path, read_only=read_only)
            assert _snapshot(path) == before
    other_app = tmp_path / "other.sqlite3"
    db = sqlite3.connect(other_app, isolation_level=None)
    db.execute("PRAGMA application_id=1234")
    db.close()
    with pytest.raises(StoreError, match="another application"):
        SQLiteAuthKeyStore(other_app)
    with pytest.raises(StoreError, match="not a regular file"):
        SQLiteAuthKeyStore(tmp_path)
    lookalike = tmp_path / "lookalike.sqlite3"  # a table of our name with other columns
    db = sqlite3.connect(lookalike, isolation_level=None)
    db.execute("CREATE TABLE auth_keys (id INTEGER PRIMARY KEY, secret TEXT)")
    db.close()
    with pytest.raises(StoreError, match="table auth_keys lacks"):
        SQLiteAuthKeyStore(lookalike)


def test_inspecting_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "typo.sqlite3"
    for command in (("list",), ("audit", "--local", A, "--peer", B)):
        done = _cli_process(path, *command)
        assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
        assert "no key store at" in done.stderr
        assert os.listdir(tmp_path) == []
    with pytest.raises(StoreError, match="no key store"):
        SQLiteAuthKeyStore(path, read_only=True)
    assert os.listdir(tmp_path) == []


def test_list_and_audit_read_a_store_without_changing_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    with SQLiteAuthKeyStore(path) as s:
        s.rotate(A, B, used_key_id=None, new_key_id=bytes(16), new_key=bytes(range(32)))
    path.chmod(0o640)  # the operator's choice (say a monitoring group); a read must not undo it
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    listed = _cli(path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["local"], r["peer"], r["keys"]) for r in json.loads(listed.stdout)] == [(A, B, 1)]
    audit = _cli(path, "audit", "--local", A, "--peer", B)
    assert audit.returncode == 0 and "rotate" in audit.stdout, audit.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with SQLiteAuthKeyStore(path, read_only=True) as ro:
        assert ro.bootstrap_state(A, B) == "active"
        for write in (lambda: ro.retire_bootstrap(A, B), lambda: ro.rebootstrap(A, B),
                      lambda: ro.rotate(A, B, used_key_id=None, new_key_id=bytes([1]) * 16, new_key=bytes(32))):
            with pytest.raises(StoreError, match="read-only"):
                write()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_write_command_creates_a_new_private_store(tmp_path: Path) -> None:
    """How a pair is enrolled under policy "rebootstrap" on a host that has no store yet."""
    path = tmp_path / "new" / "keys.sqlite3"
    done = _cli(path, "rebootstrap", "--local", A, "--peer", B)
    assert done.returncode == 0, done.stderr
    assert "created a new key store" in done.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with SQLiteAuthKeyStore(path, read_only=True) as s:
        assert s.bootstrap_state(A, B) == "active"
    again = _cli(path, "retire-bootstrap", "--local", A, "--peer", B)
    assert again.returncode == 0 and "created" not in again.stdout, again.stderr


def test_an_empty_file_becomes_a_store_only_when_writing(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    path.touch()
    with pytest.raises(StoreError, match=r"not a hybridkex key store: .*empty file"):
        SQLiteAuthKeyStore(path, read_only=True)
    assert path.stat().st_size == 0
    with SQLiteAuthKeyStore(path) as s:
        assert s.created
        s.rotate(A, B, used_key_id=None, new_key_id=bytes(16), new_key=bytes(32))
    with SQLiteAuthKeyStore(path, read_only=True) as s:
        assert [k.epoch for k in s.keys(A, B)] == [1]


def test_a_store_written_by_0_1_0_is_accepted_and_marked(tmp_path: Path) -> None:
    """0.1.0 wrote no application_id; its stores are recognised by their tables."""
    path = tmp_path / "old.sqlite3"
    with SQLiteAuthKeyStore(path) as s:
        s.rotate(A, B, used_key_id=None, new_key_id=bytes(16), new_key=bytes(32))
        s._db.execute("PRAGMA application_id=0")
    with SQLiteAuthKeyStore(path, read_only=True) as s:
        assert len(s.keys(A, B)) == 1
    with SQLiteAuthKeyStore(path) as s:
        assert s._db.execute("PRAGMA application_id").fetchone()[0] != 0
        assert not s.created
