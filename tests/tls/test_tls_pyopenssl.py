"""pyOpenSSL external-PSK contexts: real TLS 1.3 handshakes between our own client and server."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import stat
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from OpenSSL import SSL
from tlshelpers import (
    EXT_KEY_SHARE,
    EXT_PRE_SHARED_KEY,
    GROUP_X25519,
    GROUP_X25519MLKEM768,
    HS_CERTIFICATE,
    HS_CLIENT_HELLO,
    HS_SERVER_HELLO,
    PSK_DHE_KE,
    PSK_KE,
    Background,
    MessageLog,
    memory_pair,
    pump,
)

from hybridkex import get_suite, tls
from hybridkex.exceptions import (
    ConfigurationError,
    HandshakeTimeout,
    HybridKEXError,
    InvalidKeyMaterial,
    LocalProtocolError,
    PSKHashMismatch,
    PSKMismatch,
    PSKRejected,
    TLSError,
    UnknownPSKIdentity,
    UnsupportedAlgorithm,
)

SHA384 = "x25519-mlkem1024-qkd-hkdfsha384"


def test_default_handshake_is_hybrid_psk_dhe(identity: bytes, psk: bytes) -> None:
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    assert r.client_error is None and r.server_error is None
    for info, role in ((r.client, "client"), (r.server, "server")):
        assert info is not None
        assert info.role == role
        assert info.version == "TLSv1.3"
        assert info.cipher == "TLS_AES_128_GCM_SHA256"
        assert info.group == "X25519MLKEM768" and info.post_quantum
        assert info.psk_identity == identity
    # Application data flows both ways.
    r.client_tls.send(b"ping")
    pump(r.client_tls, r.server_tls)
    assert r.server_tls.recv() == b"ping"
    r.server_tls.send(b"pong")
    pump(r.client_tls, r.server_tls)
    assert r.client_tls.recv() == b"pong"


def test_sha384_suite(identity: bytes, psk: bytes) -> None:
    suite = get_suite(SHA384)
    assert suite.hash == "sha384"
    r = memory_pair(
        tls.client_context(identity, psk, suite=suite), tls.server_context({identity: psk}, suite=SHA384)
    )
    assert r.client is not None and r.server is not None, (r.client_error, r.server_error)
    assert r.client.cipher == r.server.cipher == "TLS_AES_256_GCM_SHA384"
    assert r.client.group == "X25519MLKEM768"


def test_cipher_name_accepted_as_suite(identity: bytes, psk: bytes) -> None:
    r = memory_pair(
        tls.client_context(identity, psk, suite="TLS_AES_256_GCM_SHA384"),
        tls.server_context({identity: psk}, suite="TLS_AES_256_GCM_SHA384"),
    )
    assert r.server is not None and r.server.cipher == "TLS_AES_256_GCM_SHA384"


def test_classical_only_client_gets_x25519(identity: bytes, psk: bytes) -> None:
    r = memory_pair(tls.client_context(identity, psk, groups="X25519"), tls.server_context({identity: psk}))
    assert r.client is not None and r.server is not None
    assert r.client.group == r.server.group == "x25519"
    assert not r.server.post_quantum


def test_require_pq_rejects_classical_client_cleanly(identity: bytes, psk: bytes) -> None:
    r = memory_pair(
        tls.client_context(identity, psk, groups=["X25519"]),
        tls.server_context({identity: psk}, require_pq=True),
    )
    assert r.client is None and r.server is None
    assert type(r.server_error) is TLSError and "X25519MLKEM768" in str(r.server_error)
    assert isinstance(r.client_error, PSKRejected)


def test_require_pq_both_ends(identity: bytes, psk: bytes) -> None:
    r = memory_pair(
        tls.client_context(identity, psk, require_pq=True), tls.server_context({identity: psk}, require_pq=True)
    )
    assert r.client is not None and r.client.group == "X25519MLKEM768"
    assert r.server is not None and r.server.group == "X25519MLKEM768"


def test_require_pq_client_refuses_classical_server(identity: bytes, psk: bytes) -> None:
    r = memory_pair(
        tls.client_context(identity, psk, require_pq=True), tls.server_context({identity: psk}, groups="X25519")
    )
    assert r.client is None and isinstance(r.client_error, TLSError)
    assert isinstance(r.server_error, TLSError)


def test_require_pq_needs_a_pq_group() -> None:
    with pytest.raises(ConfigurationError) as e:
        tls.server_context({}, groups="X25519:secp256r1", require_pq=True)
    assert e.value.field == "groups"


def test_set_groups_on_a_plain_context() -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    tls.set_groups(ctx, "X25519MLKEM768:X25519")
    with pytest.raises(ConfigurationError) as e:
        tls.set_groups(ctx, "X25519:no-such-group")
    assert e.value.field == "groups"


def test_wrong_key_is_psk_mismatch_on_both_ends(identity: bytes, psk: bytes) -> None:
    r = memory_pair(tls.client_context(identity, os.urandom(32)), tls.server_context({identity: psk}))
    assert isinstance(r.server_error, PSKMismatch), r.server_error
    assert isinstance(r.client_error, PSKMismatch), r.client_error
    assert psk.hex() not in str(r.server_error) + str(r.client_error)


def test_unknown_identity(psk: bytes) -> None:
    r = memory_pair(tls.client_context(b"mallory", psk), tls.server_context({b"alice": psk}))
    assert isinstance(r.server_error, UnknownPSKIdentity), r.server_error
    assert "unknown PSK identity" in str(r.server_error)
    # The client cannot know why; it gets the common base class with an explanation.
    assert type(r.client_error) is PSKRejected
    assert "identity" in str(r.client_error)


@pytest.mark.parametrize(
    ("client_suite", "server_suite"), [(SHA384, "TLS_AES_128_GCM_SHA256"), ("TLS_AES_128_GCM_SHA256", SHA384)]
)
def test_hash_mismatch(identity: bytes, psk: bytes, client_suite: str, server_suite: str) -> None:
    r = memory_pair(
        tls.client_context(identity, psk, suite=client_suite),
        tls.server_context({identity: psk}, suite=server_suite),
    )
    assert isinstance(r.server_error, PSKHashMismatch), r.server_error
    assert isinstance(r.client_error, PSKRejected)


def test_certificate_only_client_is_told_apart(identity: bytes, psk: bytes) -> None:
    plain = SSL.Context(SSL.TLS_CLIENT_METHOD)  # a client with no PSK at all
    server = tls.MemoryTLS(tls.server_context({identity: psk}), server_side=True)
    client = SSL.Connection(plain, None)
    client.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    server.receive_data(client.bio_read(65536))
    with pytest.raises(UnknownPSKIdentity, match="no external PSK"):
        server.do_handshake()


def test_client_refuses_a_certificate_server(identity: bytes, psk: bytes, ed25519_cert: tuple[Any, Any]) -> None:
    cert, key = ed25519_cert
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.use_certificate(cert)
    sctx.use_privatekey(key)
    client = tls.MemoryTLS(tls.client_context(identity, psk), server_side=False)
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    error = None
    for _ in range(6):
        try:
            client.do_handshake()
        except TLSError as exc:
            error = exc
            break
        server.bio_write(client.data_to_send())
        with contextlib.suppress(SSL.Error):
            server.do_handshake()
        out = b""
        while True:
            try:
                out += server.bio_read(65536)
            except SSL.WantReadError:
                break
        if out:
            client.receive_data(out)
    assert isinstance(error, TLSError) and "certificate" in str(error)


def test_lookup_exception_is_reraised_not_printed(
    identity: bytes, psk: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    class LookupBroke(RuntimeError):
        pass

    def lookup(ident: bytes) -> bytes | None:
        raise LookupBroke("database down")

    r = memory_pair(tls.client_context(identity, psk), tls.server_context(lookup))
    assert isinstance(r.server_error, LookupBroke)
    assert isinstance(r.client_error, TLSError) and "internal_error" in str(r.client_error)
    out, err = capfd.readouterr()
    assert "database down" not in out + err and "Traceback" not in out + err


def test_lookup_returning_a_bad_key(identity: bytes) -> None:
    r = memory_pair(tls.client_context(identity, os.urandom(32)), tls.server_context(lambda i: b"short"))
    assert isinstance(r.server_error, InvalidKeyMaterial)
    assert "short" not in str(r.server_error)


def test_lookup_sees_the_identity_bytes(psk: bytes) -> None:
    seen: list[bytes] = []
    ident = bytes(range(256))[:100]  # arbitrary binary identity

    def lookup(i: bytes) -> bytes | None:
        seen.append(i)
        return psk if i == ident else None

    r = memory_pair(tls.client_context(ident, psk), tls.server_context(lookup))
    assert r.server is not None and r.server.psk_identity == ident
    assert seen == [ident]


def test_per_connection_psk(psk: bytes) -> None:
    """The hybrid handshake's route: one shared context per side, a fresh PSK bound per connection."""
    cctx = tls.client_context()
    sctx = tls.server_context()  # no lookup: only per-connection bindings are accepted
    for n in range(3):
        key, ident = os.urandom(32), f"conn-{n}".encode()
        r = memory_pair(cctx, sctx, client_psk=(ident, key), server_psk=(ident, key))
        assert r.client is not None and r.server is not None, (r.client_error, r.server_error)
        assert r.server.psk_identity == ident
    # A connection bound to another key fails, even though another connection used it.
    r = memory_pair(cctx, sctx, client_psk=(b"conn-0", os.urandom(32)), server_psk=(b"conn-0", psk))
    assert isinstance(r.server_error, PSKMismatch)
    # Binding after the handshake started is refused.
    with pytest.raises(LocalProtocolError):
        tls.bind_psk(r.client_tls.connection, b"late", psk)
    # A binding overrides the context lookup.
    sctx2 = tls.server_context({b"ctx-id": psk})
    r = memory_pair(tls.client_context(b"ctx-id", psk), sctx2, server_psk=(b"other", psk))
    assert isinstance(r.server_error, UnknownPSKIdentity)


