"""tlslite-ng, an independent TLS 1.3 stack, as a steady-state client.

tlslite-ng is pure Python (no OpenSSL) with TLS 1.3 external PSKs and X25519MLKEM768 (its ML-KEM is
kyber-py's).  Given a ticket's identity and PSK it completes a steady-state connection with the
hybridkex server: the identity is plain printable ASCII, the PSK a plain TLS 1.3 external PSK, and
the server's checks (tag, counter, QKD key, psk_dhe_ke with X25519MLKEM768) hold for a stack that
shares no code with ours.  Classical-only key exchange is refused, as with the OpenSSL 3.0 peers
in test_tls_steady_peers.py.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from iohelpers import make_setup, running_server
from test_tls_steady_peers import _steady_credentials

from hybridkex.io.connection import HybridSocket

tlslite = pytest.importorskip("tlslite", reason="tlslite-ng is in the [test] extra: pip install -e '.[test]'")

X25519MLKEM768 = 0x11EC  # the TLS group code point (draft-kwiatkowski-tls-ecdhe-mlkem)
WAIT = 30.0


def _settings(identity: str, psk: bytes, groups: list[str]) -> Any:
    s = tlslite.HandshakeSettings()
    s.pskConfigs = [(bytearray(identity.encode("ascii")), bytearray(psk), "sha256")]
    s.psk_modes = ["psk_dhe_ke"]
    s.keyShares = list(groups)
    s.eccCurves = list(groups)
    s.minVersion = s.maxVersion = (3, 4)  # TLS 1.3
    s.cipherNames = ["aes128gcm"]
    return s


class _Recorder:
    """An echo handler that keeps each connection's session facts (read on the server)."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, conn: HybridSocket, address: Any) -> None:
        with self._lock:
            self.sessions.append(conn.session)
        while data := conn.recv(65536):
            conn.sendall(data)


def test_tlslite_ng_completes_a_steady_state_connection_with_the_identity_and_psk() -> None:
    setup, handler = make_setup(), _Recorder()
    with running_server(setup, handler) as srv:
        identity, psk, client = _steady_credentials(setup, srv.server_address)
        stats = srv.steady_registry.stats if srv.steady_registry is not None else None
        assert stats is not None
        accepted = stats.accepted
        with socket.create_connection(srv.server_address, timeout=WAIT) as raw:
            conn = tlslite.TLSConnection(raw)
            conn.handshakeClientCert(settings=_settings(identity, psk, ["x25519mlkem768"]))
            assert conn.version == (3, 4) and conn.getCipherName() == "aes128gcm"
            assert conn.ecdhCurve == X25519MLKEM768  # psk_dhe_ke with the hybrid group
            conn.write(b"independent stack")
            assert conn.read(max=17, min=17) == b"independent stack"
            conn.close()
        assert stats.accepted == accepted + 1
        server_side = handler.sessions[-1]
        assert server_side.steady is not None and server_side.steady.index >= 1
        assert server_side.tls.group == "X25519MLKEM768"
        assert server_side.qkd_key_ids  # a fresh QKD key, as for our own client
        # The genuine client's ticket carries on (the counter tlslite-ng used is spent, not reused).
        with client.connect(srv.server_address) as sock:
            sock.sendall(b"z")
            assert sock.recv(1) == b"z" and sock.session.steady is not None
        assert handler.sessions[-1].steady.index > server_side.steady.index


def test_tlslite_ng_replaying_the_same_identity_is_refused() -> None:
    """The counter in the identity is single use: the same identity and PSK a second time fail."""
    setup = make_setup()
    with running_server(setup) as srv:
        identity, psk, _ = _steady_credentials(setup, srv.server_address)
        for attempt in range(2):
            with socket.create_connection(srv.server_address, timeout=WAIT) as raw:
                conn = tlslite.TLSConnection(raw)
                settings = _settings(identity, psk, ["x25519mlkem768"])
                if attempt == 0:
                    conn.handshakeClientCert(settings=settings)
                    conn.close()
                else:
                    with pytest.raises((tlslite.TLSRemoteAlert, tlslite.TLSAbruptCloseError)):
                        conn.handshakeClientCert(settings=settings)
        stats = srv.steady_registry.stats if srv.steady_registry is not None else None
        assert stats is not None and stats.replayed == 1


def test_tlslite_ng_with_classical_x25519_only_is_refused() -> None:
    """The steady state requires X25519MLKEM768: a classical-only key share fails closed."""
    setup = make_setup()
    with running_server(setup) as srv:
        identity, psk, _ = _steady_credentials(setup, srv.server_address)
        stats = srv.steady_registry.stats if srv.steady_registry is not None else None
        assert stats is not None
        accepted = stats.accepted
        with socket.create_connection(srv.server_address, timeout=WAIT) as raw:
            conn = tlslite.TLSConnection(raw)
            with pytest.raises((tlslite.TLSRemoteAlert, tlslite.TLSAbruptCloseError, tlslite.TLSLocalAlert)):
                conn.handshakeClientCert(settings=_settings(identity, psk, ["x25519"]))
        # The identity passed the steady-state checks (so its counter is spent): TLS refused the group.
        assert stats.accepted == accepted + 1
