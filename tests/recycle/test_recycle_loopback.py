"""Recycled authentication over real loopback sockets with the blocking driver: 20 concurrent
handshakes of one peer pair, each side with one shared SQLite store."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from recyclehelpers import INI_ID, RES_ID, QKDPair, loopback_pair, recycled_configs

from hybridkex.io import run_initiator, run_responder
from hybridkex.protocol import Session
from hybridkex.recycle import SQLiteAuthKeyStore

N = 20
TIMEOUT = 30.0


def _burst(ini_cfg, res_cfg, qkd: QKDPair) -> tuple[list[Session | BaseException], list[Session | BaseException]]:
    """N initiator threads released together against a server that serves each connection in a thread."""
    ini_results: list[Session | BaseException] = []
    res_results: list[Session | BaseException] = []
    lock = threading.Lock()
    with socket.create_server(("127.0.0.1", 0), backlog=N) as server:
        server.settimeout(TIMEOUT)
        port = server.getsockname()[1]
        workers: list[threading.Thread] = []

        def serve_one(conn: socket.socket) -> None:
            with conn:
                try:
                    result: Session | BaseException = run_responder(conn, res_cfg, qkd.res, timeout=TIMEOUT)
                except BaseException as exc:  # collected and asserted on below
                    result = exc
            with lock:
                res_results.append(result)

        def acceptor() -> None:
            for _ in range(N):
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                t = threading.Thread(target=serve_one, args=(conn,))
                t.start()
                workers.append(t)

        gate = threading.Barrier(N)

        def client() -> None:
            gate.wait(TIMEOUT)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                    result: Session | BaseException = run_initiator(sock, ini_cfg, qkd.ini, timeout=TIMEOUT)
            except BaseException as exc:
                result = exc
            with lock:
                ini_results.append(result)

        acc = threading.Thread(target=acceptor)
        acc.start()
        clients = [threading.Thread(target=client) for _ in range(N)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(2 * TIMEOUT)
        acc.join(TIMEOUT)
        for t in workers:
            t.join(TIMEOUT)
    return ini_results, res_results


def test_twenty_concurrent_handshakes_from_one_peer(tmp_path: Path) -> None:
    qkd = QKDPair.create()
    ini_store = SQLiteAuthKeyStore(tmp_path / "initiator.sqlite3")
    res_store = SQLiteAuthKeyStore(tmp_path / "responder.sqlite3")
    ini_cfg, res_cfg = recycled_configs(ini_store, res_store)
    for expected in ("psk", "recycled"):  # bootstrap, then the first recycled handshake retires the PSK
        ini, res = loopback_pair(ini_cfg, res_cfg, qkd)
        assert isinstance(res, Session) and res.info.auth_mode == expected, (ini, res)
    before = {k.key_id for k in ini_store.keys(INI_ID, RES_ID)}

    ini_results, res_results = _burst(ini_cfg, res_cfg, qkd)
    failures = [r for r in ini_results + res_results if not isinstance(r, Session)]
    assert not failures and len(ini_results) == len(res_results) == N, failures
    ini_by_th = {s.info.transcript_hash: s for s in ini_results if isinstance(s, Session)}
    res_by_th = {s.info.transcript_hash: s for s in res_results if isinstance(s, Session)}
    assert ini_by_th.keys() == res_by_th.keys() and len(ini_by_th) == N
    derived: set[bytes] = set()
    for th, i in ini_by_th.items():
        r = res_by_th[th]
        assert i.info.auth_mode == r.info.auth_mode == "recycled"
        assert i.info.auth_key_id == r.info.auth_key_id
        assert i.next_auth_key_id() == r.next_auth_key_id()
        derived.add(i.next_auth_key_id())
    assert len(derived) == N  # every handshake derived its own next key
    used = {bytes.fromhex(s.info.auth_key_id) for s in ini_by_th.values()}
    assert used <= before | derived  # only keys both sides held: the pre-burst window or a sibling

    # A consistent store on both sides: every rotation recorded once, the window bounded, no spent
    # key live, the bootstrap retired, and the two windows still share a key.
    windows = {}
    for store, local, peer in ((ini_store, INI_ID, RES_ID), (res_store, RES_ID, INI_ID)):
        (summary,) = store.summaries()
        assert summary.rotations == 2 + N and summary.bootstrap_retired
        live = store.keys(local, peer)
        assert 1 <= len(live) <= 8
        assert not any(store.is_spent(local, peer, k.key_id) for k in live)
        assert all(k.key_id in before | derived for k in live)
        windows[local] = {k.key_id for k in live}
    assert windows[INI_ID] & windows[RES_ID]
    # The pair goes on sequentially, and converges back to a short window.
    for _ in range(3):
        ini, res = loopback_pair(ini_cfg, res_cfg, qkd)
        assert isinstance(ini, Session) and isinstance(res, Session) and res.info.auth_mode == "recycled"
    assert len(ini_store.keys(INI_ID, RES_ID)) <= 8 and len(res_store.keys(RES_ID, INI_ID)) <= 8
    ini_store.close()
    res_store.close()
