"""The blocking driver over real loopback sockets."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from hybridkex.exceptions import (
    AuthenticationError,
    ConfigurationError,
    HandshakeTimeout,
    HybridKEXError,
    KeyUnavailableError,
    RemoteProtocolError,
)
from hybridkex.io import QKDKeyManager, run_initiator, run_responder
from hybridkex.policy import KeyBudget, Policy, Timeouts
from hybridkex.protocol import PSKAuthenticator
from hybridkex.qkd import MemoryKeyLink

from .helpers import INI_ID, INI_SAE, RES_SAE, QKDPair, clock, configs

ABORT_TIMEOUT = b"HK\x01\x7f\x00\x00\x00\x01\x07"


class Server:
    """Accepts connections on 127.0.0.1 and runs the responder on each, until closed."""

    def __init__(self, config, keys, *, timeout: float = 10.0,
                 after: Callable[[socket.socket, Any], None] | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.results: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._args = (config, keys, timeout, after)
        self._thread = threading.Thread(target=self._serve, name="test-responder", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        config, keys, timeout, after = self._args
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    result: Any = run_responder(conn, config, keys, timeout=timeout, clock=clock)
                except HybridKEXError as exc:  # a failed handshake never stops the server
                    result = exc
                if after is not None:
                    after(conn, result)
                self.results.put(result)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def result(self) -> Any:
        return self.results.get(timeout=10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.listener.close()
        assert not self._thread.is_alive()


@pytest.mark.parametrize("auth", ["psk", "pki-hybrid"])
def test_handshake_over_loopback(auth):
    ini, res = configs(auth=auth)
    q = QKDPair.create()
    with Server(res, q.res) as server, server.connect() as sock:
        session = run_initiator(sock, ini, q.ini, clock=clock)
        peer = server.result()
    assert session.tls_psk() == peer.tls_psk()
    assert session.info.transcript_hash == peer.info.transcript_hash
    assert session.info.auth_mode == auth and session.info.qkd_used


def test_server_keeps_serving_after_malformed_input():
    ini, res = configs()
    q = QKDPair.create()
    with Server(res, q.res) as server:
        with server.connect() as bad:
            bad.sendall(b"GET / HT")  # one header's worth, so the server has nothing unread when it closes
            reply = bad.recv(100)
            assert reply == b"HK\x01\x7f\x00\x00\x00\x01\x01"  # Abort(decode_error), nothing more
            assert bad.recv(100) == b""  # then the server closed the connection
        err = server.result()
        assert isinstance(err, RemoteProtocolError) and "not speaking the hybridkex handshake" in str(err)
        with server.connect() as sock:
            good = run_initiator(sock, ini, q.ini, clock=clock)
        assert server.result().tls_psk() == good.tls_psk()


def test_silent_peer_times_out():
    _, res = configs()
    q = QKDPair.create()
    with Server(res, q.res, timeout=0.3) as server, server.connect() as sock:
        err = server.result()
        assert isinstance(err, HandshakeTimeout)
        assert sock.recv(100) == ABORT_TIMEOUT


def test_peer_closing_mid_handshake():
    ini, res = configs()
    q = QKDPair.create()
    with Server(res, q.res) as server:
        with server.connect() as sock:
            from hybridkex.protocol import Initiator

            hello = Initiator(ini, clock=clock).data_to_send()
            sock.sendall(hello[:100])
        err = server.result()
        assert isinstance(err, RemoteProtocolError) and "closed the connection" in str(err)


def test_authentication_failure_reaches_the_client_as_a_typed_error():
    ini, res = configs()
    from dataclasses import replace

    wrong = replace(res, authenticators=(PSKAuthenticator({INI_ID: b"\x07" * 32}),))
    q = QKDPair.create()
    with Server(wrong, q.res) as server, server.connect() as sock:
        with pytest.raises(AuthenticationError) as err:
            run_initiator(sock, ini, q.ini, clock=clock)
        assert "does not verify" in err.value.detail
        server_err = server.result()
        assert isinstance(server_err, AuthenticationError)
        assert server_err.detail == "the peer reported that authentication or key confirmation failed"


class _BlockingSource:
    """A key source whose KME hangs until released (released at teardown)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.release = threading.Event()

    sae_id = property(lambda self: self.inner.sae_id)
    kme_id = property(lambda self: self.inner.kme_id)

    def get_keys(self, slave, number=1, size_bits=256):
        self.release.wait(10)
        return self.inner.get_keys(slave, number, size_bits)

    def get_keys_by_id(self, master, ids):
        return self.inner.get_keys_by_id(master, ids)

    def status(self, slave):
        return self.inner.status(slave)