def test_per_connection_lookup_consults_connection_state(psk: bytes) -> None:
    sctx = tls.server_context()
    server = tls.MemoryTLS(sctx, server_side=True)
    server.connection.set_app_data({"expected": b"peer-7", "key": psk})

    def lookup(ident: bytes) -> bytes | None:
        data = server.connection.get_app_data()
        return data["key"] if ident == data["expected"] else None

    tls.bind_psk_lookup(server.connection, lookup)
    client = tls.MemoryTLS(tls.client_context(b"peer-7", psk), server_side=False)
    for _ in range(6):
        client.do_handshake()
        server.do_handshake()
        pump(client, server)
    assert client.info is not None and server.info is not None
    assert server.info.psk_identity == b"peer-7"
    with pytest.raises(LocalProtocolError):
        tls.bind_psk_lookup(client.connection, lookup)


def test_client_without_psk_fails_with_configuration_error(psk: bytes) -> None:
    r = memory_pair(tls.client_context(), tls.server_context({b"x": psk}))
    assert isinstance(r.client_error, ConfigurationError) and r.client_error.field == "psk"


def test_exporter_and_channel_binding(identity: bytes, psk: bytes) -> None:
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    c, s = r.client_tls.connection, r.server_tls.connection
    cb_client, cb_server = tls.channel_binding(c), tls.channel_binding(s)
    assert cb_client == cb_server and len(cb_client) == 32
    assert cb_client == c.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    assert tls.export_keying_material(c, b"app", 48, b"ctx") == tls.export_keying_material(s, b"app", 48, b"ctx")
    assert tls.export_keying_material(c, b"app", 48, b"ctx") != tls.export_keying_material(c, b"app", 48)
    # A second connection with the same PSK has fresh DHE, hence a different binding.
    r2 = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    assert tls.channel_binding(r2.client_tls.connection) != cb_client
    with pytest.raises(ConfigurationError):
        tls.export_keying_material(c, b"app", 0)
    with pytest.raises(ConfigurationError):
        tls.export_keying_material(c, b"", 16)


