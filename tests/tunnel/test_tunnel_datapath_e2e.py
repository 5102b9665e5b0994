"""The experimental data paths (``data_path = "threads"`` / ``"loops"``, issue 15) over the real
secure channel: a tunnel pair with QKD from a real simulated KME, TLS 1.3 on memory BIOs, real
processes.  Each path must keep the default path's guarantees: 16 MiB both ways at once intact,
half-close, the idle timeout, the drain on SIGTERM (and its deadline), no descriptor left open."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kmehelpers import KMEProcess
from tunnelhelpers import AFTER_EOF, WAIT, Conn, EchoService, TunnelProcess, trailer, wait_until

pytestmark = pytest.mark.timeout(120)

SECURE_ENV = {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "", "HYBRIDKEX_TESTING": ""}


@pytest.fixture(scope="module")
def kme_mod(pki: Path) -> Iterator[KMEProcess]:
    proc = KMEProcess(pki)
    yield proc
    proc.stop()


def _toml(path: Path, *, data_path: str, target: str, identity: str, peer: str, peer_sae: str, psk: Path,
          kme_url: str, sae: str, pki: Path, extra: str = "") -> Path:
    path.write_text("\n".join([
        f'data_path = "{data_path}"', 'listen = "127.0.0.1:0"', f'target = "{target}"', f'identity = "{identity}"',
        "", "[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', f'sae_id = "{peer_sae}"',
        "", "[policy]", 'qkd = "required"', "", "[limits]", "handshake_rate = 0", "",
        "[kme]", f'url = "{kme_url}"', f'sae_id = "{sae}"', f'cert = "{pki / (sae + ".crt")}"',
        f'key = "{pki / (sae + ".key")}"', f'ca = "{pki / "ca.crt"}"', "", "[logging]", 'format = "json"', "",
        extra, ""]))
    return path


def _pair(tmp: Path, kme: KMEProcess, echo_port: int, data_path: str,
          server_extra: str = "") -> tuple[TunnelProcess, TunnelProcess]:
    psk = tmp / "client.psk"
    if not psk.exists():
        psk.write_text(os.urandom(32).hex())
        psk.chmod(0o600)
    server = TunnelProcess("server", _toml(
        tmp / f"server-{data_path}.toml", data_path=data_path, target=f"127.0.0.1:{echo_port}",
        identity="server.example", peer="client-a", peer_sae="sae-a", psk=psk, kme_url=kme.url_b, sae="sae-b",
        pki=kme.pki, extra=server_extra), env=SECURE_ENV).started()
    client = TunnelProcess("client", _toml(
        tmp / f"client-{data_path}.toml", data_path=data_path, target=f"127.0.0.1:{server.port}",
        identity="client-a", peer="server.example", peer_sae="sae-b", psk=psk, kme_url=kme.url_a, sae="sae-a",
        pki=kme.pki), env=SECURE_ENV).started()
    return server, client


def _fds(proc: TunnelProcess) -> int:
    return len(os.listdir(f"/proc/{proc.proc.pid}/fd"))


@pytest.mark.parametrize("data_path", ["threads", "loops"])
def test_sixteen_mib_both_ways_half_close_and_no_fd_left(data_path: str, tmp_path: Path, kme_mod: KMEProcess,
                                                         echo: EchoService) -> None:
    server, client = _pair(tmp_path, kme_mod, echo.port, data_path)
    try:
        payload = os.urandom(16 << 20)
        with Conn(client.port) as c:
            # The echo service answers while we still send: both directions full at once.
            sender = threading.Thread(target=lambda: (c.send(b"E" + payload), c.shutdown_write()))
            sender.start()
            data = c.wait_eof(timeout=90)
            sender.join(timeout=WAIT)
        # The service saw our half-close, then sent its trailer and 64 KiB more: half-close both ways.
        assert hashlib.sha256(data).digest() == hashlib.sha256(payload + trailer(payload) + AFTER_EOF).digest()
        rec = server.wait_event("connection_closed")
        assert (rec["outcome"], rec["bytes_in"], rec["bytes_out"]) == (
            "closed", len(payload) + 1, len(payload) + len(trailer(payload)) + len(AFTER_EOF))
        before = (_fds(server), _fds(client))
        for _ in range(20):
            with Conn(client.port) as c:
                c.send(b"Ehello")
                c.shutdown_write()
                assert c.wait_eof().startswith(b"hello")
        wait_until(lambda: len(server.events("connection_closed")) == 21, "all connections closed")
        wait_until(lambda: (_fds(server), _fds(client)) == before, "the descriptors back where they were")
    finally:
        client.stop()
        server.stop()


@pytest.mark.parametrize("data_path", ["threads", "loops"])
def test_idle_timeout_then_sigterm_drain_with_its_deadline(data_path: str, tmp_path: Path, kme_mod: KMEProcess,
                                                           echo: EchoService) -> None:
    server, client = _pair(tmp_path, kme_mod, echo.port, data_path,
                           server_extra="[timeouts]\nidle = 0.5\ndrain = 1.5\n")
    try:
        with Conn(client.port) as c:
            c.send(b"Eping")
            assert c.wait_received(4) == b"ping"
            assert c.wait_eof() == b"ping"  # nothing moves: the server closes it after the idle timeout
        assert server.wait_event("connection_closed")["outcome"] == "idle_timeout"
        # A connection that keeps moving bytes is not idle; SIGTERM lets it run until the drain deadline.
        with Conn(client.port) as c:
            c.send(b"E")
            stop = threading.Event()

            def trickle() -> None:
                while not stop.wait(0.1):
                    try:
                        c.send(b"x")
                    except OSError:
                        return

            t = threading.Thread(target=trickle)
            t.start()
            try:
                c.wait_received(3)
                server.send_signal(signal.SIGTERM)
                server.wait_event("draining", open_connections=1)
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
                server.wait_event("drain_deadline")
                c.wait_eof()  # closed by the deadline
            finally:
                stop.set()
                t.join(timeout=WAIT)
        assert server.wait_exit() == 0
        assert server.events("stopped")[0]["forced"] == 1
    finally:
        client.stop()
        server.stop()
