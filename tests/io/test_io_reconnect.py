"""Zero-extra-round-trip reconnects: straight to TLS with per-connection PSKs derived from the
parent hybrid session; single use, bounded in count and time, X25519MLKEM768 only, off by default."""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import socket
import threading
import types
from typing import Any

import pytest
from iohelpers import CLIENT_ID, WAIT, RecordingProxy, echo_once, make_setup, recording_handler, running_server

import hybridkex
from hybridkex import CombinedSecret, PSKRejected, RemoteProtocolError, TLSError, get_suite
from hybridkex import tls as hktls
from hybridkex.api import HybridClient, ReconnectPolicy, ReconnectRegistry, ReconnectTicket
from hybridkex.io.reconnect import (
    IDENTITY_LEN,
    client_hello_cipher,
    reconnect_identity,
    reconnect_psk,
    session_handle,
    tls_record_length,
)
from hybridkex.steady import SteadyTicket

ON = ReconnectPolicy(enabled=True, max_uses=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now




def test_reconnects_skip_the_hybrid_exchange() -> None:
    setup = make_setup(reconnect=ON)
    log: queue.Queue[Any] = queue.Queue()
    with running_server(setup, recording_handler(log)) as srv, RecordingProxy(srv.server_address) as proxy:
        with hybridkex.connect(proxy.address, setup.client, key_source=setup.client_keys) as first:
            assert echo_once(first) == b"ping"
            ticket = first.reconnect_ticket
            bindings = {first.channel_binding()}
        assert isinstance(ticket, ReconnectTicket) and ticket.remaining == 5
        parent = log.get(timeout=WAIT)
        assert not parent.reconnect
        stock = setup.link.stock()
        for i in range(1, 6):
            # No key source: a reconnect cannot ask the KME for anything.
            with hybridkex.connect(proxy.address, setup.client, ticket=ticket) as sock:
                assert echo_once(sock, b"again %d" % i) == b"again %d" % i
                s = sock.session
                assert s.reconnect and s.reconnect_index == i
                assert s.group == "X25519MLKEM768" and s.post_quantum_tls  # a fresh PQ secret from TLS
                assert s.info.transcript_hash == parent.info.transcript_hash  # the parent's facts
                assert f"reconnect #{i}" in s.summary() and sock.reconnect_ticket is None
                bindings.add(sock.channel_binding())
            srv_side = log.get(timeout=WAIT)
            assert srv_side.reconnect and srv_side.reconnect_index == i and srv_side.peer_identity == CLIENT_ID
            assert len(srv_side.tls.psk_identity) == IDENTITY_LEN
        assert setup.link.stock() == stock  # no QKD key was taken for any reconnect
        assert len(bindings) == 6  # every connection has its own keys
        assert not ticket.usable and ticket.take() is None
        # The demultiplexing byte: "H" (0x48) opens a hybrid Hello, 0x16 a TLS handshake record.
        assert proxy.first_bytes == [0x48] + [0x16] * 5
        assert srv.reconnect_registry is not None and srv.reconnect_registry.stats.accepted == 5
        assert len(srv.reconnect_registry) == 0  # a used-up parent is forgotten (and erased)


def test_replayed_reconnect_identity_is_refused(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup(reconnect=ON)
    with running_server(setup) as srv, RecordingProxy(srv.server_address) as proxy:
        first = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        ticket = first.reconnect_ticket
        first.close()
        with hybridkex.connect(proxy.address, setup.client, ticket=ticket) as sock:
            assert echo_once(sock) == b"ping"
        client_hello = proxy.client_flights[0]
        assert client_hello[0] == 0x16
        # An attacker replays the recorded ClientHello verbatim: the identity was spent.
        with socket.create_connection(srv.server_address, timeout=WAIT) as raw:
            raw.sendall(client_hello)
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        assert answer[:1] == b"\x15"  # a TLS alert, then the server closed
        registry = srv.reconnect_registry
        assert registry is not None and registry.stats.replayed == 1 and registry.stats.accepted == 1
        # The ticket's next identity still works.
        with hybridkex.connect(srv.server_address, setup.client, ticket=ticket) as sock:
            assert sock.session.reconnect_index == 2
    messages = [r.getMessage() for r in server_log.records]
    assert any("already used (replay)" in m for m in messages)
    assert any("rejected connection" in m and "UnknownPSKIdentity" in m for m in messages)


def test_expiry_by_count() -> None:
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True, max_uses=5),
                       server_reconnect=ReconnectPolicy(enabled=True, max_uses=2))
    with running_server(setup) as srv:
        first = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        ticket = first.reconnect_ticket
        first.close()
        for _ in range(2):
            hybridkex.connect(srv.server_address, setup.client, ticket=ticket).close()
        assert ticket is not None and ticket.remaining == 3  # the client allows more than the server
        with pytest.raises(PSKRejected):
            hybridkex.connect(srv.server_address, setup.client, ticket=ticket)
        # HybridClient falls back to a full handshake when the server refuses.
        client = HybridClient(setup.client, key_source=setup.client_keys)
        kinds = []
        for _ in range(5):
            with client.connect(srv.server_address) as sock:
                assert echo_once(sock) == b"ping"
                kinds.append(sock.session.reconnect_index)
        assert kinds == [None, 1, 2, None, 1]
        assert (client.full_handshakes, client.reconnects) == (2, 3)
        client.close()
        assert client.ticket_for(*srv.server_address) is None