def test_exporter_requires_verified_handshake(identity: bytes, psk: bytes) -> None:
    conn = SSL.Connection(tls.client_context(identity, psk), None)
    with pytest.raises(LocalProtocolError):
        tls.channel_binding(conn)


def test_tlsinfo_has_no_secrets_in_repr(identity: bytes, psk: bytes) -> None:
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    for text in (repr(r.client), repr(r.server), repr(tls.client_context(identity, psk))):
        assert psk.hex() not in text and repr(psk) not in text
    with pytest.raises(AttributeError):
        r.client.group = "x"  # type: ignore[misc, union-attr]


def test_wire_client_hello_offers_only_psk_dhe_ke_and_both_shares(identity: bytes, psk: bytes) -> None:
    clog, slog = MessageLog(), MessageLog()
    r = memory_pair(
        tls.client_context(identity, psk, message_callback=clog),
        tls.server_context({identity: psk}, message_callback=slog),
    )
    assert r.client is not None and r.server is not None
    ch = clog.hello(HS_CLIENT_HELLO, sent=True)
    assert ch.psk_modes() == [PSK_DHE_KE]
    assert ch.key_share_groups() == [GROUP_X25519MLKEM768, GROUP_X25519]
    assert ch.key_share_sizes() == [1216, 32]
    assert ch.psk_identities() == [identity]
    assert ch.extensions[-1][0] == EXT_PRE_SHARED_KEY  # RFC 8446: pre_shared_key comes last
    # The server saw the same ClientHello and answered with a hybrid key share (fresh DHE).
    assert slog.hello(HS_CLIENT_HELLO, sent=False).psk_modes() == [PSK_DHE_KE]
    sh = slog.hello(HS_SERVER_HELLO, sent=True)
    assert sh.key_share_groups() == [GROUP_X25519MLKEM768] and sh.key_share_sizes() == [1120]
    assert sh.ext(EXT_PRE_SHARED_KEY) == b"\x00\x00"  # selected_identity = 0
    assert HS_CERTIFICATE not in clog.types(sent=True) + clog.types(sent=False)


