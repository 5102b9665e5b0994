"""The stdlib ssl adapter: refused below Python 3.13 here, exercised under python3.13 in a subprocess
(PYTHONPATH = the source tree) against our pyOpenSSL contexts over TCP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from tlshelpers import recv_line

from hybridkex import tls
from hybridkex.exceptions import PSKHashMismatch, PSKMismatch, PSKRejected, UnsupportedAlgorithm
from hybridkex.tls import stdlib

ROOT = Path(__file__).resolve().parents[2]
PEER = Path(__file__).with_name("py313_peer.py")
IDENTITY = "client-313"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _spawn(python313: str, *args: str, stdin: str | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [python313, str(PEER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        cwd=str(PEER.parent), stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
    )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        proc.stdin = None  # communicate() would flush the closed pipe
    return proc


def _result(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"python3.13 peer hung: {out} {err}") from None
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 0 and lines, f"python3.13 peer failed ({proc.returncode}): {err}"
    result = json.loads(lines[-1])
    assert tuple(int(x) for x in result["python"].split(".")[:2]) >= (3, 13)
    assert result["modules"] == [], "the stdlib adapter must not import pyOpenSSL/cryptography"
    return result, err


def test_refused_below_python_313() -> None:
    if sys.version_info >= (3, 13):
        pytest.skip("this interpreter has the stdlib PSK API")
    for make in (lambda: stdlib.client_context("id", os.urandom(32)), lambda: stdlib.server_context({})):
        with pytest.raises(UnsupportedAlgorithm, match=r"Python >= 3\.13"):
            make()


def test_sha384_refused_before_anything_else() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="SHA-256"):
        stdlib.client_context("id", os.urandom(32), suite="TLS_AES_256_GCM_SHA384")


def test_stdlib_client_to_pyopenssl_server(python313: str, psk: bytes) -> None:
    sctx = tls.server_context({IDENTITY.encode(): psk})
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        ls.settimeout(30)
        proc = _spawn(python313, "client", str(ls.getsockname()[1]), IDENTITY, psk.hex())
        try:
            sock, _ = ls.accept()
            with sock:
                conn, info = tls.wrap_socket(sctx, sock, server_side=True, timeout=30)
                sock.settimeout(None)
                line = recv_line(conn)
                conn.sendall(line.upper())
                conn.shutdown()
        finally:
            result, _ = _result(proc)
    assert line == b"ping from python 3.13\n"
    assert result["received"] == "PING FROM PYTHON 3.13\n"
    assert result["info"] == {
        "role": "client", "version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "group": None,
        "psk_identity": IDENTITY,
    }
    # Python 3.13's OpenSSL (3.0) has no ML-KEM: our hybrid-preferring server got X25519 (fresh DHE).
    assert info.group == "x25519" and info.psk_identity == IDENTITY.encode()


def _pyopenssl_client_to_stdlib_server(python313: str, cctx: Any, key: bytes, mode: str = "") -> dict[str, Any]:
    """Connect our client context to a python3.13 stdlib server; what each side saw."""
    proc = _spawn(python313, "server", IDENTITY, key.hex(), *([mode] if mode else []))
    ours: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            try:
                conn, ours["info"] = tls.wrap_socket(cctx, sock, server_side=False, timeout=30)
            except Exception as exc:
                ours["error"] = exc
            else:
                sock.settimeout(None)
                conn.sendall(b"hello stdlib\n")
                ours["reply"] = recv_line(conn)
                conn.shutdown()  # close_notify: the stdlib peer's unwrap() waits for it
    finally:
        ours["peer"], ours["peer_stderr"] = _result(proc)
    return ours


def test_pyopenssl_client_to_stdlib_server(python313: str, psk: bytes) -> None:
    r = _pyopenssl_client_to_stdlib_server(python313, tls.client_context(IDENTITY, psk), psk)
    assert "error" not in r, r
    assert r["reply"] == b"bildts olleh\n"
    peer = r["peer"]
    assert peer["received"] == "hello stdlib\n"
    assert peer["info"]["version"] == "TLSv1.3" and peer["info"]["psk_identity"] == IDENTITY
    assert peer["info"]["cipher"] == "TLS_AES_128_GCM_SHA256"
    assert r["info"].group == "x25519" and r["info"].cipher == "TLS_AES_128_GCM_SHA256"


def test_pyopenssl_client_wrong_key_against_stdlib_server(python313: str, psk: bytes) -> None:
    r = _pyopenssl_client_to_stdlib_server(python313, tls.client_context(IDENTITY, os.urandom(32)), psk)
    assert isinstance(r["error"], PSKMismatch)
    assert r["peer"]["error"] == "PSKMismatch"


def test_pyopenssl_sha384_client_against_stdlib_server(python313: str, psk: bytes) -> None:
    cctx = tls.client_context(IDENTITY, psk, suite="TLS_AES_256_GCM_SHA384")
    r = _pyopenssl_client_to_stdlib_server(python313, cctx, psk)
    assert isinstance(r["error"], PSKRejected)
    assert r["peer"]["error"] == PSKHashMismatch.__name__, r["peer"]


def test_stdlib_server_lookup_exception_reraised_not_printed(python313: str, psk: bytes) -> None:
    r = _pyopenssl_client_to_stdlib_server(python313, tls.client_context(IDENTITY, psk), psk, "raise")
    assert r["peer"]["error"] == "LookupError" and "key store unavailable" in r["peer"]["message"]
    assert "Traceback" not in r["peer_stderr"] and "Exception ignored" not in r["peer_stderr"]
    assert isinstance(r["error"], PSKRejected)


def test_stdlib_selftest_under_313(python313: str) -> None:
    proc = _spawn(python313, "selftest")
    result, err = _result(proc)
    ok = result["ok"]
    assert ok["client"]["version"] == "TLSv1.3" and ok["server"]["psk_identity"] == "alice"
    assert ok["client"]["cipher"].endswith("_SHA256") and ok["received"] == "hi\n"
    assert result["unknown"]["server"]["error"] == "UnknownPSKIdentity"
    assert result["unknown"]["client"]["error"] == "PSKRejected"
    assert result["wrong_key"]["server"]["error"] == "PSKMismatch"
    assert result["wrong_key"]["client"]["error"] == "PSKMismatch"  # OpenSSL 3.0 sends illegal_parameter
    assert result["lookup_raises"]["server"]["error"] == "LookupError"
    assert "Exception ignored" not in err and "Traceback" not in err
    assert result["sha384"]["error"] == "UnsupportedAlgorithm"
    assert result["require_pq"]["error"] == "UnsupportedAlgorithm"
    assert result["binary_identity"]["error"] == "ConfigurationError"
    assert result["long_identity"]["error"] == "ConfigurationError"
    assert result["short_key"]["error"] == "InvalidKeyMaterial"
    assert result["no_has_psk"]["error"] == "UnsupportedAlgorithm"
    assert "without PSK support" in result["no_has_psk"]["message"]


# --- hybridkex's own derived identities through the stdlib adapter (issue 12, item 1) -----------------

#: Under 0.1.0 the raw identity derived from this seed contained a 0x00 byte (a1 0b ... 80 00 32 ...).
NUL_SEED = b"hybridkex issue 12 seed 45"
BULK = 300


def _derived_pairs(n: int) -> list[tuple[bytes, bytes]]:
    """``n`` (identity, PSK) pairs exactly as hybridkex derives them: alternately a full handshake's and
    a reconnect's, from independent SHA-256-suite combined secrets (the stdlib adapter is SHA-256 only)."""
    from hybridkex.combiner import CombinedSecret
    from hybridkex.io.reconnect import reconnect_identity, reconnect_psk
    from hybridkex.suites import get_suite

    suite = get_suite("x25519-mlkem768-qkd-hkdfsha256")
    pairs = []
    for i in range(n):
        secret = CombinedSecret(suite, hashlib.sha256(NUL_SEED if i == 0 else os.urandom(32)).digest())
        if i % 2 == 0:
            pairs.append((secret.tls_identity(), secret.tls_psk()))
        else:
            index = 1 + i % 7
            pairs.append((reconnect_identity(secret, index), reconnect_psk(secret, index)))
    return pairs