@pytest.mark.parametrize("qkd_mode", ["required", "optional"])
def test_slow_kme(qkd_mode):
    ini, res = configs(qkd=qkd_mode)
    from dataclasses import replace

    res = replace(res, policy=Policy(qkd=qkd_mode, timeouts=Timeouts(handshake=10, kme=0.2)))  # type: ignore[arg-type]
    link = MemoryKeyLink(("kme-client", "kme-server"))
    slow = _BlockingSource(link.source(RES_SAE, 1))
    try:
        with Server(res, QKDKeyManager(slow)) as server, server.connect() as sock:
            if qkd_mode == "required":
                with pytest.raises(KeyUnavailableError):
                    run_initiator(sock, ini, QKDKeyManager(link.source(INI_SAE, 0)), clock=clock)
                err = server.result()
                assert isinstance(err, KeyUnavailableError)
                assert isinstance(err.__cause__, HandshakeTimeout)
            else:
                session = run_initiator(sock, ini, QKDKeyManager(link.source(INI_SAE, 0)), clock=clock)
                assert not session.info.qkd_used
                assert "did not answer within 0.2 s" in server.result().info.qkd_note
    finally:
        slow.release.set()


def test_driver_reads_nothing_beyond_the_handshake():
    """The stream continues after the handshake (as TLS will): the driver leaves those bytes."""
    ini, res = configs()
    q = QKDPair.create()
    after_bytes: list[bytes] = []

    def after(conn: socket.socket, result: Any) -> None:
        conn.settimeout(5)
        data = b""
        while len(data) < 10:
            chunk = conn.recv(10 - len(data))
            if not chunk:
                break
            data += chunk
        after_bytes.append(data)

    with Server(res, q.res, after=after) as server, server.connect() as sock:
        run_initiator(sock, ini, q.ini, clock=clock)
        sock.sendall(b"next-layer")
        assert not isinstance(server.result(), Exception)
    assert after_bytes == [b"next-layer"]


def test_epoch_budget_over_sockets():
    budget = KeyBudget(mode="epoch", epoch_max_handshakes=10)
    ini, res = configs(budget=budget)
    q = QKDPair.create(budget)
    stock = q.link.stock()
    with Server(res, q.res) as server:
        for _ in range(4):
            with server.connect() as sock:
                s = run_initiator(sock, ini, q.ini, clock=clock)
            assert server.result().tls_psk() == s.tls_psk() and s.info.qkd_usage == "epoch"
    assert stock - q.link.stock() == 1


def test_driver_configuration_errors():
    ini, _ = configs(budget=KeyBudget(mode="epoch"))
    link = MemoryKeyLink(("kme-client", "kme-server"))
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ConfigurationError, match="long-lived"):
            run_initiator(a, ini, link.source(INI_SAE, 0))
        with pytest.raises(ConfigurationError, match="no key source"):
            run_initiator(a, configs()[0], None)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing was sent before the configuration was refused
            b.recv(1)
    # A plain KeySource is wrapped for a fresh budget.
    ini, res = configs()
    with Server(res, QKDKeyManager(link.source(RES_SAE, 1))) as server, server.connect() as sock:
        s = run_initiator(sock, ini, link.source(INI_SAE, 0), clock=clock)
        assert server.result().tls_psk() == s.tls_psk()
