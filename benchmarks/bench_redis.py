"""redis behind the tunnel pair and behind stunnel: issue 15's loads, side by side in one run.

    python benchmarks/bench_redis.py [--rounds 3]

Needs ``redis-server``, ``redis-benchmark`` and ``stunnel4`` (Debian: ``apt-get install
redis-server stunnel4``); says so and exits 2 without them.  The relays are the ones ``hybridkex
bench tunnel`` starts (:class:`hybridkex.bench.tunnelprocs.Procs`: the tunnel pair with QKD required
and the simulated KME in its own process; stunnel 5 with TLS 1.3 external PSK), in front of one
redis (no persistence).  ``redis-benchmark -t get --csv`` per load, relays in a rotating order per
round; medians over rounds.  The loads are the issue's three as it wrote them (``-d`` only sizes
SET values, so its third row reads a missing key like the first) plus ``get64k``: GETs of a real
64 KiB value, written just before that load and deleted after it.  No assertions: numbers for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybridkex.bench.tunnelprocs import Procs

LOADS = {
    "small": ["-n", "20000", "-c", "10"],
    "pipelined": ["-n", "60000", "-c", "10", "-P", "16"],
    "d65536": ["-n", "3000", "-c", "10", "-d", "65536"],
    "get64k": ["-n", "3000", "-c", "10"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bench(port: int, args: list[str]) -> tuple[float, float]:
    """(requests/s, p50 ms) of one redis-benchmark run against ``port``."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "get", "--csv", *args],
                         capture_output=True, text=True, check=True).stdout
    header, row = list(csv.reader(io.StringIO(out)))[:2]
    return float(row[1]), float(row[header.index("p50_latency_ms")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    missing = [b for b in ("redis-server", "redis-benchmark", "redis-cli") if shutil.which(b) is None]
    if missing:
        print(f"bench_redis: {', '.join(missing)} not found; install redis (Debian: apt-get install redis-server)",
              file=sys.stderr)
        return 2
    port = _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    procs = Procs(Path(tempfile.mkdtemp(prefix="hybridkex-bench-redis-")))
    try:
        time.sleep(0.5)
        stunnel = procs.stunnel(port)
        if stunnel is None:
            print("bench_redis: " + "; ".join(procs.notes), file=sys.stderr)
            return 2
        relays = {"direct": port, "stunnel": stunnel.port, "hybridkex": procs.hybridkex(port).port}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {(ld, r): [] for ld in LOADS for r in relays}
        order = list(relays)
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        for _ in range(opts.rounds):
            for load, args in LOADS.items():
                if load == "get64k":
                    subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set", "-n", "10", "-d", "65536",
                                    "-q"], check=True, stdout=subprocess.DEVNULL)
                for relay in order:
                    results[(load, relay)].append(_bench(relays[relay], args))
                if load == "get64k":
                    subprocess.run(["redis-cli", "-p", str(port), "flushall"], check=True, stdout=subprocess.DEVNULL)
            order = order[1:] + order[:1]
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        print(f"load average {' '.join(load_before)} -> {' '.join(load_after)}; {opts.rounds} rounds")
        print("| load | direct | stunnel | hybridkex | hybridkex / stunnel | p50 ms stunnel / hybridkex |")
        print("|---|---:|---:|---:|---:|---:|")
        for load in LOADS:
            rate = {r: statistics.median(x[0] for x in results[(load, r)]) for r in relays}
            p50 = {r: statistics.median(x[1] for x in results[(load, r)]) for r in relays}
            print(f"| {load} | {rate['direct']:.0f} | {rate['stunnel']:.0f} | {rate['hybridkex']:.0f} | "
                  f"{rate['hybridkex'] / rate['stunnel']:.2f} | {p50['stunnel']:.3f} / {p50['hybridkex']:.3f} |")
        return 0
    finally:
        procs.close()
        redis.terminate()
        redis.wait(10)


if __name__ == "__main__":
    sys.exit(main())
