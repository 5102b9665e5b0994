"""CPU cost of one TLS 1.3 handshake: external PSK (hybridkex.tls) against certificate handshakes.

    python benchmarks/bench_tls.py [--n 100] [--rounds 7] [--quick] [--json FILE]

Both ends run in this thread over memory BIOs, so a handshake's time is the full CPU cost of client
plus server, with no network.  Variants, all TLS 1.3 with session tickets off:

* stdlib ssl, ECDSA P-256 certificate (the baseline: ``ssl.SSLObject``, the client verifies the chain
  and host name);
* pyOpenSSL, ECDSA P-256 certificate (client verifies the chain),
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
import json
import platform
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cryptography
import OpenSSL
from OpenSSL import SSL

from hybridkex import tls
from hybridkex.bench.certs import SERVER_HOST, BaselineCerts
from hybridkex.bench.endpoints import ClientKit, ClientSpec, End, MemoryTLSEnd, ServerKit, pump

# ---- one handshake per variant (the benchmark's own ends, pumped in memory) ---------------------------


def kit_pair(client: ClientKit, server: ServerKit) -> Callable[[], None]:
    def once() -> None:
        pump(client.memory_end(), server.memory_end())

    once()  # fail fast on a misconfiguration
    return once


def cert_variant(certs: BaselineCerts, kind: str, groups: str | None = None) -> Callable[[], None]:
    spec = ClientSpec(kind=kind, groups=groups, ca_path=str(certs.ca_path), server_host=SERVER_HOST)
    server = ServerKit(kind, groups=groups, cert_path=str(certs.cert_path), key_path=str(certs.key_path))
    return kit_pair(ClientKit(spec), server)


def hybridkex_psk(suite: str, groups: str | None) -> Callable[[], None]:
    key, ident = bytes(32 if suite.endswith("256") else 48), b"bench-client"
    cctx = tls.client_context(ident, key, suite=suite, groups=groups)
    sctx = tls.server_context({ident: key}, suite=suite, groups=groups)

    def ends() -> tuple[End, End]:
        return MemoryTLSEnd(tls.MemoryTLS(cctx, server_side=False)), MemoryTLSEnd(tls.MemoryTLS(sctx, server_side=True))

    def once() -> None:
        pump(*ends())

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
        certs = BaselineCerts.create(Path(tmp))
        variants: dict[str, Callable[[], None]] = {
            "stdlib ssl, cert ECDSA P-256 (default group)": cert_variant(certs, "stdlib-cert"),
            "pyOpenSSL, cert ECDSA P-256, X25519": cert_variant(certs, "pyopenssl-cert", "X25519"),
            "pyOpenSSL, cert ECDSA P-256, X25519MLKEM768": cert_variant(certs, "pyopenssl-cert", "X25519MLKEM768"),
            "hybridkex ext-PSK SHA-256, X25519": hybridkex_psk("TLS_AES_128_GCM_SHA256", "X25519"),
            "hybridkex ext-PSK SHA-256, X25519MLKEM768": hybridkex_psk("TLS_AES_128_GCM_SHA256", "X25519MLKEM768"),
            "hybridkex ext-PSK SHA-384, X25519MLKEM768": hybridkex_psk("TLS_AES_256_GCM_SHA384", "X25519MLKEM768"),
            "hybridkex ext-PSK default (both shares offered)": hybridkex_psk("TLS_AES_128_GCM_SHA256", None),
        }
        results = measure(variants, n, rounds)

    baseline = results["stdlib ssl, cert ECDSA P-256 (default group)"][0]
    same_group_cert = {
        "X25519": results["pyOpenSSL, cert ECDSA P-256, X25519"][0],
        "X25519MLKEM768": results["pyOpenSSL, cert ECDSA P-256, X25519MLKEM768"][0],
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
    print("\nratios < 1 mean cheaper than the reference; 'vs cert' compares with pyOpenSSL + ECDSA P-256 "
          "certificate on the same group.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"python": sys.version, "n": n, "rounds": rounds, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
