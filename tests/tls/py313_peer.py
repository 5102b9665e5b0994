"""A stdlib-ssl TLS-PSK peer run under Python >= 3.13 by test_tls_stdlib.py (standard library and
hybridkex.tls.stdlib only: this interpreter has neither pyOpenSSL nor cryptography).

    py313_peer.py client PORT IDENTITY HEXKEY      connect, send a line, print the reply
    py313_peer.py server IDENTITY HEXKEY [raise]   print the port, accept one client, echo a line reversed
    py313_peer.py selftest                         stdlib <-> stdlib scenarios
    py313_peer.py bulk-client PORT                 one handshake per (identity hex, key hex) pair read as a
                                                   JSON list from stdin; count failures
    py313_peer.py bulk-server COUNT                the same pairs as the server's table; print the port,
                                                   accept COUNT clients one after the other

Every result is one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any

import hybridkex.tls.stdlib as st
from hybridkex.exceptions import HybridKEXError


def _info(info: Any) -> dict[str, Any]:
    return {
        "role": info.role,
        "version": info.version,
        "cipher": info.cipher,
        "group": info.group,
        "psk_identity": None if info.psk_identity is None else info.psk_identity.decode(),
    }


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": str(exc)}


def _recv_line(sock: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def client(port: int, identity: str, key: bytes) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            ssock, info = st.wrap_socket(st.client_context(identity, key), sock, server_side=False, timeout=15)
        except HybridKEXError as exc:
            return _error(exc)
        ssock.sendall(b"ping from python 3.13\n")
        reply = _recv_line(ssock)
        ssock.close()
        return {"info": _info(info), "received": reply.decode()}


def server(identity: str, key: bytes, mode: str) -> dict[str, Any]:
    def lookup(ident: bytes) -> bytes | None:
        if mode == "raise":
            raise LookupError("key store unavailable")
        return key if ident == identity.encode() else None

    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        ls.settimeout(15)
        print(json.dumps({"port": ls.getsockname()[1]}), flush=True)
        sock, _ = ls.accept()
        with sock:
            try:
                ssock, info = st.wrap_socket(st.server_context(lookup), sock, server_side=True, timeout=15)
            except (HybridKEXError, LookupError) as exc:
                return _error(exc)
            line = _recv_line(ssock)
            ssock.sendall(line[:-1][::-1] + b"\n")
            ssock.unwrap()
            return {"info": _info(info), "received": line.decode()}


def _pair(
    client_id: str, client_key: bytes, table: dict[bytes, bytes], raise_in_lookup: bool = False
) -> dict[str, Any]:
    def lookup(ident: bytes) -> bytes | None:
        if raise_in_lookup:
            raise LookupError("key store unavailable")
        return table.get(ident)

    a, b = socket.socketpair()
    out: dict[str, Any] = {}

    def serve() -> None:
        try:
            ssock, info = st.wrap_socket(st.server_context(lookup), a, server_side=True, timeout=10)
            out["server"] = _info(info)
            ssock.sendall(b"hi\n")
            ssock.close()
        except (HybridKEXError, LookupError) as exc:
            out["server"] = _error(exc)
            a.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        ssock, info = st.wrap_socket(st.client_context(client_id, client_key), b, server_side=False, timeout=10)
        out["client"] = _info(info)
        out["received"] = _recv_line(ssock).decode()
        ssock.close()
    except HybridKEXError as exc:
        out["client"] = _error(exc)
        b.close()
    t.join(15)
    return out


def _read_pairs() -> list[tuple[bytes, bytes]]:
    return [(bytes.fromhex(i), bytes.fromhex(k)) for i, k in json.load(sys.stdin)]


def bulk_client(port: int) -> dict[str, Any]:
    """Many handshakes in one process (starting an interpreter per handshake would dominate the test)."""
    failures: list[dict[str, Any]] = []
    ok = 0
    for n, (identity, key) in enumerate(_read_pairs()):
        try:
            ctx = st.client_context(identity, key)
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                ssock, info = st.wrap_socket(ctx, sock, server_side=False, timeout=15)
                ssock.sendall(b"ping %d\n" % n)
                reply = _recv_line(ssock)
                ssock.close()
            if reply != b"PING %d\n" % n or info.psk_identity != identity:
                raise AssertionError(f"wrong reply {reply!r} or identity {info.psk_identity!r}")
            ok += 1
        except (HybridKEXError, OSError, AssertionError) as exc:
            failures.append({"index": n, "identity": identity.hex(), **_error(exc)})
    return {"ok": ok, "failures": failures}


def bulk_server(count: int) -> dict[str, Any]:
    table = dict(_read_pairs())
    ctx = st.server_context(table)
    failures: list[dict[str, Any]] = []
    seen: list[str] = []
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        ls.settimeout(15)
        print(json.dumps({"port": ls.getsockname()[1]}), flush=True)
        for n in range(count):
            try:
                sock, _ = ls.accept()
            except TimeoutError as exc:
                failures.append({"index": n, **_error(exc)})
                break
            with sock:
                try:
                    ssock, info = st.wrap_socket(ctx, sock, server_side=True, timeout=15)
                    line = _recv_line(ssock)
                    ssock.sendall(line[:-1][::-1] + b"\n")
                    ssock.unwrap()
                    seen.append((info.psk_identity or b"").hex())
                except (HybridKEXError, OSError) as exc:
                    failures.append({"index": n, **_error(exc)})
    return {"ok": len(seen), "identities": seen, "failures": failures}


def selftest() -> dict[str, Any]:
    key = os.urandom(32)
    results: dict[str, Any] = {
        "ok": _pair("alice", key, {b"alice": key}),
        "unknown": _pair("mallory", key, {b"alice": key}),
        "wrong_key": _pair("alice", os.urandom(32), {b"alice": key}),
        "lookup_raises": _pair("alice", key, {b"alice": key}, raise_in_lookup=True),
    }
    import ssl

    real_has_psk = ssl.HAS_PSK
    ssl.HAS_PSK = False  # as in a Python built against an OpenSSL without PSK support
    try:
        st.client_context("alice", key)
        results["no_has_psk"] = {"error": None}
    except HybridKEXError as exc:
        results["no_has_psk"] = _error(exc)
    finally:
        ssl.HAS_PSK = real_has_psk
    for name, make in {
        "sha384": lambda: st.client_context("alice", key, suite="x25519-mlkem1024-qkd-hkdfsha384"),
        "require_pq": lambda: st.server_context({}, require_pq=True),
        "binary_identity": lambda: st.client_context(b"\xff\xfe", key),
        "long_identity": lambda: st.client_context("x" * 257, key),
        "short_key": lambda: st.client_context("alice", b"short"),
    }.items():
        try:
            make()
            results[name] = {"error": None}
        except HybridKEXError as exc:
            results[name] = _error(exc)
    return results


def main(argv: list[str]) -> int:
    if argv[0] == "client":
        result = client(int(argv[1]), argv[2], bytes.fromhex(argv[3]))
    elif argv[0] == "server":
        result = server(argv[1], bytes.fromhex(argv[2]), argv[3] if len(argv) > 3 else "")
    elif argv[0] == "bulk-client":
        result = bulk_client(int(argv[1]))
    elif argv[0] == "bulk-server":
        result = bulk_server(int(argv[1]))
    else:
        result = selftest()
    result["python"] = sys.version.split()[0]
    result["modules"] = sorted(m for m in ("OpenSSL", "cryptography") if m in sys.modules)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
