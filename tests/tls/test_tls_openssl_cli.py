"""Interop with the system `openssl` command-line tool (OpenSSL 3.0: no ML-KEM, legacy PSK callbacks)
as an independent peer, over real TCP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from tlshelpers import (
    GROUP_X25519,
    GROUP_X25519MLKEM768,
    HS_CLIENT_HELLO,
    HS_SERVER_HELLO,
    PSK_DHE_KE,
    MessageLog,
    finish,
    openssl_server,
    parse_hello,
    recv_line,
)

from hybridkex import CombinedSecret, get_suite, tls
from hybridkex.exceptions import (
    HybridKEXError,
    InvalidKeyMaterial,
    PSKHashMismatch,
    PSKMismatch,
    PSKRejected,
    TLSError,
    UnknownPSKIdentity,
)
from hybridkex.io.reconnect import reconnect_identity, reconnect_psk

IDENTITY = b"client1"
ROOT = Path(__file__).resolve().parents[2]
TLS_MD = ROOT / "docs" / "tls.md"
KEYMAT = ["-keymatexport", "EXPORTER-Channel-Binding", "-keymatexportlen", "32"]


def _keying_material(output: str) -> bytes:
    m = re.search(r"Keying material: ([0-9A-F]+)", output)
    assert m, f"no keying material in openssl output: {output[-1500:]}"
    return bytes.fromhex(m.group(1))


def _s_client(openssl_cli: str, port: int, key: bytes, identity: bytes, *extra: str,
              shell_line: bool = False) -> subprocess.Popen[bytes]:
    cmd = [
        openssl_cli, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ign_eof",
        "-psk", key.hex(), "-psk_identity", identity.decode(), *KEYMAT, *extra,
    ]
    if shell_line:  # as a user would type it: unquoted, so the identity must be shell-safe text
        return subprocess.Popen("exec " + " ".join(cmd), shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _serve_one(sctx: SSL.Context, openssl_cli: str, key: bytes, identity: bytes, *extra: str,
               request: bytes = b"hello from openssl\n", shell_line: bool = False) -> tuple[dict[str, Any], str]:
    """Accept one `openssl s_client` connection with our server context; echo one line upper-cased."""
    result: dict[str, Any] = {}
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        ls.settimeout(15)
        proc = _s_client(openssl_cli, ls.getsockname()[1], key, identity, *extra, shell_line=shell_line)
        try:
            assert proc.stdin is not None
            proc.stdin.write(request)  # read by s_client after its handshake
            proc.stdin.close()
            sock, _ = ls.accept()
            with sock:
                try:
                    conn, info = tls.wrap_socket(sctx, sock, server_side=True, timeout=15)
                except HybridKEXError as exc:
                    result["error"] = exc
                else:
                    sock.settimeout(None)
                    result["info"] = info
                    result["binding"] = tls.channel_binding(conn)
                    line = recv_line(conn)
                    result["received"] = line
                    conn.sendall(line.upper())
                    conn.shutdown()
            output = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    result["returncode"] = proc.returncode
    return result, output


def test_s_client_against_our_server(openssl_cli: str, psk: bytes) -> None:
    log = MessageLog()
    sctx = tls.server_context({IDENTITY: psk}, message_callback=log)
    result, output = _serve_one(sctx, openssl_cli, psk, IDENTITY, "-msg")
    assert "error" not in result, result
    info = result["info"]
    # OpenSSL 3.0 has no ML-KEM: the hybrid-preferring server falls back to X25519.
    assert info.version == "TLSv1.3" and info.group == "x25519" and info.psk_identity == IDENTITY
    assert info.cipher == "TLS_AES_128_GCM_SHA256"
    # Data both ways.
    assert result["received"] == b"hello from openssl\n"
    assert "HELLO FROM OPENSSL" in output
    # psk_dhe_ke: the ClientHello offers only psk_dhe_ke, our ServerHello carries a fresh key share.
    ch = log.hello(HS_CLIENT_HELLO, sent=False)
    assert ch.psk_modes() == [PSK_DHE_KE]
    assert ch.psk_identities() == [IDENTITY]
    sh = log.hello(HS_SERVER_HELLO, sent=True)
    assert sh.key_share_groups() == [GROUP_X25519] and sh.key_share_sizes() == [32]
    # As s_client saw it: X25519 (EC)DHE, no certificate message, no peer certificate.
    assert "Server Temp Key: X25519" in output
    assert "no peer certificate available" in output
    assert ", ServerHello" in output and ", Finished" in output
    assert not re.search(r", Certificate\b", output)
    # RFC 9266 tls-exporter agrees with openssl's -keymatexport.
    assert _keying_material(output) == result["binding"]


def test_s_client_wrong_key(openssl_cli: str, psk: bytes) -> None:
    result, _ = _serve_one(tls.server_context({IDENTITY: psk}), openssl_cli, os.urandom(32), IDENTITY)
    assert isinstance(result["error"], PSKMismatch), result
    assert result["returncode"] != 0


def test_s_client_unknown_identity(openssl_cli: str, psk: bytes) -> None:
    result, output = _serve_one(tls.server_context({IDENTITY: psk}), openssl_cli, psk, b"stranger")
    assert isinstance(result["error"], UnknownPSKIdentity), result
    assert "handshake failure" in output


def test_s_client_against_require_pq_server_fails_cleanly(openssl_cli: str, psk: bytes) -> None:
    result, output = _serve_one(tls.server_context({IDENTITY: psk}, require_pq=True), openssl_cli, psk, IDENTITY)
    err = result["error"]
    assert type(err) is TLSError and "X25519MLKEM768" in str(err), err
    assert result["returncode"] != 0 and "handshake failure" in output


def test_s_client_against_sha384_server(openssl_cli: str, psk: bytes) -> None:
    """`openssl s_client -psk` uses the legacy callback, which is SHA-256 only."""
    sctx = tls.server_context({IDENTITY: psk}, suite="TLS_AES_256_GCM_SHA384")
    result, _ = _serve_one(sctx, openssl_cli, psk, IDENTITY)
    assert isinstance(result["error"], PSKHashMismatch), result


def test_our_client_against_s_server(openssl_cli: str, psk: bytes) -> None:
    log = MessageLog()
    cctx = tls.client_context(IDENTITY, psk, message_callback=log)
    args = ["-psk", psk.hex(), "-psk_identity", IDENTITY.decode(), *KEYMAT]
    with openssl_server(args) as (proc, port), socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        conn, info = tls.wrap_socket(cctx, sock, server_side=False, timeout=15)
        sock.settimeout(None)
        assert info.group == "x25519" and info.cipher == "TLS_AES_128_GCM_SHA256"
        binding = tls.channel_binding(conn)
        conn.sendall(b"ping from hybridkex\n")
        assert proc.stdin is not None
        proc.stdin.write(b"pong from openssl\n")
        proc.stdin.flush()
        assert recv_line(conn) == b"pong from openssl\n"
        conn.shutdown()
        sock.close()
        output = finish(proc)
    assert "ping from hybridkex" in output
    assert _keying_material(output) == binding
    assert "CIPHER is TLS_AES_128_GCM_SHA256" in output and "Shared groups: x25519" in output
    assert "Client certificate" not in output
    # Both key shares offered, so a classical-only server answers at once: no HelloRetryRequest.
    ch = log.hello(HS_CLIENT_HELLO, sent=True)
    assert ch.psk_modes() == [PSK_DHE_KE]
    assert ch.key_share_groups() == [GROUP_X25519MLKEM768, GROUP_X25519]
    server_hellos = [m for m in log.received if m[0] == HS_SERVER_HELLO]
    assert len(server_hellos) == 1
    sh = log.hello(HS_SERVER_HELLO, sent=False)
    assert not sh.retry_request and sh.key_share_groups() == [GROUP_X25519]
    assert log.types(sent=True).count(HS_CLIENT_HELLO) == 1


@pytest.mark.parametrize(
    ("identity", "key_ok", "expected"),
    [(IDENTITY, False, PSKMismatch), (b"stranger", True, PSKRejected)],
    ids=["wrong-key", "unknown-identity"],
)
def test_our_client_errors_against_s_server(
    openssl_cli: str, psk: bytes, identity: bytes, key_ok: bool, expected: type[Exception]
) -> None:
    cctx = tls.client_context(identity, psk if key_ok else os.urandom(32))
    args = ["-psk", psk.hex(), "-psk_identity", IDENTITY.decode()]
    with openssl_server(args) as (proc, port), socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        with pytest.raises(expected):
            tls.wrap_socket(cctx, sock, server_side=False, timeout=15)
        sock.close()
        finish(proc)


def test_require_pq_client_against_s_server_fails_cleanly(openssl_cli: str, psk: bytes) -> None:
    cctx = tls.client_context(IDENTITY, psk, require_pq=True)
    args = ["-psk", psk.hex(), "-psk_identity", IDENTITY.decode()]
    with openssl_server(args) as (proc, port), socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        with pytest.raises(TLSError):
            tls.wrap_socket(cctx, sock, server_side=False, timeout=15)
        sock.close()
        output = finish(proc)
    assert "no suitable key share" in output


def test_s_client_cannot_resume_with_the_ticket(openssl_cli: str, psk: bytes, tmp_path: Any) -> None:
    """Tickets are off: the session s_client saves resumes nothing, so every connection needs the PSK."""
    sess = str(tmp_path / "session.pem")
    log = MessageLog()
    sctx = tls.server_context({IDENTITY: psk}, message_callback=log)
    first, _ = _serve_one(sctx, openssl_cli, psk, IDENTITY, "-sess_out", sess)
    assert "info" in first, first
    assert os.path.getsize(sess) > 0  # s_client did store a session
    # Offer only the saved session (an identity we never configured): refused.
    second, _ = _serve_one(sctx, openssl_cli, os.urandom(32), b"not-a-client", "-sess_in", sess)
    assert isinstance(second["error"], UnknownPSKIdentity), second
    assert second["returncode"] != 0
    hellos = [parse_hello(m) for m in log.received if m[0] == HS_CLIENT_HELLO]
    assert len(hellos) == 2
    offered = hellos[1].psk_identities()
    assert len(offered) == 2 and offered[1] == b"not-a-client"  # the ticket was offered, and refused


# --- identities as hybridkex derives them (issue 12, item 1) -------------------------------------------

#: Under 0.1.0 the raw identity derived from this seed contained a 0x00 byte (a1 0b ... 80 00 32 ...).
NUL_SEED = b"hybridkex issue 12 seed 45"


def _derived() -> list[tuple[str, bytes, bytes]]:
    secret = CombinedSecret(get_suite("x25519-mlkem768-qkd-hkdfsha256"), hashlib.sha256(NUL_SEED).digest())
    return [("full handshake", secret.tls_identity(), secret.tls_psk()),
            ("reconnect", reconnect_identity(secret, 1), reconnect_psk(secret, 1))]


@pytest.mark.parametrize(("kind", "identity", "psk"), _derived(), ids=["full-handshake", "reconnect"])
def test_s_client_line_with_a_derived_identity(openssl_cli: str, kind: str, identity: bytes, psk: bytes) -> None:
    sctx = tls.server_context({identity: psk})
    result, output = _serve_one(sctx, openssl_cli, psk, identity, shell_line=True)
    assert "error" not in result, (kind, result, output[-800:])
    assert result["info"].psk_identity == identity and result["received"] == b"hello from openssl\n"
    assert "HELLO FROM OPENSSL" in output
    assert _keying_material(output) == result["binding"]


def _exchange(conn: SSL.Connection, sock: socket.socket, proc: subprocess.Popen[bytes], line: bytes) -> None:
    """One line each way with `openssl s_server`, so nothing is unread when the socket closes (a close
    with unread data sends RST, which can discard our line before s_server prints it)."""
    sock.settimeout(None)
    conn.sendall(line)
    assert proc.stdin is not None
    proc.stdin.write(b"pong from openssl\n")
    proc.stdin.flush()
    assert recv_line(conn) == b"pong from openssl\n"
    conn.shutdown()


@pytest.mark.parametrize(("kind", "identity", "psk"), _derived(), ids=["full-handshake", "reconnect"])
def test_our_client_with_a_derived_identity_against_s_server(openssl_cli: str, kind: str, identity: bytes,
                                                             psk: bytes) -> None:
    args = ["-psk", psk.hex(), "-psk_identity", identity.decode()]
    with openssl_server(args) as (proc, port), socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        conn, info = tls.wrap_socket(tls.client_context(identity, psk), sock, server_side=False, timeout=15)
        assert info.psk_identity == identity, kind
        _exchange(conn, sock, proc, b"ping from hybridkex\n")
        sock.close()
        output = finish(proc)
    assert "ping from hybridkex" in output


# --- SHA-384 PSKs: the openssl tool needs a session file (-psk binds the key to SHA-256) ----------------


def _sha384_derived() -> tuple[bytes, bytes]:
    secret = CombinedSecret(get_suite("x25519-mlkem1024-qkd-hkdfsha384"), hashlib.sha384(NUL_SEED).digest())
    return secret.tls_identity(), secret.tls_psk()


def _tls_md_line(start: str) -> str:
    """The one indented command line of docs/tls.md that starts with ``start``."""
    lines = [ln.strip() for ln in TLS_MD.read_text(encoding="utf-8").splitlines() if ln.startswith("    " + start)]
    assert len(lines) == 1, (start, lines)
    return lines[0]


def test_s_client_psk_session_line_with_a_sha384_psk(openssl_cli: str, tmp_path: Any) -> None:
    """docs/tls.md's two lines, run as written: the session file from python, then s_client."""
    identity, psk = _sha384_derived()
    make_pem = _tls_md_line("python -c").replace("python", shlex.quote(sys.executable), 1)
    subprocess.run(make_pem.replace("HEXKEY", psk.hex()), shell=True, cwd=tmp_path, check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (tmp_path / "psk.pem").read_text() == tls.psk_session_pem(psk, "TLS_AES_256_GCM_SHA384")
    sctx = tls.server_context({identity: psk}, suite="TLS_AES_256_GCM_SHA384")
    result: dict[str, Any] = {}
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        ls.settimeout(15)
        line = (_tls_md_line("openssl s_client -connect 127.0.0.1:PORT -tls1_3 -psk_session")
                .replace("openssl", shlex.quote(openssl_cli), 1).replace("PORT", str(ls.getsockname()[1]))
                .replace(" ID", " " + identity.decode()))
        proc = subprocess.Popen(f"exec {line} -ign_eof", shell=True, cwd=tmp_path, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"sha384 ping\n")
            proc.stdin.close()
            sock, _ = ls.accept()
            with sock:
                conn, result["info"] = tls.wrap_socket(sctx, sock, server_side=True, timeout=15)
                sock.settimeout(None)
                result["received"] = recv_line(conn)
                conn.sendall(b"SHA384 PONG\n")
                conn.shutdown()
            output = finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    assert result["info"].cipher == "TLS_AES_256_GCM_SHA384" and result["info"].psk_identity == identity
    assert result["received"] == b"sha384 ping\n" and "SHA384 PONG" in output
    assert "Cipher is TLS_AES_256_GCM_SHA384" in output


def test_our_sha384_client_against_s_server_psk_session(openssl_cli: str, tmp_path: Any) -> None:
    identity, psk = _sha384_derived()
    session = tmp_path / "psk.pem"
    session.write_text(tls.psk_session_pem(psk, "TLS_AES_256_GCM_SHA384"))
    cctx = tls.client_context(identity, psk, suite="TLS_AES_256_GCM_SHA384")
    args = ["-psk_session", str(session), "-psk_identity", identity.decode()]
    with openssl_server(args) as (proc, port), socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        conn, info = tls.wrap_socket(cctx, sock, server_side=False, timeout=15)
        assert info.cipher == "TLS_AES_256_GCM_SHA384" and info.psk_identity == identity
        _exchange(conn, sock, proc, b"ping over sha384\n")
        sock.close()
        output = finish(proc)
    assert "ping over sha384" in output and "TLS_AES_256_GCM_SHA384" in output


def test_psk_session_pem_is_what_openssl_reads(openssl_cli: str) -> None:
    psk = bytes(range(48))
    pem = tls.psk_session_pem(psk, "x25519-mlkem1024-qkd-hkdfsha384")
    out = subprocess.run([openssl_cli, "sess_id", "-text", "-noout"], input=pem.encode(), capture_output=True,
                         check=True, timeout=15).stdout.decode()
    assert "Protocol  : TLSv1.3" in out and "Cipher    : TLS_AES_256_GCM_SHA384" in out
    assert psk.hex().upper() in out.replace(" ", "")
    with pytest.raises(InvalidKeyMaterial):
        tls.psk_session_pem(b"short", "TLS_AES_256_GCM_SHA384")
