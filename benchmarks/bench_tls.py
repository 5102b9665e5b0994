"""CPU cost of one TLS 1.3 handshake: external PSK (hybridkex.tls) against certificate handshakes.

    python benchmarks/bench_tls.py [--n 100] [--rounds 7] [--quick] [--json FILE]

Both ends run in this thread over memory BIOs, so a handshake's time is the full CPU cost of client
plus server, with no network.  Variants, all TLS 1.3 with session tickets off:

* stdlib ssl, ECDSA P-256 certificate (the baseline: ``ssl.SSLObject``, the client verifies the chain
  and host name);
* pyOpenSSL, ECDSA P-256 and Ed25519 certificates (client verifies against the self-signed root),
  X25519 and X25519MLKEM768;
* hybridkex.tls external PSK (SHA-256 and SHA-384), X25519 and X25519MLKEM768, including our
  post-handshake verification.

Reports median milliseconds of CPU per handshake, handshakes per second, and ratios to the stdlib
baseline and to the certificate handshake with the same library and group, measured in this run.
The stdlib links the system OpenSSL, pyOpenSSL the one bundled with cryptography: that difference is
part of the baseline ratio.  No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import cryptography
import OpenSSL
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from hybridkex import tls
from hybridkex.tls import _shim

HOST = "bench.hybridkex.invalid"


def self_signed(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )


# ---- one handshake per variant -------------------------------------------------------------------


def pyopenssl_pair(cctx: SSL.Context, sctx: SSL.Context) -> Callable[[], None]:
    def once() -> None:
        c, s = SSL.Connection(cctx, None), SSL.Connection(sctx, None)
        c.set_connect_state()
        s.set_accept_state()
        done = [False, False]
        for _ in range(8):
            for i, end in enumerate((c, s)):
                if not done[i]:
                    try:
                        end.do_handshake()
                        done[i] = True
                    except SSL.WantReadError:
                        pass
            for a, b in ((c, s), (s, c)):
                with contextlib.suppress(SSL.WantReadError):
                    b.bio_write(a.bio_read(1 << 16))
            if all(done):
                return
        raise RuntimeError("pyOpenSSL handshake did not finish")

    once()  # fail fast on a misconfiguration
    return once


def pyopenssl_cert(
    tmp: str, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, groups: str
) -> Callable[[], None]:
    cert = self_signed(key)
    ca_path = os.path.join(tmp, f"ca-{cert.serial_number}.pem")
    with open(ca_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    sctx.use_certificate(cert)
    sctx.use_privatekey(key)
    sctx.set_options(SSL.OP_NO_TICKET)
    sctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    cctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    cctx.set_verify(SSL.VERIFY_PEER)
    cctx.load_verify_locations(ca_path)
    for ctx in (sctx, cctx):
        # pyOpenSSL has no public group setter: use the same binding hybridkex uses.
        if not _shim.set_groups(ctx, groups):
            raise SystemExit(f"group list {groups} rejected by {_shim.versions()}")
    return pyopenssl_pair(cctx, sctx)


def hybridkex_psk(suite: str, groups: str | None) -> Callable[[], None]:
    key, ident = os.urandom(32 if suite.endswith("256") else 48), b"bench-client"
    cctx = tls.client_context(ident, key, suite=suite, groups=groups)
    sctx = tls.server_context({ident: key}, suite=suite, groups=groups)

    def once() -> None:
        c, s = tls.MemoryTLS(cctx, server_side=False), tls.MemoryTLS(sctx, server_side=True)
        for _ in range(8):
            c.do_handshake()
            s.do_handshake()
            moved = 0
            for a, b in ((c, s), (s, c)):
                out = a.data_to_send()
                if out:
                    b.receive_data(out)
                    moved += len(out)
            if c.info is not None and s.info is not None:
                return
        raise RuntimeError("hybridkex handshake did not finish")

    once()
    return once


def stdlib_p256(tmp: str) -> Callable[[], None]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key)
    cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.load_cert_chain(cert_path, key_path)
    sctx.num_tickets = 0
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cctx.load_verify_locations(cert_path)

    def once() -> None:
        cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        c = cctx.wrap_bio(cin, cout, server_side=False, server_hostname=HOST)
        s = sctx.wrap_bio(sin, sout, server_side=True)
        done = [False, False]
        for _ in range(8):
            for i, end in enumerate((c, s)):
                if not done[i]:
                    try:
                        end.do_handshake()
                        done[i] = True
                    except ssl.SSLWantReadError:
                        pass
            sin.write(cout.read())
            cin.write(sout.read())
            if all(done):
                return
        raise RuntimeError("stdlib handshake did not finish")

    once()
    return once


# ---- measurement ---------------------------------------------------------------------------------


def measure(variants: dict[str, Callable[[], None]], n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median CPU and wall milliseconds per handshake for each variant.  Rounds interleave the
    variants, so a load change on the machine hits all of them alike."""
    for fn in variants.values():
        for _ in range(max(5, n // 20)):
            fn()
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn()
            cpu[name].append((time.process_time() - c0) / n * 1e3)
            wall[name].append((time.perf_counter() - w0) / n * 1e3)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in variants}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="handshakes per variant and round (default 100)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported (default 7)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (n=20, one round)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    n, rounds = (20, 1) if args.quick else (args.n, args.rounds)

    with tempfile.TemporaryDirectory() as tmp:
        variants: dict[str, Callable[[], None]] = {
            "stdlib ssl, cert ECDSA P-256 (default group)": stdlib_p256(tmp),
            "pyOpenSSL, cert ECDSA P-256, X25519": pyopenssl_cert(
                tmp, ec.generate_private_key(ec.SECP256R1()), "X25519"
            ),
            "pyOpenSSL, cert Ed25519, X25519": pyopenssl_cert(tmp, ed25519.Ed25519PrivateKey.generate(), "X25519"),
            "pyOpenSSL, cert Ed25519, X25519MLKEM768": pyopenssl_cert(
                tmp, ed25519.Ed25519PrivateKey.generate(), "X25519MLKEM768"
            ),
            "hybridkex ext-PSK SHA-256, X25519": hybridkex_psk("TLS_AES_128_GCM_SHA256", "X25519"),
            "hybridkex ext-PSK SHA-256, X25519MLKEM768": hybridkex_psk("TLS_AES_128_GCM_SHA256", "X25519MLKEM768"),
            "hybridkex ext-PSK SHA-384, X25519MLKEM768": hybridkex_psk("TLS_AES_256_GCM_SHA384", "X25519MLKEM768"),
            "hybridkex ext-PSK default (both shares offered)": hybridkex_psk("TLS_AES_128_GCM_SHA256", None),
        }
        results = measure(variants, n, rounds)

    baseline = results["stdlib ssl, cert ECDSA P-256 (default group)"][0]
    same_group_cert = {
        "X25519": results["pyOpenSSL, cert Ed25519, X25519"][0],
        "X25519MLKEM768": results["pyOpenSSL, cert Ed25519, X25519MLKEM768"][0],
    }
    print(f"Python {platform.python_version()}, pyOpenSSL {OpenSSL.__version__}, cryptography "
          f"{cryptography.__version__} ({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}), "
          f"stdlib {ssl.OPENSSL_VERSION}; n={n} x {rounds} rounds, both ends in one thread")
    header = f"{'variant':50} {'CPU ms':>8} {'wall ms':>8} {'hs/s':>7} {'vs stdlib':>10} {'vs cert':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, (cpu, wall) in results.items():
        group = "X25519MLKEM768" if "MLKEM" in name or ("default" in name and "hybridkex" in name) else "X25519"
        vs_cert = cpu / same_group_cert[group] if name.startswith("hybridkex") else None
        rows.append({"variant": name, "cpu_ms": cpu, "wall_ms": wall, "handshakes_per_s": 1e3 / cpu,
                     "ratio_vs_stdlib_cert": cpu / baseline, "ratio_vs_pyopenssl_cert_same_group": vs_cert})
        print(f"{name:50} {cpu:8.3f} {wall:8.3f} {1e3 / cpu:7.0f} {cpu / baseline:9.2f}x "
              f"{'' if vs_cert is None else f'{vs_cert:7.2f}x':>8}")
    print("\nratios < 1 mean cheaper than the reference; 'vs cert' compares with pyOpenSSL + Ed25519 "
          "certificate on the same group.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"python": sys.version, "n": n, "rounds": rounds, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