def _pairs_json(pairs: list[tuple[bytes, bytes]]) -> str:
    return json.dumps([[i.hex(), k.hex()] for i, k in pairs])


def test_derived_identities_stdlib_client_to_pyopenssl_server(python313: str) -> None:
    pairs = _derived_pairs(BULK)
    sctx = tls.server_context(dict(pairs))
    served: list[bytes] = []
    failures: list[BaseException] = []

    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        ls.settimeout(20)

        def serve() -> None:
            for _ in range(BULK):
                try:
                    sock, _ = ls.accept()
                except OSError:  # timed out (the client gave up) or closed by the test
                    return
                with sock:
                    try:
                        conn, info = tls.wrap_socket(sctx, sock, server_side=True, timeout=15)
                        sock.settimeout(None)  # pyOpenSSL needs a blocking socket after the handshake
                        conn.sendall(recv_line(conn).upper())
                        conn.shutdown()
                        served.append(info.psk_identity or b"")
                    except Exception as exc:
                        failures.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        proc = _spawn(python313, "bulk-client", str(ls.getsockname()[1]), stdin=_pairs_json(pairs))
        result, _ = _result(proc)
        thread.join(30)
    assert result["failures"] == [] and failures == [], (result["failures"][:5], failures[:5])
    assert result["ok"] == BULK and served == [i for i, _ in pairs]


def test_derived_identities_pyopenssl_client_to_stdlib_server(python313: str) -> None:
    pairs = _derived_pairs(BULK)
    proc = _spawn(python313, "bulk-server", str(BULK), stdin=_pairs_json(pairs))
    failures: list[tuple[int, BaseException]] = []
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        for n, (identity, key) in enumerate(pairs):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stall per request
                    conn, info = tls.wrap_socket(tls.client_context(identity, key), sock, server_side=False,
                                                 timeout=15)
                    sock.settimeout(None)
                    conn.sendall(b"ping %d\n" % n)
                    assert recv_line(conn) == (b"ping %d" % n)[::-1] + b"\n"
                    conn.shutdown()
                    assert info.psk_identity == identity
            except Exception as exc:
                failures.append((n, exc))
    finally:
        result, _ = _result(proc)
    assert failures == [] and result["failures"] == [], (failures[:5], result["failures"][:5])
    assert result["ok"] == BULK and result["identities"] == [i.hex() for i, _ in pairs]
