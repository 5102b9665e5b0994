"""Write-behind rotations: queued after the handshake, committed in batches by a background thread;
reads of a pair wait for its queued rotations, so no key is visible (or used) before it is durable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from hybridkex.exceptions import InvalidKeyMaterial, StoreError
from hybridkex.recycle import SQLiteAuthKeyStore

A, B, C = "client.example", "server.example", "other.example"


def kid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Gate:
    """A crash hook that holds the writer at the start of its transaction until opened."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.stages: list[str] = []

    def __call__(self, stage: str) -> None:
        self.stages.append(stage)
        if stage == "begin" and threading.current_thread().name.startswith("hybridkex-recycle-writer"):
            assert self.open.wait(20)


def test_a_read_of_the_pair_waits_for_its_queued_rotation(tmp_path: Path) -> None:
    gate = Gate()
    store = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", crash_hook=gate)
    try:
        store.rotate(A, C, used_key_id=None, new_key_id=kid(9), new_key=bytes(32))  # synchronous: at once
        store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        assert store.pending_rotations() == 1
        seen: list[list[bytes]] = []
        reader = threading.Thread(target=lambda: seen.append([k.key_id for k in store.keys(A, B)]))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not seen  # held back: the key is not durable yet
        # another pair is not held up, and a separate connection sees nothing of the queued rotation
        assert [k.key_id for k in store.keys(A, C)] == [kid(9)]
        with SQLiteAuthKeyStore(tmp_path / "k.sqlite3", read_only=True) as other:
            assert other.keys(A, B) == []
        gate.open.set()
        reader.join(10)
        assert seen == [[kid(1)]] and store.pending_rotations() == 0
    finally:
        gate.open.set()
        store.close()


def test_queued_rotations_commit_in_one_batch_in_order(tmp_path: Path) -> None:
    gate = Gate()
    store = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", crash_hook=gate)
    try:
        store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        while "begin" not in gate.stages:  # the writer holds the first batch
            threading.Event().wait(0.01)
        for n in range(2, 12):  # the next handshakes' rotations queue up meanwhile
            store.rotate_later(A, B, used_key_id=kid(n - 1), new_key_id=kid(n), new_key=bytes(32))
        gate.open.set()
        store.flush(10)
        assert gate.stages.count("begin") == 2 and gate.stages.count("before-commit") == 2  # 1, then 10
        held = store.keys(A, B)
        assert [(k.key_id, k.epoch) for k in held] == [(kid(11), 11), (kid(10), 10)]  # applied in order
        assert store.summaries()[0].rotations == 11 and store.is_spent(A, B, kid(1))
    finally:
        gate.open.set()
        store.close()


def test_one_refused_rotation_does_not_undo_its_batch(tmp_path: Path) -> None:
    gate = Gate()
    store = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", crash_hook=gate)
    try:
        store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        store.rotate_later(A, C, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))  # collides
        gate.open.set()
        with pytest.raises(InvalidKeyMaterial, match="collides"):
            store.flush(10)
        assert [k.key_id for k in store.keys(A, B)] == [kid(1)] == [k.key_id for k in store.keys(A, C)]
    finally:
        gate.open.set()
        store.close()


def test_close_and_interpreter_exit_write_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite3"
    store = SQLiteAuthKeyStore(path)
    store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
    store.close()
    with SQLiteAuthKeyStore(path, read_only=True) as s:
        assert [k.key_id for k in s.keys(A, B)] == [kid(1)]
    with pytest.raises(StoreError):
        store.rotate_later(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=bytes(32))
    # a program that never closes its store: the rotation is written at exit
    code = textwrap.dedent(f"""
        from hybridkex.recycle import SQLiteAuthKeyStore
        s = SQLiteAuthKeyStore({str(path)!r})
        s.rotate_later({A!r}, {B!r}, used_key_id=(1).to_bytes(16, "big"), new_key_id=(2).to_bytes(16, "big"),
                       new_key=bytes(32))
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with SQLiteAuthKeyStore(path, read_only=True) as s:
        assert [k.key_id for k in s.keys(A, B)] == [kid(2), kid(1)]


def test_without_write_behind_rotate_later_is_rotate(tmp_path: Path) -> None:
    store = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", write_behind=False)
    with store:
        store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        assert store.pending_rotations() == 0
        with pytest.raises(InvalidKeyMaterial):  # raised to the caller, not logged
            store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        store.flush()


def test_a_read_never_waits_for_rotations_queued_after_it_began(tmp_path: Path) -> None:
    """A pair under constant load cannot starve its readers: each waits only for what came before it."""
    tokens = threading.Semaphore(0)  # one per writer transaction allowed to start
    holding = threading.Event()  # the writer has taken rotation 1 and waits

    def hook(stage: str) -> None:
        if stage == "begin" and threading.current_thread().name.startswith("hybridkex-recycle-writer"):
            holding.set()
            assert tokens.acquire(timeout=20)

    store = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", crash_hook=hook)
    try:
        store.rotate_later(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        assert holding.wait(10)
        seen: list[list[bytes]] = []
        reader = threading.Thread(target=lambda: seen.append([k.key_id for k in store.keys(A, B)]))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()
        store.rotate_later(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=bytes(32))  # after the read began
        tokens.release()  # only the transaction holding rotation 1 may run
        reader.join(10)
        assert seen == [[kid(1)]]  # it did not wait for rotation 2, which is still held
        assert store.pending_rotations() == 1
        tokens.release()
        store.flush(10)
        assert [k.key_id for k in store.keys(A, B)] == [kid(2), kid(1)]
    finally:
        for _ in range(4):
            tokens.release()
        store.close()


def test_a_stuck_writer_holds_a_read_back_only_for_a_bounded_time(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """E.g. another process holds the write lock: the read goes on with the committed keys (safe)."""
    from hybridkex.recycle import store as store_module

    monkeypatch.setattr(store_module, "READ_WAIT", 0.05)
    gate = Gate()
    store = SQLiteAuthKeyStore(tmp_path / "k.sqlite3", crash_hook=gate)
    try:
        store.rotate(A, B, used_key_id=None, new_key_id=kid(1), new_key=bytes(32))
        store.rotate_later(A, B, used_key_id=kid(1), new_key_id=kid(2), new_key=bytes(32))
        assert [k.key_id for k in store.keys(A, B)] == [kid(1)]  # not the queued key: it is not durable
        assert store.pending_rotations() == 1
        gate.open.set()
        store.flush(10)
        assert [k.key_id for k in store.keys(A, B)] == [kid(2), kid(1)]
    finally:
        gate.open.set()
        store.close()


def test_an_idle_writer_thread_exits_and_comes_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridkex.recycle import _writer

    monkeypatch.setattr(_writer, "IDLE_EXIT", 0.05)
    store = SQLiteAuthKeyStore(tmp_path / "idle.sqlite3")

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "hybridkex-recycle-writer idle.sqlite3"]

    try:
        for n in (1, 2):
            store.rotate_later(A, B, used_key_id=kid(n - 1) if n > 1 else None, new_key_id=kid(n), new_key=bytes(32))
            store.flush(10)
            for t in writers():
                t.join(10)
            assert not writers()  # idle: gone, so a store nobody closes is not pinned by its thread
        assert [k.key_id for k in store.keys(A, B)] == [kid(2), kid(1)]
    finally:
        store.close()
