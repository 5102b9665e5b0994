"""The blocking API over real loopback sockets: connect/serve, data integrity, half-close,
timeouts at every stage, and bad peers rejected while others are served."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import socket
import threading
import time
from typing import Any

import pytest
from iohelpers import (
    CLIENT_ID,
    SERVER_ID,
    WAIT,
    SlowKeySource,
    digest,
    make_setup,
    recv_all,
    running_server,
)

import hybridkex
from hybridkex import (
    AuthenticationError,
    ConfigurationError,
    HandshakeTimeout,
    HybridKEXError,
    KeyUnavailableError,
    RemoteProtocolError,
    TLSError,
)
from hybridkex.api import ClientConfig, HybridServer, HybridSocket, ReconnectPolicy, ServerConfig, TLSOptions
from hybridkex.steady import SteadyTicket


def test_connect_and_serve_report_both_sessions(setup: Any) -> None:
    seen: queue.Queue[Any] = queue.Queue()

    def handler(conn: HybridSocket, address: Any) -> None:
        seen.put((conn.session, conn.channel_binding(), conn.export_keying_material(b"app", 24, b"ctx"), address))
        conn.sendall(conn.recv(100).upper())

    with running_server(setup, handler) as srv, \
            hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
        sock.sendall(b"ping")
        assert sock.recv(100) == b"PING"
        srv_session, srv_binding, srv_key, address = seen.get(timeout=WAIT)
        cli = sock.session
        assert address[0] == "127.0.0.1"
        # What each side reports: who the peer is, what went into the PSK, what TLS negotiated.
        assert cli.peer_identity == SERVER_ID and srv_session.peer_identity == CLIENT_ID
        assert cli.info.role == "initiator" and srv_session.info.role == "responder"
        assert cli.qkd_used and srv_session.qkd_used and cli.info.qkd_key_ids == srv_session.info.qkd_key_ids
        assert cli.info.transcript_hash == srv_session.info.transcript_hash
        assert [c.kind for c in cli.info.components] == ["qkd", "classical", "post-quantum"]
        assert cli.version == "TLSv1.3" and cli.cipher == "TLS_AES_128_GCM_SHA256"
        assert cli.group == srv_session.group == "X25519MLKEM768" and cli.post_quantum_tls
        assert cli.reconnect is False and cli.reconnect_index is None
        assert cli.tls.psk_identity == srv_session.tls.psk_identity
        assert re.fullmatch(rb"hk1-psk\.[A-Za-z0-9_-]{22}", cli.tls.psk_identity or b"")  # printable (spec 4.3)
        # The TLS exporter agrees on both ends: channel binding and application keys.
        assert sock.channel_binding() == cli.channel_binding() == srv_binding and len(srv_binding) == 32
        assert sock.export_keying_material(b"app", 24, b"ctx") == srv_key
        assert isinstance(sock.reconnect_ticket, SteadyTicket)  # reconnects are off; the steady state is on
        d = cli.as_dict()
        assert d["tls"]["group"] == "X25519MLKEM768" and d["hybrid"]["peer_identity"] == SERVER_ID
        assert "reconnect" not in cli.summary() and "X25519MLKEM768" in cli.summary()
        assert "fd=" in repr(sock) and SERVER_ID in repr(sock)


@pytest.mark.parametrize("size", [1, 1000, 16 * 1024 + 1, 1024 * 1024, 16 * 1024 * 1024],
                         ids=["1B", "1000B", "16KiB+1", "1MiB", "16MiB"])
def test_data_integrity_both_directions_at_once(setup: Any, size: int) -> None:
    """Each side sends ``size`` random bytes while receiving the other's: full duplex on one
    HybridSocket per side (one thread sends, another receives)."""
    client_data, server_data = os.urandom(size), os.urandom(size)
    result: queue.Queue[Any] = queue.Queue()

    def handler(conn: HybridSocket, address: Any) -> None:
        sender = threading.Thread(target=lambda: (conn.sendall(server_data), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        got = recv_all(conn)
        sender.join(WAIT)
        result.put(digest(got))

    with running_server(setup, handler) as srv:
        sock = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        sock.settimeout(WAIT)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(client_data)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # reported below
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        got = recv_all(sock)
        sender.join(WAIT)
        sock.close()
        assert not errors
        assert len(got) == size and got == server_data
        assert result.get(timeout=WAIT) == digest(client_data)


def test_makefile_binary_and_text(setup: Any) -> None:
    def handler(conn: HybridSocket, address: Any) -> None:
        with conn.makefile("rb") as rfile, conn.makefile("wb", buffering=0) as wfile:
            for line in rfile:
                wfile.write(b"> " + line)

    with running_server(setup, handler) as srv, \
            hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
        sock.settimeout(WAIT)
        text = sock.makefile("rw", encoding="utf-8", newline="\n")
        text.write("one\ntwo\n")
        text.flush()
        assert text.readline() == "> one\n" and text.readline() == "> two\n"
        text.close()
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    # A makefile() object keeps the connection open after close(), as with a socket.
    with running_server(setup, handler) as srv:
        sock = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        f = sock.makefile("rwb")
        sock.close()
        f.write(b"still open\n")
        f.flush()
        assert f.readline() == b"> still open\n"
        f.close()
        assert sock.fileno() == -1


def test_half_close_peer_reads_eof_other_direction_flows(setup: Any) -> None:
    """shutdown(SHUT_WR) sends close_notify and a TCP FIN; the server reads EOF, then answers."""
    log: queue.Queue[Any] = queue.Queue()

    def handler(conn: HybridSocket, address: Any) -> None:
        request = recv_all(conn)  # until the client's close_notify
        log.put(request)
        conn.sendall(b"answer after your EOF: " + hashlib.sha256(request).hexdigest().encode())
        conn.sendall(b"!")

    with running_server(setup, handler) as srv, \
            hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
        sock.settimeout(WAIT)
        sock.sendall(b"request " * 1000)
        sock.shutdown(socket.SHUT_WR)
        with pytest.raises(BrokenPipeError):
            sock.sendall(b"more")
        answer = recv_all(sock)
        assert log.get(timeout=WAIT) == b"request " * 1000
        assert answer == b"answer after your EOF: " + hashlib.sha256(b"request " * 1000).hexdigest().encode() + b"!"


def test_close_sends_close_notify_and_truncation_is_an_error(setup: Any) -> None:
    outcomes: queue.Queue[Any] = queue.Queue()

    def handler(conn: HybridSocket, address: Any) -> None:
        try:
            outcomes.put(("data", recv_all(conn)))
        except TLSError as exc:
            outcomes.put(("error", exc))

    with running_server(setup, handler) as srv:
        sock = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        sock.sendall(b"bye")
        sock.close()
        assert outcomes.get(timeout=WAIT) == ("data", b"bye")
        # A TCP FIN without close_notify (here through a duplicate of the descriptor) is not a clean
        # EOF: the server raises TLSError (possible truncation) instead of returning b"".
        sock = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        sock.sendall(b"partial")
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        raw.shutdown(socket.SHUT_WR)
        kind, value = outcomes.get(timeout=WAIT)
        assert kind == "error" and "close_notify" in str(value)
        raw.close()
        sock.close()


def test_socket_timeout_and_nonblocking(setup: Any) -> None:
    release = threading.Event()

    def handler(conn: HybridSocket, address: Any) -> None:
        release.wait(WAIT)
        conn.sendall(b"late")

    with running_server(setup, handler) as srv, \
            hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
        assert sock.gettimeout() is None and sock.getblocking()  # the setup deadline does not stick
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(10)
        release.set()
        sock.settimeout(WAIT)
        assert sock.recv(10) == b"late"
        with pytest.raises(ValueError):
            sock.settimeout(-1)


def test_pki_authentication() -> None:
    setup = make_setup(auth="pki")
    with running_server(setup) as srv, \
            hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
        sock.sendall(b"pki")
        assert sock.recv(10) == b"pki"
        assert sock.session.info.auth_mode == "pki-ed25519" and sock.session.peer_identity == SERVER_ID


def _good_client(setup: Any, address: Any, results: queue.Queue[Any]) -> None:
    try:
        with hybridkex.connect(address, setup.client, key_source=setup.client_keys) as sock:
            sock.settimeout(WAIT)
            sock.sendall(b"good")
            results.put(sock.recv(10))
    except BaseException as exc:  # reported by the test
        results.put(exc)


def test_wrong_psk_rejected_while_another_client_succeeds(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup()
    bad = make_setup(client_psk=os.urandom(32))
    results: queue.Queue[Any] = queue.Queue()
    with running_server(setup) as srv:
        with pytest.raises(AuthenticationError):
            hybridkex.connect(srv.server_address, bad.client, key_source=setup.client_keys)
        _good_client(setup, srv.server_address, results)
        assert results.get(timeout=WAIT) == b"good"
    lines = [r.getMessage() for r in server_log.records if r.name == "hybridkex.server"]
    assert any("rejected connection" in m and "AuthenticationError" in m for m in lines), lines


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HK\x09\x01\x00\x00\x00\x00",
                                     b"HK\x01\x01\xff\xff\xff\xff", b"\x16\x03\x01\x00\x05hello",
                                     b"\x16\x03\x01\xff\xff"],
                         ids=["http", "bad-version", "huge-hello", "bad-clienthello", "huge-tls-record"])
def test_garbage_rejected_with_typed_error(setup: Any, server_log: pytest.LogCaptureFixture, garbage: bytes) -> None:
    results: queue.Queue[Any] = queue.Queue()
    with running_server(setup) as srv:
        with socket.create_connection(srv.server_address, timeout=WAIT) as raw:
            raw.sendall(garbage)
            raw.shutdown(socket.SHUT_WR)
            # The server answers at most with an Abort or an alert, then closes (a reset when it
            # left our garbage unread).
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(65536):
                    pass
        _good_client(setup, srv.server_address, results)
        assert results.get(timeout=WAIT) == b"good"
    lines = [r.getMessage() for r in server_log.records if "rejected connection" in r.getMessage()]
    assert len(lines) == 1
    assert "RemoteProtocolError" in lines[0] or "VersionError" in lines[0] or "TLSError" in lines[0]


def test_silent_and_slowloris_peers_time_out_without_blocking_others(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup(server_timeout=1.0)
    results: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    with running_server(setup) as srv:
        silent = socket.create_connection(srv.server_address)
        slow = socket.create_connection(srv.server_address)

        def drip() -> None:  # a valid-looking Hello header, one byte every 0.2 s
            for b in b"HK\x01\x01\x00\x00\x10\x00" + b"\x00" * 100:
                if stop.wait(0.2):
                    return
                try:
                    slow.send(bytes([b]))
                except OSError:
                    return

        dripper = threading.Thread(target=drip)
        dripper.start()
        # While both hold their connections, a normal client is served at once.
        _good_client(setup, srv.server_address, results)
        assert results.get(timeout=WAIT) == b"good"
        # Both are dropped when the 1 s setup deadline passes.
        assert silent.recv(100) == b""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and sum(
                "HandshakeTimeout" in r.getMessage() for r in server_log.records) < 2:
            time.sleep(0.05)
        stop.set()
        dripper.join(WAIT)
        silent.close()
        slow.close()
    timeouts = [r.getMessage() for r in server_log.records if "HandshakeTimeout" in r.getMessage()]
    assert len(timeouts) == 2, timeouts


def test_client_handshake_timeout_against_a_silent_server(setup: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(HandshakeTimeout, match="did not"):
            hybridkex.connect(listener.getsockname(), setup.client, key_source=setup.client_keys, timeout=0.3)
    finally:
        listener.close()


def test_slow_kme_bounded_by_the_kme_timeout(server_log: pytest.LogCaptureFixture) -> None:
    """The server's KME answers after 3 s, the policy allows 0.3 s per KME call: the handshake
    fails with a QKD error (QKD required) instead of hanging; with QKD optional it falls back to
    the no-QKD suite and says so."""
    stop = threading.Event()
    for mode in ("required", "optional"):
        setup = make_setup(qkd=mode, kme_timeout=0.3)
        slow = SlowKeySource(setup.server_keys, 3.0, stop)
        server = HybridServer(("127.0.0.1", 0), setup.server, lambda c, a: c.sendall(b"ok"), key_source=slow)
        with server.start(0.05) as srv:
            if mode == "required":
                with pytest.raises(HybridKEXError):
                    hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
            else:
                with hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
                    assert sock.recv(10) == b"ok"
                    assert sock.session.qkd_used is False and sock.session.info.qkd_note
    stop.set()
    lines = [r.getMessage() for r in server_log.records if "rejected connection" in r.getMessage()]
    assert len(lines) == 1 and "KeyUnavailableError" in lines[0], lines
    assert issubclass(KeyUnavailableError, HybridKEXError)
    fallbacks = [r for r in server_log.records if "WITHOUT QKD" in r.getMessage()]
    assert len(fallbacks) == 2  # both ends of the optional-mode session say so (one process here)
    assert all(r.levelname == "WARNING" and "x25519-mlkem768-hkdfsha256" in r.getMessage() for r in fallbacks)


def test_max_connections_bound(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup(max_connections=1, server_timeout=5.0)
    with running_server(setup) as srv:
        holder = socket.create_connection(srv.server_address)  # holds the only slot (silent)
        try:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                with pytest.raises((HybridKEXError, OSError)):
                    hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys, timeout=3)
                if any("already being served" in r.getMessage() for r in server_log.records):
                    break
        finally:
            holder.close()
    assert any("already being served" in r.getMessage() for r in server_log.records)


def test_handler_errors_are_logged_and_the_server_keeps_serving(setup: Any,
                                                                server_log: pytest.LogCaptureFixture) -> None:
    calls = []

    def handler(conn: HybridSocket, address: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        conn.sendall(b"fine")

    with running_server(setup, handler) as srv:
        with hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
            assert sock.recv(10) == b""  # the server closed it cleanly (close_notify)
        with hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
            assert sock.recv(10) == b"fine"
    assert any("handler failed" in r.getMessage() and r.exc_info for r in server_log.records)


def test_configuration_errors() -> None:
    setup = make_setup()
    with pytest.raises(ConfigurationError, match="key_source"):
        hybridkex.connect(("127.0.0.1", 9), setup.client)  # refused before any connection is opened
    with pytest.raises(ConfigurationError, match="key_source"):
        HybridServer(("127.0.0.1", 0), setup.server, print)
    with pytest.raises(ConfigurationError, match="timeout"):
        ClientConfig(setup.client.handshake, timeout=0)
    with pytest.raises(ConfigurationError, match="max_connections"):
        ServerConfig(setup.server.handshake, max_connections=0)
    with pytest.raises(ConfigurationError, match=r"reconnect\.max_uses"):
        ReconnectPolicy(enabled=True, max_uses=0)
    with pytest.raises(ConfigurationError, match=r"reconnect\.lifetime"):
        ReconnectPolicy(lifetime=float("inf"))
    with pytest.raises(ConfigurationError, match=r"tls\.groups"):
        TLSOptions(groups="")
    with pytest.raises(ConfigurationError, match="config"):
        ClientConfig.coerce(setup.server.handshake)  # type: ignore[arg-type]
    assert ClientConfig.coerce(setup.client.handshake).handshake is setup.client.handshake
    assert TLSOptions(groups=["X25519MLKEM768", "X25519"]).groups == "X25519MLKEM768:X25519"


def test_require_pq_and_groups_reach_tls() -> None:
    setup = make_setup(tls=TLSOptions(require_pq=True))
    with running_server(setup) as srv, \
            hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
        assert sock.session.group == "X25519MLKEM768"
    classical = make_setup(tls=TLSOptions(groups="X25519"))
    with running_server(classical) as srv, \
            hybridkex.connect(srv.server_address, classical.client, key_source=classical.client_keys) as sock:
        assert sock.session.group == "x25519" and not sock.session.post_quantum_tls
        # The PSK itself still carries ML-KEM and QKD: only TLS's own key exchange is classical.
        assert [c.name for c in sock.session.info.components][-1].startswith("ML-KEM")


def test_unreachable_server_is_an_oserror(setup: Any) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    address = probe.getsockname()
    probe.close()
    with pytest.raises(ConnectionRefusedError):
        hybridkex.connect(address, setup.client, key_source=setup.client_keys)


def test_peer_closing_mid_handshake_is_typed(setup: Any) -> None:
    """A server that accepts, reads the Hello and hangs up: the client gets a typed error."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=serve_once)
    t.start()
    try:
        with pytest.raises(RemoteProtocolError):
            hybridkex.connect(listener.getsockname(), setup.client, key_source=setup.client_keys)
    finally:
        t.join(WAIT)
        listener.close()


