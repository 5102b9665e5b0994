"""Connection setup latency on loopback: zero-extra-round-trip reconnect vs full hybrid handshake.

    python benchmarks/bench_reconnect.py [--n 200] [--rounds 5] [--quick] [--json FILE]

One blocking client against a threaded HybridServer on 127.0.0.1 (both in this process, so the
figures include both ends' CPU), PSK authentication, QKD from the in-memory link (MemoryKeyLink:
no KME latency, so the QKD share here is only the bookkeeping; a real KME adds its round trip to
every *full* handshake and nothing to a reconnect).  Each sample is one ``hybridkex.connect`` up to
the verified TLS session, a one-byte echo (so the server really finished its side) and close.

Variants, interleaved round by round so drift hits all alike:

* ``tcp``: plain TCP connect + one-byte echo, the floor;
* ``full``: hybrid handshake (ML-KEM-768 + X25519 + QKD, 2 round trips) then TLS 1.3 (1 round trip);
* ``reconnect``: TLS 1.3 straight away with a PSK derived from a parent session (1 round trip,
  X25519MLKEM768).

Reports median and p95 milliseconds and the ratio full/reconnect measured in this run.  No
assertions: numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import hybridkex
from hybridkex import Policy, QKDConfig
from hybridkex.api import ClientConfig, HybridServer, HybridSocket, ReconnectPolicy, ServerConfig
from hybridkex.bench.stats import quantile
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import MemoryKeyLink


def configs(uses: int) -> tuple[ClientConfig, ServerConfig, MemoryKeyLink]:
    psk = os.urandom(32)
    link = MemoryKeyLink(("kme-c", "kme-s"), max_keys=10_000_000)
    rc = ReconnectPolicy(enabled=True, max_uses=uses, lifetime=3600)
    ini = InitiatorConfig("bench-client", [PSKAuthenticator({"bench-server": psk})], Policy(),
                          QKDConfig("sae-c", "kme-c"), peer_identity="bench-server")
    res = ResponderConfig("bench-server", [PSKAuthenticator({"bench-client": psk})], Policy(),
                          QKDConfig("sae-s", "kme-s"))
    return ClientConfig(ini, reconnect=rc), ServerConfig(res, reconnect=rc), link


def echo_one(conn: HybridSocket, address: Any) -> None:
    data = conn.recv(1)
    if data:
        conn.sendall(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="connections per variant and round (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (n=20, one round)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    n, rounds = (20, 1) if args.quick else (args.n, args.rounds)

    client_cfg, server_cfg, link = configs(uses=n * rounds + 1)
    client_keys, server_keys = link.source("sae-c", 0), link.source("sae-s", 1)

    # The TCP floor: a plain echo server.
    plain = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def plain_loop() -> None:
        plain.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = plain.accept()
            except TimeoutError:
                continue
            with conn:
                data = conn.recv(1)
                if data:
                    conn.sendall(data)

    plain_thread = threading.Thread(target=plain_loop, daemon=True)
    plain_thread.start()

    with HybridServer(("127.0.0.1", 0), server_cfg, echo_one, key_source=server_keys).start(0.05) as server:
        address = server.server_address
        parent = hybridkex.connect(address, client_cfg, key_source=client_keys)
        ticket = parent.reconnect_ticket
        parent.close()

        def tcp() -> None:
            with socket.create_connection(plain.getsockname()) as s:
                s.sendall(b"x")
                s.recv(1)

        def full() -> None:
            with hybridkex.connect(address, client_cfg, key_source=client_keys) as s:
                s.sendall(b"x")
                s.recv(1)

        def reconnect() -> None:
            with hybridkex.connect(address, client_cfg, ticket=ticket) as s:
                if not s.session.reconnect:
                    raise RuntimeError("expected a reconnect")
                s.sendall(b"x")
                s.recv(1)

        variants: dict[str, Callable[[], None]] = {"tcp": tcp, "full": full, "reconnect": reconnect}
        for fn in variants.values():  # warm-up: imports, contexts, caches
            for _ in range(3 if fn is not reconnect else 1):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1000.0)
    stop.set()
    plain_thread.join(5)
    plain.close()

    results = {name: {"median_ms": statistics.median(v), "p95_ms": quantile(v, 0.95), "n": len(v)}
               for name, v in samples.items()}
    ratio = results["full"]["median_ms"] / results["reconnect"]["median_ms"]
    print(f"connection setup on loopback, {n} x {rounds} per variant "
          f"(Python {platform.python_version()}, {platform.machine()})")
    print(f"{'variant':<10} {'median ms':>10} {'p95 ms':>10}")
    for name, r in results.items():
        print(f"{name:<10} {r['median_ms']:>10.3f} {r['p95_ms']:>10.3f}")
    print(f"full hybrid handshake / reconnect (median): {ratio:.2f}x")
    floor = results["reconnect"]["median_ms"] / results["tcp"]["median_ms"]
    print(f"reconnect / plain TCP echo (median): {floor:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"results": results, "ratio_full_over_reconnect": ratio,
                       "python": platform.python_version(), "n": n, "rounds": rounds}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