def test_server_never_chooses_psk_ke(identity: bytes, psk: bytes) -> None:
    """A client that also offers psk_ke (SSL_OP_ALLOW_NO_DHE_KEX) still gets (EC)DHE from our server."""
    clog, slog = MessageLog(), MessageLog()
    cctx = tls.client_context(identity, psk, message_callback=clog)
    cctx.set_options(1 << 10)  # SSL_OP_ALLOW_NO_DHE_KEX: the client now offers psk_ke too
    r = memory_pair(cctx, tls.server_context({identity: psk}, message_callback=slog))
    assert PSK_KE in clog.hello(HS_CLIENT_HELLO, sent=True).psk_modes()
    assert r.server is not None and r.server.group is not None
    assert slog.hello(HS_SERVER_HELLO, sent=True).ext(EXT_KEY_SHARE) is not None


def test_message_callback_exception_is_reraised(identity: bytes, psk: bytes) -> None:
    def observe(conn: SSL.Connection, sent: bool, content_type: int, data: bytes) -> None:
        raise KeyError("observer broke")

    r = memory_pair(tls.client_context(identity, psk, message_callback=observe), tls.server_context({identity: psk}))
    assert isinstance(r.client_error, KeyError)


def test_tickets_are_off_and_resumption_impossible(identity: bytes, psk: bytes) -> None:
    seen: list[bytes] = []

    def lookup(i: bytes) -> bytes | None:
        seen.append(i)
        return psk if i == identity else None

    sctx = tls.server_context(lookup)
    cctx = tls.client_context(identity, psk)
    r = memory_pair(cctx, sctx)
    assert r.client is not None
    # Let the client process whatever the server sent after the handshake (a useless stateful ticket).
    r.server_tls.send(b"x")
    pump(r.client_tls, r.server_tls)
    assert r.client_tls.recv() == b"x"
    old_session = r.client_tls.connection.get_session()
    assert old_session is not None
    # The client offers that session next to its PSK: the server ignores the ticket (its id reaches
    # the lookup and is unknown) and uses the external PSK.
    seen.clear()
    client = tls.MemoryTLS(cctx, server_side=False)
    client.connection.set_session(old_session)
    server = tls.MemoryTLS(sctx, server_side=True)
    assert _drive(client, server) == (None, None)
    assert server.info is not None and server.info.psk_identity == identity
    assert len(seen) == 2 and seen[1] == identity and seen[0] != identity
    # The session plus an identity the server does not know cannot get in: the ticket resumes nothing.
    seen.clear()
    resumer = tls.MemoryTLS(cctx, server_side=False)
    resumer.connection.set_session(old_session)
    tls.bind_psk(resumer.connection, b"not-known", os.urandom(32))
    errors = _drive(resumer, tls.MemoryTLS(sctx, server_side=True))
    assert isinstance(errors[1], UnknownPSKIdentity), errors
    assert b"not-known" in seen


def _drive(client: tls.MemoryTLS, server: tls.MemoryTLS) -> tuple[BaseException | None, BaseException | None]:
    errors: list[BaseException | None] = [None, None]
    for _ in range(8):
        for i, end in enumerate((client, server)):
            if errors[i] is None and end.info is None:
                try:
                    end.do_handshake()
                except HybridKEXError as exc:
                    errors[i] = exc
        if not pump(client, server):
            break
    return errors[0], errors[1]


