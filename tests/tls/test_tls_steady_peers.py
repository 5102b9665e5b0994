"""Independent TLS stacks as steady-state peers.

A steady-state connection is plain TLS 1.3 with an external PSK: given the identity and PSK, any
stack can be the client.  The steady state requires X25519MLKEM768, and the independent stacks on
this machine (Python 3.13's ssl and the openssl tool, both OpenSSL 3.0) have no ML-KEM: the server
must refuse them, fail closed, rather than fall back to a classical-only key exchange.  (With an
OpenSSL >= 3.5 stack the same identity and PSK complete the handshake; docs/spec.md 12.10.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from iohelpers import make_setup, running_server
from test_tls_stdlib import _result, _spawn

from hybridkex.api import HybridClient
from hybridkex.steady import SteadyTicket

WAIT = 30.0


def _steady_credentials(setup: Any, address: tuple[str, int]) -> tuple[str, bytes, HybridClient]:
    client = HybridClient(setup.client, key_source=setup.client_keys)
    with client.connect(address) as sock:  # first contact: the full handshake makes the ticket
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    ticket = client.ticket_for(*address)
    assert isinstance(ticket, SteadyTicket)
    attempt = ticket.take()
    assert attempt is not None
    if attempt.request is not None:
        attempt.provide(setup.client_keys.get_keys(*_request_args(attempt.request)))
    identity, psk = attempt.credentials()
    assert identity.isascii() and identity.decode().isprintable()  # any stack can carry it
    return identity.decode(), psk, client


def _request_args(request: Any) -> tuple[str, int, int]:
    return request.slave_sae_id, request.number, request.size_bits


def test_python313_ssl_with_the_identity_and_psk_is_refused_without_x25519mlkem768(
        python313: str, caplog: pytest.LogCaptureFixture) -> None:
    setup = make_setup()
    with running_server(setup) as srv:
        identity, psk, client = _steady_credentials(setup, srv.server_address)
        result, _ = _result(_spawn(python313, "client", str(srv.server_address[1]), identity, psk.hex()))
        assert "error" in result and "info" not in result, result  # no session, no application data
        stats = srv.steady_registry.stats if srv.steady_registry is not None else None
        assert stats is not None and stats.accepted + stats.refused == 1  # it reached the steady-state checks
        # The genuine client carries on in the steady state.
        with client.connect(srv.server_address) as sock:
            sock.sendall(b"y")
            assert sock.recv(1) == b"y" and sock.session.steady is not None
    assert any("X25519MLKEM768" in r.getMessage() or "refused" in r.getMessage() for r in caplog.records)


def test_the_openssl_tool_with_the_identity_and_psk_is_refused_without_x25519mlkem768(openssl_cli: str) -> None:
    setup = make_setup()
    with running_server(setup) as srv:
        identity, psk, _ = _steady_credentials(setup, srv.server_address)
        proc = subprocess.run(
            [openssl_cli, "s_client", "-connect", f"127.0.0.1:{srv.server_address[1]}", "-tls1_3",
             "-psk_identity", identity, "-psk", psk.hex(), "-ciphersuites", "TLS_AES_128_GCM_SHA256",
             "-groups", "X25519", "-no_ign_eof"],
            input=b"", capture_output=True, timeout=WAIT, check=False)
        text = (proc.stdout + proc.stderr).decode(errors="replace")
        assert proc.returncode != 0 or "Cipher is (NONE)" in text, text
        assert "handshake failure" in text or "alert" in text, text
    assert Path(openssl_cli).name.startswith("openssl")
