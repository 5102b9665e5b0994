"""Throughput of the simulated ETSI GS QKD 014 KME, and the latency QKD adds to a handshake.

    python benchmarks/bench_kme.py [--seconds 2] [--quick] [--json FILE]

Everything runs over real HTTPS with mutual TLS on 127.0.0.1 (the demo PKI, ECDSA P-256).

1. **KME throughput**: keys per second a master gets from the simulated KME with ``enc_keys``,
   batch sizes 1 and 32, from one keep-alive client and from 4 client threads; plus the slave side
   (``dec_keys`` of 32 IDs).  The link is made fast enough never to be the bottleneck.
2. **Handshake-side QKD latency** with the KME answering after an injected 5 ms delay (a KME one
   network hop away): what the master's ``get_keys(slave, 1)`` costs a handshake with the
   :class:`~hybridkex.qkd.KeyPool` off (a KME request per handshake) and on (a pooled key), and
   what the slave's ``get_keys_by_id`` costs (never pooled: the slave only learns the ID in the
   handshake).  The baseline, measured in the same run, is a ``status`` request to a KME with no
   injected delay (one mutual-TLS HTTP round trip on loopback).

Reports medians and 95th percentiles in milliseconds, and ratios.  No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from hybridkex.bench.stats import summarize
from hybridkex.qkd import KeyPool
from hybridkex.qkd.kme import KMELimits, SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI


def start_fast(pki: DemoPKI, **kwargs: Any) -> SimulatedKMEPair:
    """A KME pair whose link is never the bottleneck."""
    return SimulatedKMEPair.start(pki, rate_bps=1e12, capacity_bits=1 << 40, **kwargs)


def quantiles(samples: list[float]) -> dict[str, float]:
    """Median and p95 in milliseconds (hybridkex.bench's quantiles, as every benchmark reports them)."""
    q = summarize([x * 1e3 for x in samples])
    return {"median_ms": q["median"], "p95_ms": q["p95"], "n": q["n"]}


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def throughput(pair: SimulatedKMEPair, batch: int, threads: int, seconds: float) -> dict[str, float]:
    """Keys per second from ``enc_keys`` with ``threads`` clients each asking for ``batch`` keys."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        with pair.key_source("sae-a") as master:
            master.get_keys("sae-b", batch)  # connect and warm up outside the count
            while time.perf_counter() < stop:
                counts[i] += len(master.get_keys("sae-b", batch))

    t0 = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    keys = sum(counts)
    return {"keys_per_s": keys / elapsed, "requests_per_s": keys / batch / elapsed}


def slave_throughput(pair: SimulatedKMEPair, seconds: float) -> dict[str, float]:
    with pair.key_source("sae-a") as master, pair.key_source("sae-b") as slave:
        batches = [master.get_keys("sae-b", 32) for _ in range(max(20, int(seconds * 400)))]
        t0 = time.perf_counter()
        done = 0
        for batch in batches:
            slave.get_keys_by_id("sae-a", [k.key_id for k in batch])
            done += len(batch)
            if time.perf_counter() - t0 > seconds:
                break
        elapsed = time.perf_counter() - t0
    return {"keys_per_s": done / elapsed, "requests_per_s": done / 32 / elapsed}


def handshake_latency(pki: DemoPKI, n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with start_fast(pki) as fast, fast.key_source("sae-a") as c:
        c.status("sae-b")
        results["baseline_status_roundtrip"] = quantiles(timed(lambda: c.status("sae-b"), n))
    with start_fast(pki, delay=0.005) as slow, \
            slow.key_source("sae-a") as master, slow.key_source("sae-b") as slave:
        master.status("sae-b")
        issued: list[str] = []

        def direct() -> None:
            issued.append(master.get_keys("sae-b", 1)[0].key_id)

        results["master_pool_off"] = quantiles(timed(direct, n))
        with KeyPool(slow.key_source("sae-a"), ["sae-b"], low_watermark=n // 4,
                     high_watermark=n + n // 4, batch_size=64) as pool:
            pool.wait_ready(60)
            before = pool.stats()

            def pooled() -> None:
                issued.append(pool.get_keys("sae-b", 1)[0].key_id)

            results["master_pool_on"] = quantiles(timed(pooled, n))
            after = pool.stats()
            results["pool_hits"] = after.pool_hits - before.pool_hits
            results["pool_direct_fetches"] = after.direct_fetches - before.direct_fetches
            results["pool_mean_fetch_ms"] = (after.mean_fetch_latency or 0) * 1e3
        ids = iter(issued)
        results["slave_by_id"] = quantiles(timed(lambda: slave.get_keys_by_id("sae-a", [next(ids)]), n))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each throughput run")
    parser.add_argument("--n", type=int, default=200, help="samples per latency measurement")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    seconds, n = (0.3, 30) if args.quick else (args.seconds, args.n)

    report: dict[str, Any] = {"python": sys.version.split()[0], "machine": platform.machine()}
    with DemoPKI.temporary() as pki:
        # Keys taken by the masters are never fetched here; let them pile up past the default bound.
        limits = KMELimits(max_key_per_request=128, max_pending_keys=2_000_000)
        with start_fast(pki, limits=limits) as pair:
            tp: dict[str, Any] = {}
            for batch in (1, 32):
                for threads in (1, 4):
                    tp[f"enc_keys batch={batch} threads={threads}"] = throughput(pair, batch, threads, seconds)
            tp["dec_keys batch=32 threads=1"] = slave_throughput(pair, seconds)
        report["throughput"] = tp
        report["latency"] = lat = handshake_latency(pki, n)

    print("Simulated KME over mutual TLS on 127.0.0.1")
    print(f"  {'run':32} {'keys/s':>10} {'requests/s':>11}")
    for name, r in tp.items():
        print(f"  {name:32} {r['keys_per_s']:10.0f} {r['requests_per_s']:11.0f}")
    base = lat["baseline_status_roundtrip"]["median_ms"]
    print("\nQKD latency seen by a handshake, KME answering after 5 ms (median / p95, ms; ratio to baseline)")
    for name in ("baseline_status_roundtrip", "master_pool_off", "master_pool_on", "slave_by_id"):
        q = lat[name]
        print(f"  {name:28} {q['median_ms']:8.3f} / {q['p95_ms']:8.3f}   x{q['median_ms'] / base:7.3f}")
    off, on = lat["master_pool_off"]["median_ms"], lat["master_pool_on"]["median_ms"]
    print(f"  pool on saves the master {off - on:.3f} ms per handshake ({off / on:.0f}x faster); "
          f"{lat['pool_hits']} pool hits, {lat['pool_direct_fetches']} direct fetches, "
          f"mean background fetch {lat['pool_mean_fetch_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