def test_config_validation(identity: bytes, psk: bytes) -> None:
    with pytest.raises(InvalidKeyMaterial):
        tls.client_context(identity, b"0123456789abcde")  # 15 bytes
    with pytest.raises(InvalidKeyMaterial):
        tls.client_context(identity, os.urandom(513))
    with pytest.raises(InvalidKeyMaterial):
        tls.client_context(identity, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        tls.client_context(b"", psk)
    with pytest.raises(ConfigurationError):
        tls.client_context(b"x" * 1025, psk)
    with pytest.raises(ConfigurationError):
        tls.client_context(identity, None)
    with pytest.raises(ConfigurationError) as e:
        tls.client_context(identity, psk, suite="TLS_CHACHA20_POLY1305_SHA256")
    assert e.value.field == "suite"
    with pytest.raises(ConfigurationError):
        tls.client_context(identity, psk, suite="no-such-suite")
    with pytest.raises(ConfigurationError) as e:
        tls.server_context({}, groups="NoSuchGroup")
    assert e.value.field == "groups"
    with pytest.raises(ConfigurationError):
        tls.server_context({}, groups="")
    assert tls.client_context("ünïcode", psk) is not None  # str identities are UTF-8


def test_keylog_off_by_default_and_loud_when_on(
    identity: bytes, psk: bytes, tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    path = os.path.join(tmp_path, "keys.log")
    with caplog.at_level(logging.WARNING, logger="hybridkex.tls"), pytest.warns(tls.InsecureKeyLogWarning):
        cctx = tls.client_context(identity, psk, keylog=path)
    assert any("key logging is ON" in rec.getMessage() for rec in caplog.records)
    r = memory_pair(cctx, tls.server_context({identity: psk}))
    assert r.client is not None
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    labels = {line.split()[0] for line in lines}
    assert {b"CLIENT_HANDSHAKE_TRAFFIC_SECRET", b"SERVER_HANDSHAKE_TRAFFIC_SECRET",
            b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0", b"EXPORTER_SECRET"} <= labels
    client_random = r.client_tls.connection.client_random()
    assert all(line.split()[1] == client_random.hex().encode() for line in lines)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """What existed before the test is left out of its collections: a full collection in a worker
    that has run hundreds of tests walks its whole heap (seconds each, 40 times), while the garbage
    the test makes and checks (contexts, connections, their cffi callbacks) is all made after."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("frozen_heap")
def test_many_contexts_and_connections_survive_gc(psk: bytes) -> None:
    """cffi callbacks and buffers must live as long as their context: churn and collect."""
    for n in range(30):
        ident = f"id-{n}".encode()
        cctx, sctx = tls.client_context(ident, psk), tls.server_context({ident: psk}.get)
        conns = [SSL.Connection(cctx, None) for _ in range(5)]  # created and dropped unused
        del conns
        if n % 3 == 0:
            gc.collect()
            r = memory_pair(cctx, sctx)
            assert r.server is not None and r.server.psk_identity == ident, (r.client_error, r.server_error)
        del cctx, sctx
        gc.collect()
    # Contexts whose Python objects are gone while a connection still holds them.
    conns = []
    for n in range(20):
        ident = f"late-{n}".encode()
        c = tls.MemoryTLS(tls.client_context(ident, psk), server_side=False)
        s = tls.MemoryTLS(tls.server_context({ident: psk}), server_side=True)
        conns.append((c, s))
    gc.collect()
    for c, s in conns:
        for _ in range(6):
            c.do_handshake()
            s.do_handshake()
            pump(c, s)
        assert c.info is not None and s.info is not None


# ---------------------------------------------------------------------------------------------
# Blocking sockets on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def _listener() -> socket.socket:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    ls.settimeout(10)
    return ls


def test_wrap_socket_over_tcp(identity: bytes, psk: bytes) -> None:
    sctx = tls.server_context({identity: psk})
    with _listener() as ls:
        port = ls.getsockname()[1]

        def serve() -> tuple[tls.TLSInfo, bytes]:
            sock, _ = ls.accept()
            with sock:
                sock.settimeout(None)
                conn, info = tls.wrap_socket(sctx, sock, server_side=True, timeout=10)
                assert sock.gettimeout() is None  # restored
                data = conn.recv(100)
                conn.sendall(data[::-1])
                conn.shutdown()
                return info, tls.channel_binding(conn)

        server = Background(serve)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            conn, info = tls.wrap_socket(tls.client_context(identity, psk), sock, server_side=False, timeout=10)
            assert sock.gettimeout() == 10
            sock.settimeout(None)  # pyOpenSSL needs a blocking socket for plain recv()
            conn.sendall(b"hello")
            assert conn.recv(100) == b"olleh"
            binding = tls.channel_binding(conn)
        sinfo, sbinding = server.result()  # type: ignore[misc]
    assert info.group == sinfo.group == "X25519MLKEM768"
    assert binding == sbinding


def test_wrap_socket_errors_over_tcp(identity: bytes, psk: bytes) -> None:
    sctx = tls.server_context({identity: psk})
    with _listener() as ls:
        port = ls.getsockname()[1]

        def serve() -> BaseException | None:
            sock, _ = ls.accept()
            with sock:
                try:
                    tls.wrap_socket(sctx, sock, server_side=True, timeout=10)
                except HybridKEXError as exc:
                    return exc
            return None

        server = Background(serve)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, pytest.raises(PSKMismatch):
            tls.wrap_socket(tls.client_context(identity, os.urandom(32)), sock, server_side=False, timeout=10)
        assert isinstance(server.result(), PSKMismatch)


def test_handshake_timeout(identity: bytes, psk: bytes) -> None:
    with _listener() as ls, socket.create_connection(ls.getsockname(), timeout=10) as sock:
        silent, _ = ls.accept()  # accepts and never answers
        with silent, pytest.raises(HandshakeTimeout):
            tls.wrap_socket(tls.client_context(identity, psk), sock, server_side=False, timeout=0.3)


def test_peer_closing_mid_handshake(identity: bytes, psk: bytes) -> None:
    with _listener() as ls, socket.create_connection(ls.getsockname(), timeout=10) as sock:
        peer, _ = ls.accept()
        closer = threading.Timer(0.05, peer.close)
        closer.start()
        with pytest.raises(TLSError, match="closed"):
            tls.wrap_socket(tls.client_context(identity, psk), sock, server_side=False, timeout=10)
        closer.join()


def test_wrap_socket_role_misuse(identity: bytes, psk: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(LocalProtocolError):
            tls.wrap_socket(tls.client_context(identity, psk), a, server_side=True)
        with pytest.raises(LocalProtocolError):
            tls.wrap_socket(SSL.Context(SSL.TLS_METHOD), a, server_side=False)
        with pytest.raises(ConfigurationError):
            tls.wrap_socket(tls.client_context(identity, psk), a, server_side=False, timeout=0)


def test_verify_rejects_foreign_context() -> None:
    with pytest.raises(LocalProtocolError):
        tls.verify_connection(SSL.Connection(SSL.Context(SSL.TLS_METHOD), None))


def test_shared_contexts_across_threads() -> None:
    """Per-connection state stays per connection when threads share one context pair."""
    cctx, sctx = tls.client_context(), tls.server_context()
    failures: list[object] = []

    def worker(n: int) -> None:
        for i in range(15):
            ident, key = f"t{n}-c{i}".encode(), os.urandom(32)
            r = memory_pair(cctx, sctx, client_psk=(ident, key), server_psk=(ident, key))
            if r.server is None or r.server.psk_identity != ident or r.client is None:
                failures.append((ident, r.client_error, r.server_error))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_openssl_without_mlkem(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, identity: bytes, psk: bytes
) -> None:
    """An OpenSSL < 3.5 (no ML-KEM) rejects the hybrid group lists: simulate it at the one binding."""
    from hybridkex.tls import _shim

    real = _shim.set_groups

    def old_openssl(ctx: SSL.Context, groups: str) -> bool:
        return False if "MLKEM" in groups.upper() else real(ctx, groups)

    monkeypatch.setattr(_shim, "set_groups", old_openssl)
    with caplog.at_level(logging.WARNING, logger="hybridkex.tls"):
        cctx, sctx = tls.client_context(identity, psk), tls.server_context({identity: psk})
    assert any("falls back to X25519" in rec.getMessage() for rec in caplog.records)
    r = memory_pair(cctx, sctx)
    assert r.client is not None and r.client.group == "x25519"
    with pytest.raises(UnsupportedAlgorithm, match=r"OpenSSL >= 3\.5"):
        tls.server_context({identity: psk}, require_pq=True)
    with pytest.raises(ConfigurationError):
        tls.client_context(identity, psk, groups="X25519MLKEM768")  # explicit lists never fall back
