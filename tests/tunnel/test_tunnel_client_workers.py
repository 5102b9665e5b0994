"""``hybridkex tunnel client --workers 2`` against ``hybridkex tunnel server --workers 2``: real supervisors,
worker processes, KME and secure channel (QKD required, steady state on, recycled authentication) on
127.0.0.1.

Each client worker makes its own full handshake and its own steady-state connections; the server,
which keeps one steady-state parent per handshake, serves both.  The two client workers share one
recycled-key store file (safe across processes: one transaction per rotation).  Every connection
gets through, both client workers serve some, no QKD key ID is used twice, recycled authentication
never fails, and SIGTERM drains the client's supervisor."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from kmehelpers import SECURE_ENV, KMEProcess, make_psk, secure_toml
from tunnelhelpers import WAIT, EchoService, TunnelProcess, echo_exchange, expected_echo, stop_all

from hybridkex import cli

pytestmark = pytest.mark.timeout(90)

SERVER, CLIENT = "server.example", "client-a"
TOTAL, THREADS = 48, 4


class Supervised(TunnelProcess):
    def started(self) -> Supervised:
        super().started()
        self.worker_pids = list(self.wait_event("workers_ready", timeout=4 * WAIT)["workers"])
        return self


def _load(port: int) -> list[bool]:
    """TOTAL connections in THREADS threads, each a fresh local connection through the tunnel client."""
    results: list[bool] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(TOTAL // THREADS):
            payload = os.urandom(700)
            try:
                ok = echo_exchange(port, payload) == expected_echo(payload)
            except (OSError, AssertionError):
                ok = False
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20 * WAIT)
    return results


def _recycled(text: str) -> str:
    return text.replace('mode = "psk"', 'mode = "recycled"\nbootstrap = "psk"')


def test_client_workers_each_have_their_own_session_and_drain(tmp_path: Path, kme: KMEProcess, pki: Path,
                                                             echo: EchoService) -> None:
    psk = make_psk(tmp_path / "pair.psk")
    seal = tmp_path / "state.key"
    seal.write_text(os.urandom(32).hex())
    seal.chmod(0o600)
    procs: list[TunnelProcess] = []
    try:
        server_text = "workers = 2\n" + _recycled(secure_toml(
            listen="127.0.0.1:0", target=f"127.0.0.1:{echo.port}", identity=SERVER, peer=CLIENT, peer_sae="sae-a",
            psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki,
            extra=f'\n[state]\nurl = "{tmp_path / "state.sqlite3"}"\nkey_file = "{seal}"\n'
                  '\n[limits]\nhandshake_rate = 0\n'))
        (tmp_path / "server.toml").write_text(server_text)
        server = Supervised("server", tmp_path / "server.toml", env=SECURE_ENV)
        procs.append(server)
        server.started()
        # No [state] on the client: a client worker shares no steady state with the other (its ticket is its
        # own); only the recycled-key store file, which is safe across processes.
        client_text = "workers = 2\n" + _recycled(secure_toml(
            listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}", identity=CLIENT, peer=SERVER, peer_sae="sae-b",
            psk=psk, kme_url=kme.url_a, sae="sae-a", pki=pki,
            extra=f'\n[recycle]\nstore = "{tmp_path / "client-keys.sqlite3"}"\n'))
        (tmp_path / "client.toml").write_text(client_text)
        client = Supervised("client", tmp_path / "client.toml", env=SECURE_ENV)
        procs.append(client)
        client.started()

        results = _load(client.port)
        assert len(results) == TOTAL and all(results), results.count(False)

        client_ok = client.events("handshake_ok")
        by_worker: dict[int, list[dict[str, object]]] = {}
        for r in client_ok:
            by_worker.setdefault(r["pid"], []).append(r["session"])
        assert set(by_worker) == set(client.worker_pids), (set(by_worker), client.worker_pids)  # both served
        for pid, sessions in by_worker.items():
            # Each worker's own full handshake first (its own ticket), then its own steady-state connections.
            assert sessions[0]["steady"] is None, (pid, sessions[0])
        assert any(s["steady"] is not None for ss in by_worker.values() for s in ss), "no steady-state connection"
        server_ok = [r for r in server.records() if r.get("event") == "handshake_ok"]
        assert len(server_ok) >= TOTAL
        ids = [i for r in server_ok for i in r["session"]["qkd_key_ids"]]
        assert ids and len(ids) == len(set(ids)), "a QKD key ID was used twice"
        client_ids = {i for r in client_ok for i in r["session"]["qkd_key_ids"]}
        assert client_ids <= set(ids)
        # The only failures: steady-state connections that reached the other server worker than their
        # parent's (docs/tunnel.md, "State across workers"), each retried by its client worker once, with
        # a full handshake, invisibly to the application (all connections got through, above).
        failed = server.events("handshake_failed")
        retried = client.events("handshake_retried")
        assert all(r["msg"].startswith("steady-state connection refused") for r in retried), retried[:3]
        assert len(failed) == len(retried), (failed[:3], retried[:3])
        assert len({r["pid"] for r in failed}) <= 2 and all(r["pid"] in server.worker_pids for r in failed)
        assert not [r for r in failed if r.get("outcome") == "auth_failed"]
        full = [r["session"]["auth"] for r in server_ok if r["session"]["steady"] is None]
        # The bootstrap PSK only while the threads race to first contact; any later full handshake (a
        # steady-state connection refused before its parent reached the state) uses a recycled key.
        assert full.count("psk") <= THREADS and "psk" not in full[2 * THREADS:], full

        # SIGTERM: the client's supervisor drains both workers (an open connection is still served), they
        # exit 0, and so does it.
        with socket.create_connection(("127.0.0.1", client.port), timeout=WAIT) as s:
            s.sendall(b"E" + b"x" * 100)
            buf = b""
            while len(buf) < 100:
                buf += s.recv(65536)
            client.send_signal(signal.SIGTERM)
            client.wait_event("draining")
            s.sendall(b"y" * 100)
            while len(buf) < 200:
                buf += s.recv(65536)
            assert buf == b"x" * 100 + b"y" * 100 and client.proc.poll() is None
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        assert client.wait_exit(timeout=4 * WAIT) == 0
        stopped = client.events("stopped")
        assert stopped and set(stopped[-1]["exits"].values()) == {0}, stopped
        for pid in client.worker_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        stop_all(procs)


@pytest.mark.parametrize(("args", "message"), [
    (("--workers", "0"), "option --workers (workers): must be between 1 and 256, got 0"),
    (("--workers", "many"), "option --workers (workers): expected an integer, got 'many'"),
])
def test_client_workers_configuration_errors_are_one_line(tmp_path: Path, pki: Path, args: tuple[str, ...],
                                                          message: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "client.toml"
    cfg.write_text(secure_toml(listen="127.0.0.1:0", target="127.0.0.1:9", identity=CLIENT, peer=SERVER,
                               peer_sae="sae-b", psk=make_psk(tmp_path / "p.psk"), kme_url="https://127.0.0.1:9",
                               sae="sae-a", pki=pki))
    code = cli.main(["tunnel", "client", "--config", str(cfg), "--check-config", *args])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_client_workers_need_no_state_table(tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "client.toml"
    cfg.write_text("workers = 3\n" + secure_toml(
        listen="127.0.0.1:0", target="127.0.0.1:9", identity=CLIENT, peer=SERVER, peer_sae="sae-b",
        psk=make_psk(tmp_path / "p.psk"), kme_url="https://127.0.0.1:9", sae="sae-a", pki=pki))
    assert cli.main(["tunnel", "client", "--config", str(cfg), "--check-config"]) == 0
    assert "configuration OK: tunnel client" in capsys.readouterr().out