def test_tls_stage_timeout_after_the_hybrid_handshake(server_log: pytest.LogCaptureFixture) -> None:
    """A client that completes the hybrid handshake and then never sends its ClientHello is dropped
    at the TLS stage's deadline, and the parent session it would have had is forgotten."""
    from hybridkex.io.sync import run_initiator

    setup = make_setup(reconnect=ReconnectPolicy(enabled=True),
                       tls=TLSOptions(timeout=0.5))
    with running_server(setup) as srv, socket.create_connection(srv.server_address, timeout=WAIT) as raw:
        session = run_initiator(raw, setup.client.handshake, setup.client_keys)
        assert session.info.peer_identity == SERVER_ID
        assert raw.recv(100) == b""  # closed by the server when the TLS stage's 0.5 s passed
        registry = srv.reconnect_registry
        assert registry is not None and registry.stats.registered == 1 and len(registry) == 0
    lines = [r.getMessage() for r in server_log.records if "rejected connection" in r.getMessage()]
    assert len(lines) == 1 and "HandshakeTimeout" in lines[0] and "TLS handshake" in lines[0], lines


def test_nonblocking_send_never_duplicates_or_loses_bytes(setup: Any) -> None:
    """Send without blocking into a peer that is not reading until the kernel pushes back; what
    send() reported as taken must arrive exactly once, in order."""
    data = os.urandom(32 * 1024 * 1024)
    go = threading.Event()
    got: queue.Queue[Any] = queue.Queue()

    def handler(conn: HybridSocket, address: Any) -> None:
        go.wait(WAIT)
        got.put(digest(recv_all(conn)))

    with running_server(setup, handler) as srv, \
            hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys) as sock:
        sock.setblocking(False)
        offset, pushed_back = 0, False
        while offset < len(data):
            try:
                offset += sock.send(data[offset:offset + 65536])
            except BlockingIOError:
                pushed_back = True
                break
        assert pushed_back  # 32 MiB do not fit in loopback buffers
        go.set()
        sock.settimeout(WAIT)
        sock.sendall(data[offset:])
        sock.shutdown(socket.SHUT_WR)
        assert got.get(timeout=WAIT) == digest(data)
