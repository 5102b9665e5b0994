"""The recycled-key store: rotation window, no lockout, no reuse, crash safety, concurrency."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from hybridkex.exceptions import ConfigurationError, InvalidKeyMaterial
from hybridkex.recycle import SQLiteAuthKeyStore

A, B = "client.example", "server.example"


def kid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def key(n: int) -> bytes:
    return bytes([n % 256]) * 32


@pytest.fixture
def store(tmp_path: Path) -> SQLiteAuthKeyStore:
    s = SQLiteAuthKeyStore(tmp_path / "keys.sqlite3")
    yield s
    s.close()


def ids(s: SQLiteAuthKeyStore) -> list[tuple[int, int]]:
    return [(int.from_bytes(k.key_id, "big"), k.epoch) for k in s.keys(A, B)]


def test_file_is_private_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keys.sqlite3"
    with SQLiteAuthKeyStore(path) as s:
        s.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        assert stat.S_IMODE(wal.stat().st_mode) & 0o077 == 0


def test_bootstrap_then_rotation_chain(store: SQLiteAuthKeyStore) -> None:
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    assert ids(store) == [(1, 1)]
    assert not store.bootstrap_retired(A, B)  # not yet proven: the peer may not hold key 1
    store.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=key(2))
    assert ids(store) == [(2, 2), (1, 1)]  # 1 kept until the peer proves it holds 2
    assert store.bootstrap_retired(A, B)  # a recycled key was used successfully
    store.rotate(A, B, used_key_id=kid(2), new_key_id=kid(3), new_key=key(3))
    assert ids(store) == [(3, 3), (2, 2)]
    assert store.is_spent(A, B, kid(1))
    assert [e for e, _, _ in store.audit_log(A, B)].count("rotate") == 3


def test_lost_final_message_never_locks_out(tmp_path: Path) -> None:
    """The initiator stored key 2, the responder never saw the last message: both still share key 1."""
    ini = SQLiteAuthKeyStore(tmp_path / "i.sqlite3")
    res = SQLiteAuthKeyStore(tmp_path / "r.sqlite3")
    for s in (ini, res):
        s.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    ini.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=key(2))  # responder missed it
    common = {k.key_id for k in ini.keys(A, B)} & {k.key_id for k in res.keys(A, B)}
    assert kid(1) in common
    # the next handshake uses key 1 and both rotate to key 3; key 2 lingers on one side only
    for s in (ini, res):
        s.rotate(A, B, used_key_id=kid(1), new_key_id=kid(3), new_key=key(3))
    assert {k.key_id for k in res.keys(A, B)} == {kid(1), kid(3)}
    assert kid(3) in {k.key_id for k in ini.keys(A, B)}
    # using key 3 supersedes epoch 1 (and the orphan key 2 of epoch 2 is kept until superseded)
    for s in (ini, res):
        s.rotate(A, B, used_key_id=kid(3), new_key_id=kid(4), new_key=key(4))
    assert kid(1) not in {k.key_id for k in ini.keys(A, B)}


def test_spent_key_id_is_never_stored_again(store: SQLiteAuthKeyStore) -> None:
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    store.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=key(2))
    store.rotate(A, B, used_key_id=kid(2), new_key_id=kid(3), new_key=key(3))
    with pytest.raises(InvalidKeyMaterial):
        store.rotate(A, B, used_key_id=kid(3), new_key_id=kid(1), new_key=key(9))
    assert ids(store) == [(3, 3), (2, 2)]  # the failed rotation changed nothing


def test_window_is_bounded(tmp_path: Path) -> None:
    s = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", max_keys=3)
    s.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    for n in range(2, 10):  # handshakes whose final message was always lost: nothing is confirmed
        s.rotate(A, B, used_key_id=None, new_key_id=kid(n), new_key=key(n))
    assert len(s.keys(A, B)) == 3
    with pytest.raises(ConfigurationError):
        SQLiteAuthKeyStore(tmp_path / "x.sqlite3", max_keys=1)


def test_rebootstrap_and_retire(store: SQLiteAuthKeyStore) -> None:
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    store.retire_bootstrap(A, B)
    assert store.bootstrap_retired(A, B)
    store.rebootstrap(A, B)
    assert not store.bootstrap_retired(A, B) and store.keys(A, B) == []
    assert store.is_spent(A, B, kid(1))


def test_inspection_never_shows_key_material(store: SQLiteAuthKeyStore) -> None:
    secret = bytes(range(32))
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=secret)
    text = repr(store.summaries()) + repr(store.keys(A, B)) + repr(store)
    assert secret.hex() not in text and "redacted" in text
    (summary,) = store.summaries()
    assert (summary.keys, summary.newest_epoch, summary.rotations) == (1, 1, 1)


def test_concurrent_rotations_from_threads(store: SQLiteAuthKeyStore) -> None:
    """20 concurrent handshakes of one pair, all authenticated with key 1: every derived key is stored."""
    store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            store.rotate(A, B, used_key_id=kid(1), new_key_id=kid(100 + n), new_key=key(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    keys = store.keys(A, B)
    assert len(keys) == 8  # bounded window; the confirmed key 1 is never evicted first
    assert kid(1) in {k.key_id for k in keys}


def test_two_processes_share_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    SQLiteAuthKeyStore(path).rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
    script = textwrap.dedent(f"""
        from hybridkex.recycle import SQLiteAuthKeyStore
        s = SQLiteAuthKeyStore({str(path)!r})
        import sys
        base = int(sys.argv[1])
        for n in range(base, base + 25):
            s.rotate({A!r}, {B!r}, used_key_id=None, new_key_id=n.to_bytes(16, "big"), new_key=bytes(32))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(base)]) for base in (1000, 2000)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    with SQLiteAuthKeyStore(path) as s:
        assert s.summaries()[0].rotations == 51