def test_expiry_by_time() -> None:
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True, max_uses=10, lifetime=60))
    clock = FakeClock()
    registry = ReconnectRegistry(setup.server.reconnect, clock=clock)
    with running_server(setup, reconnect_registry=registry) as srv:
        first = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        ticket = first.reconnect_ticket
        first.close()
        hybridkex.connect(srv.server_address, setup.client, ticket=ticket).close()
        clock.now += 61
        with pytest.raises(PSKRejected):
            hybridkex.connect(srv.server_address, setup.client, ticket=ticket)
        assert registry.stats.expired == 1 and len(registry) == 0
    # The client's ticket expires on its own clock too; connect() then runs a full handshake.
    client_clock = FakeClock()
    secret = CombinedSecret(get_suite("x25519-mlkem768-qkd-hkdfsha256"), os.urandom(32))
    t = ReconnectTicket(secret, types.SimpleNamespace(peer_identity="p", suite="s"),  # type: ignore[arg-type]
                        ReconnectPolicy(enabled=True, lifetime=10), clock=client_clock)
    assert t.usable and t.expires_in == 10
    client_clock.now += 10
    assert not t.usable and t.take() is None and t.expires_in == 0
    with pytest.raises(hybridkex.AlreadyFinalized):
        secret.derive(b"x", 16)  # the expired ticket erased the parent secret


def test_reconnects_refused_when_off(server_log: pytest.LogCaptureFixture) -> None:
    # Client on, server off: the client holds a ticket, the server knows no parent.
    setup = make_setup(reconnect=ON, server_reconnect=ReconnectPolicy(enabled=False))
    with running_server(setup) as srv:
        assert srv.reconnect_registry is None
        first = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        ticket = first.reconnect_ticket
        first.close()
        assert ticket is not None
        with pytest.raises(PSKRejected):
            hybridkex.connect(srv.server_address, setup.client, ticket=ticket)
    assert any("UnknownPSKIdentity" in r.getMessage() for r in server_log.records)
    # Off by default on the client: no reconnect ticket (the default steady state's ticket instead).
    default = make_setup()
    with running_server(default) as srv, \
            hybridkex.connect(srv.server_address, default.client, key_source=default.client_keys) as sock:
        assert isinstance(sock.reconnect_ticket, SteadyTicket)


