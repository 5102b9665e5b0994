"""Helpers of the shared-state tests: a real PostgreSQL (pgserver), and worker processes that race."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import random
import shutil
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybridkex.exceptions import StateError, StateUnavailable
from hybridkex.state import open_state

SEAL_KEY = bytes(range(32))
_names = itertools.count()


class PG:
    """One PostgreSQL server for the session; each test gets its own database."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def new_url(self) -> str:
        import psycopg

        name = f"t{next(_names)}_{random.getrandbits(32):08x}"
        with psycopg.connect(self.server.get_uri(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return str(self.server.get_uri(name))

    def admin(self, url: str, sql: str) -> None:
        import psycopg

        with psycopg.connect(url, autocommit=True) as c:
            c.execute(sql)

    def stop(self) -> None:
        import pgserver

        pgserver.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        # The same socket directory as before (pgserver derives it from the data directory): URLs stay valid.
        self.server.ensure_postgres_running()


def pg_session() -> Iterator[PG]:
    """A PostgreSQL server for a test session or module (about a second to start); the calling
    fixture is skipped, with the reason, only if pgserver cannot start one here."""
    import pytest

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
    try:
        yield PG(server)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def raw_rows(url: str, table: str) -> list[tuple[Any, ...]]:
    """The key columns of a state table as the database holds them (expired rows too, which reads hide)."""
    cols = "kind, handle" if table == "state_tickets" else "scope, key_id"
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url) as c:
            return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
                    for r in c.execute(f"SELECT {cols} FROM {table}").fetchall()]
    with contextlib.closing(sqlite3.connect(url)) as db:
        return [tuple(r) for r in db.execute(f"SELECT {cols} FROM {table}").fetchall()]


def state_url(kind: str, tmp_path: Path, pg: PG | None) -> str:
    if kind == "sqlite":
        return str(tmp_path / "state.sqlite3")
    assert pg is not None
    return pg.new_url()


def ctx() -> Any:
    return mp.get_context("spawn")  # a fresh interpreter: no connection or lock inherited from the test


class Gate:
    """Releases racing workers together, once every one of them has opened its state."""

    def __init__(self, c: Any) -> None:
        self.ready = c.Semaphore(0)
        self.go = c.Event()

    def wait(self, timeout: float = 60) -> None:
        self.ready.release()
        self.go.wait(timeout)

    def open(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            if not self.ready.acquire(timeout=timeout):
                raise AssertionError("a worker did not start")
        self.go.set()


def _run(target: Any, args: tuple[Any, ...], gate: Gate, out: Any, i: int) -> None:
    try:
        out.put((i, True, target(*args, gate)))
    except BaseException as exc:
        out.put((i, False, f"{type(exc).__name__}: {exc}"))
        raise


def race(target: Any, arglist: list[tuple[Any, ...]], *, during: Any = None, timeout: float = 240) -> list[Any]:
    """One process per argument tuple, released together; ``during(gate)`` runs meanwhile; the results."""
    c = ctx()
    gate, out = Gate(c), c.Queue()
    procs = [c.Process(target=_run, args=(target, a, gate, out, i)) for i, a in enumerate(arglist)]
    for p in procs:
        p.start()
    try:
        gate.open(len(procs))
        if during is not None:
            during()
        results: dict[int, Any] = {}
        for _ in procs:
            i, ok, value = out.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"worker {i} failed: {value}")
            results[i] = value
        return [results[i] for i in range(len(procs))]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():  # pragma: no cover - a hung worker
                p.kill()


# -- workers (module level: spawned processes import them) ------------------------------------------------

def spend_worker(url: str, scope: str, ids: list[str], seed: int, mid: Any,  # noqa: PLR0917 - race() passes them
                 start: Any) -> list[str]:
    """Try to spend every ID once, in a random order; the IDs this process got.

    After its first attempt each worker waits at ``mid`` for the others: on a busy machine one
    process could otherwise spend every ID before the rest are scheduled, and nothing would race."""
    rng = random.Random(seed)
    order = list(ids)
    rng.shuffle(order)
    got = []
    with open_state(url, seal_key=SEAL_KEY) as state:
        start.wait(30)
        for i, k in enumerate(order):
            if state.spend(scope, [k]):
                got.append(k)
            if i == 0:
                mid.wait(60)
    return got


def counter_worker(url: str, scope: str, top: int, seed: int, start: Any) -> list[int]:
    rng = random.Random(seed)
    order = list(range(1, top + 1))
    rng.shuffle(order)
    with open_state(url, seal_key=SEAL_KEY) as state:
        start.wait(30)
        return [i for i in order if state.spend_counter(scope, i) is None]


def take_worker(url: str, scope: str, start: Any) -> list[str]:
    got = []
    with open_state(url, seal_key=SEAL_KEY) as state:
        start.wait(30)
        while (k := state.take(scope)) is not None:
            got.append(k)
    return got


def rotate_worker(url: str, pair: tuple[str, str], base: int, rounds: int, start: Any) -> int:
    """Rotations as a responder does them: authenticate with the newest key held, derive the next."""
    done = 0
    local, peer = pair
    with open_state(url, seal_key=SEAL_KEY) as state:
        store = state.auth_keys()
        start.wait(30)
        for n in range(rounds):
            held = store.keys(local, peer)
            used = held[0].key_id if held else None
            new = (base + n).to_bytes(16, "big")
            store.rotate(local, peer, used_key_id=used, new_key_id=new, new_key=bytes([n % 256]) * 32)
            done += 1
    return done


def restart_worker(url: str, scope: str, stop: Any, failed: Any, recovered: Any,  # noqa: PLR0917 - race() passes them
                   start: Any) -> dict[str, Any]:
    """Spend IDs id-0, id-1, ... (every worker the same sequence, racing) until told to stop, through a
    database restart: each ID's answer (True/False), and every error's type and text.  Releases the
    semaphore ``failed`` at its first error and ``recovered`` at its first success after one."""
    results: dict[str, bool] = {}
    errors: list[tuple[str, str, float]] = []
    last_ok_after_error = told_recovered = False
    with open_state(url, seal_key=SEAL_KEY) as state:
        start.wait(30)
        n = 0
        while not stop.is_set():
            k = f"id-{n}"
            try:
                results[k] = state.spend(scope, [k])
            except StateError as exc:
                errors.append((type(exc).__name__, str(exc), time.monotonic()))
                if len(errors) == 1:
                    failed.release()
                last_ok_after_error = False
                time.sleep(0.05)
                continue  # the same ID again: a lost answer makes it False (fail closed), never True twice
            if errors:
                if not told_recovered:
                    recovered.release()
                    told_recovered = True
                last_ok_after_error = True
            n += 1
    return {"results": results, "errors": errors, "recovered": last_ok_after_error,
            "unavailable": sum(1 for e in errors if e[0] == StateUnavailable.__name__)}


def ticket_take_worker(url: str, kind: str, handles: list[bytes], seed: int, start: Any) -> list[bytes]:
    """Take every ticket it can (in a random order, as connections of several processes would); the
    handles this process got, each with its own secret checked."""
    rng = random.Random(seed)
    order = list(handles)
    rng.shuffle(order)
    got = []
    with open_state(url, seal_key=SEAL_KEY) as state:
        start.wait(30)
        for h in order:
            t = state.take_ticket(kind, h)
            if t is not None:
                assert t.secret == h * 2, "a ticket's secret was swapped"
                got.append(h)
    return got