@pytest.mark.parametrize("stage", ["begin", "after-delete", "before-commit", "after-commit"])
def test_sigkill_inside_rotation_leaves_old_or_new_state(tmp_path: Path, stage: str) -> None:
    """A process killed at any point of a rotation leaves a consistent store: the old or the new state."""
    path = tmp_path / "crash.sqlite3"
    with SQLiteAuthKeyStore(path) as s:
        s.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=key(1))
        s.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=key(2))
    script = textwrap.dedent(f"""
        import os, signal
        from hybridkex.recycle import SQLiteAuthKeyStore
        def hook(stage):
            if stage == {stage!r}:
                os.kill(os.getpid(), signal.SIGKILL)
        s = SQLiteAuthKeyStore({str(path)!r}, crash_hook=hook)
        s.rotate({A!r}, {B!r}, used_key_id=(2).to_bytes(16, "big"), new_key_id=(3).to_bytes(16, "big"),
                 new_key=bytes([3]) * 32)
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL
    with SQLiteAuthKeyStore(path) as s:
        state = sorted((int.from_bytes(k.key_id, "big"), k.epoch) for k in s.keys(A, B))
    old, new = [(1, 1), (2, 2)], [(2, 2), (3, 3)]
    assert state == (new if stage == "after-commit" else old)
    assert os.path.exists(path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridkex", "recycle", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_inspects_retires_and_rebootstraps(tmp_path: Path) -> None:
    path = tmp_path / "cli.sqlite3"
    secret = bytes(range(100, 132))
    with SQLiteAuthKeyStore(path) as s:
        s.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=secret)
        s.rotate(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=key(2))
    listed = _cli("--store", str(path), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = __import__("json").loads(listed.stdout)
    assert (row["peer"], row["keys"], row["newest_epoch"], row["bootstrap_retired"]) == (B, 2, 2, True)
    table = _cli("--store", str(path), "list")
    for out in (listed.stdout, table.stdout):
        assert secret.hex() not in out and key(2).hex() not in out
    assert _cli("--store", str(path), "rebootstrap", "--local", A, "--peer", B).returncode == 0
    with SQLiteAuthKeyStore(path) as s:
        assert s.keys(A, B) == [] and not s.bootstrap_retired(A, B)
    assert _cli("--store", str(path), "retire-bootstrap", "--local", A, "--peer", B).returncode == 0
    audit = _cli("--store", str(path), "audit", "--local", A, "--peer", B)
    assert [line.split()[1] for line in audit.stdout.splitlines()] == ["rotate", "rotate", "rebootstrap",
                                                                        "retire-bootstrap"]
    missing = _cli("--store", str(tmp_path / "nope.sqlite3"), "list")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no key store" in missing.stderr
    assert not (tmp_path / "nope.sqlite3").exists()


def test_reads_of_a_broken_store_raise_store_error(tmp_path: Path) -> None:
    from hybridkex.exceptions import StoreError

    s = SQLiteAuthKeyStore(tmp_path / "broken.sqlite3")
    for table in ("pairs", "audit", "spent_key_ids"):  # simulate a damaged or foreign database file
        s._db.execute(f"DROP TABLE {table}")
    for call in (lambda: s.bootstrap_retired(A, B), s.summaries, lambda: s.audit_log(A, B),
                 lambda: s.is_spent(A, B, kid(1))):
        with pytest.raises(StoreError, match=r"broken\.sqlite3"):
            call()
    s.close()