def test_reconnects_must_use_x25519mlkem768(server_log: pytest.LogCaptureFixture) -> None:
    """A holder of a valid reconnect key offering only classical X25519 is refused: every reconnect
    gets a fresh post-quantum secret from TLS."""
    setup = make_setup(reconnect=ON)
    with running_server(setup) as srv:
        first = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        ticket = first.reconnect_ticket
        first.close()
        assert ticket is not None
        key = ticket.take()
        assert key is not None
        ctx = hktls.client_context(suite=key.cipher, groups="X25519")
        with socket.create_connection(srv.server_address, timeout=WAIT) as raw, pytest.raises(TLSError):
            hktls.wrap_socket(ctx, raw, server_side=False, psk=(key.identity, key.psk), timeout=WAIT)
        # The same key with the hybrid group would have worked, but it was spent by that attempt.
        with socket.create_connection(srv.server_address, timeout=WAIT) as raw, pytest.raises(PSKRejected):
            hktls.wrap_socket(hktls.client_context(suite=key.cipher, require_pq=True), raw, server_side=False,
                              psk=(key.identity, key.psk), timeout=WAIT)
    assert any("key-exchange group" in r.getMessage() for r in server_log.records)


def test_sha384_parent_suite() -> None:
    """The server reads the ClientHello's cipher list to bind the PSK to the parent's hash."""
    setup = make_setup(reconnect=ON, suites=("x25519-mlkem1024-qkd-hkdfsha384",))
    with running_server(setup) as srv:
        first = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        assert first.session.cipher == "TLS_AES_256_GCM_SHA384"
        ticket = first.reconnect_ticket
        first.close()
        with hybridkex.connect(srv.server_address, setup.client, ticket=ticket) as sock:
            assert echo_once(sock) == b"ping"
            assert sock.session.reconnect and sock.session.cipher == "TLS_AES_256_GCM_SHA384"
            assert sock.session.suite == "x25519-mlkem1024-qkd-hkdfsha384"


def test_concurrent_reconnects_from_one_ticket() -> None:
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True, max_uses=8))
    with running_server(setup) as srv:
        first = hybridkex.connect(srv.server_address, setup.client, key_source=setup.client_keys)
        ticket = first.reconnect_ticket
        first.close()
        results: queue.Queue[Any] = queue.Queue()

        def worker() -> None:
            try:
                with hybridkex.connect(srv.server_address, setup.client, ticket=ticket) as sock:
                    results.put((sock.session.reconnect_index, echo_once(sock)))
            except BaseException as exc:  # reported below
                results.put(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        got = [results.get_nowait() for _ in range(8)]
        assert sorted(i for i, _ in got) == list(range(1, 9)) and {e for _, e in got} == {b"ping"}


def test_asyncio_reconnects_with_hybrid_client() -> None:
    setup = make_setup(reconnect=ON)

    async def main() -> list[Any]:
        async def echo(reader: Any, writer: Any) -> None:
            writer.write(b"%d" % (writer.session.reconnect_index or 0))
            await writer.drain()
            await writer.aclose()

        server = await hybridkex.start_server(echo, "127.0.0.1", 0, setup.server, key_source=setup.server_keys)
        port = server.sockets[0].getsockname()[1]
        client = HybridClient(setup.client, key_source=setup.client_keys)
        seen = []
        for _ in range(4):
            reader, writer = await client.open_connection("127.0.0.1", port)
            seen.append((await reader.read(), writer.session.reconnect, writer.session.group))
            await writer.aclose()
        # A blocking connection with the ticket the asyncio path stored: same registry, index 4.
        ticket = client.ticket_for("127.0.0.1", port)

        def blocking() -> bytes:
            with hybridkex.connect(("127.0.0.1", port), setup.client, ticket=ticket) as s:
                return s.recv(10)

        seen.append(await asyncio.to_thread(blocking))
        server.close()
        await server.wait_closed()
        return seen

    seen = asyncio.run(main())
    assert seen[:4] == [(b"0", False, "X25519MLKEM768"), (b"1", True, "X25519MLKEM768"),
                        (b"2", True, "X25519MLKEM768"), (b"3", True, "X25519MLKEM768")]
    assert seen[4] == b"4"


# --- units: identities, registry, ticket, ClientHello parsing -----------------------------------------


class _Info:
    peer_identity = "peer"
    suite = "x25519-mlkem768-qkd-hkdfsha256"


def erased(secret: CombinedSecret) -> bool:
    try:
        secret.derive(b"probe", 16)
    except hybridkex.AlreadyFinalized:
        return True
    return False


def _secret() -> CombinedSecret:
    return CombinedSecret(get_suite("x25519-mlkem768-qkd-hkdfsha256"), os.urandom(32))


def test_registry_checks_the_tag_before_spending_a_counter() -> None:
    registry = ReconnectRegistry(ReconnectPolicy(enabled=True, max_uses=3))
    secret = _secret()
    ids = {i: reconnect_identity(secret, i) for i in range(1, 5)}
    psk1 = reconnect_psk(secret, 1)
    registry.register(secret, _Info())  # type: ignore[arg-type]
    good = ids[1]
    forged = good[:-1] + bytes([good[-1] ^ 1])
    cipher = "TLS_AES_128_GCM_SHA256"
    assert registry.lookup(forged, cipher) is None  # an observer who saw the handle cannot burn #1
    assert registry.lookup(good, "TLS_AES_256_GCM_SHA384") is None  # wrong hash for this parent
    assert registry.lookup(ids[4], cipher) is None  # beyond max_uses
    assert registry.lookup(b"short", cipher) is None
    match = registry.lookup(good, cipher)
    assert match is not None and match.index == 1 and match.psk == psk1
    assert registry.lookup(good, cipher) is None and registry.stats.replayed == 1
    # Out of order is fine, each once.
    assert registry.lookup(ids[3], cipher) is not None
    assert registry.lookup(ids[2], cipher) is not None
    assert len(registry) == 0 and erased(secret)  # used up: forgotten and erased


def test_registry_is_bounded() -> None:
    registry = ReconnectRegistry(ReconnectPolicy(enabled=True, max_sessions=3))
    secrets = [_secret() for _ in range(5)]
    handles = [session_handle(s) for s in secrets]
    for s in secrets:
        registry.register(s, _Info())  # type: ignore[arg-type]
    assert len(registry) == 3 and registry.stats.evicted == 2
    assert erased(secrets[0]) and erased(secrets[1]) and not erased(secrets[4])
    registry.discard(handles[4])
    assert erased(secrets[4]) and len(registry) == 2
    registry.clear()
    assert len(registry) == 0 and all(erased(s) for s in secrets)


def test_ticket_hygiene() -> None:
    secret = _secret()
    ticket = ReconnectTicket(secret, _Info(), ReconnectPolicy(enabled=True, max_uses=2))  # type: ignore[arg-type]
    key = ticket.take()
    assert key is not None and key.index == 1
    text = repr(ticket) + repr(key)
    assert key.psk.hex() not in text and "psk" not in repr(key).replace("reconnect", "")
    with pytest.raises(TypeError):
        pickle.dumps(ticket)
    assert ticket.take() is not None and ticket.take() is None
    assert erased(secret)  # erased once used up


def _client_hello(ciphers: bytes, sid: bytes = b"") -> bytes:
    body = (b"\x03\x03" + os.urandom(32) + bytes([len(sid)]) + sid + len(ciphers).to_bytes(2, "big") + ciphers
            + b"\x01\x00")
    return b"\x01" + len(body).to_bytes(3, "big") + body


def test_client_hello_cipher_parsing() -> None:
    assert client_hello_cipher(_client_hello(b"\x13\x02")) == "TLS_AES_256_GCM_SHA384"
    assert client_hello_cipher(_client_hello(b"\x13\x03\x13\x01\x13\x02", os.urandom(32))) == "TLS_AES_128_GCM_SHA256"
    with pytest.raises(TLSError):
        client_hello_cipher(_client_hello(b"\x13\x03"))  # only ChaCha20: no PSK is bound to it here
    for bad in (b"\x02" + _client_hello(b"\x13\x01")[1:], _client_hello(b"\x13\x01")[:40],
                _client_hello(b"\x13\x01\x13"), _client_hello(b"\x13\x01", b"x" * 33)):
        with pytest.raises(RemoteProtocolError):
            client_hello_cipher(bad)
    assert tls_record_length(b"\x16\x03\x01\x02\x00") == 512
    for header in (b"\x17\x03\x03\x00\x10", b"\x16\x02\x00\x00\x10", b"\x16\x03\x01\x40\x01", b"\x16\x03\x01\x00\x00"):
        with pytest.raises(RemoteProtocolError):
            tls_record_length(header)
