"""CPU of in-memory handshakes, both ends in this thread (``hybridkex bench``'s CPU phase, alone).

    python benchmarks/bench_memory_handshakes.py [--variants IDS] [--count 2000] [--rounds 5]

prints ``time.thread_time()`` per handshake (median over rounds) for each variant.  For a count that
does not move with the machine's load, run it under callgrind with ``--callgrind``: the measured
handshakes then run inside ``functools.reduce``, the only function callgrind collects::

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=functools_reduce \\
        python benchmarks/bench_memory_handshakes.py --variants hybridkex-1rtt --count 300 --callgrind

and the ``Collected`` instructions divided by ``--count`` are the instructions per handshake (this
thread only; callgrind's simulated CPU takes OpenSSL's generic code paths, so compare Python-side
changes by it, and time by thread CPU).  Each variant first runs 200 handshakes (a steady-state
ticket's full handshake, its first keys).  No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

from hybridkex.bench.endpoints import pump
from hybridkex.bench.env import BenchEnv
from hybridkex.bench.variants import select

_WARMUP = 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="tls-psk,hybridkex-reconnect,hybridkex-1rtt")
    ap.add_argument("--count", type=int, default=2000, help="handshakes per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--callgrind", action="store_true", help="one round inside functools.reduce, no timing")
    a = ap.parse_args()
    variants = select(a.variants.split(","))
    with BenchEnv(variants) as env:
        for v in variants:
            client, server = env.memory_client(v.id), env.server(v.id)

            def one(_acc: object, _i: int) -> None:
                pump(client.memory_end(), server.memory_end())  # noqa: B023 - this iteration's ends

            for i in range(_WARMUP):
                one(None, i)
            if a.callgrind:
                functools.reduce(one, range(a.count), None)
                print(f"{v.id}: {a.count} handshakes inside functools.reduce")
                continue
            rounds = []
            for _ in range(a.rounds):
                t0 = time.thread_time()
                for i in range(a.count):
                    one(None, i)
                rounds.append((time.thread_time() - t0) / a.count * 1e3)
            print(f"{v.id:22s} {statistics.median(rounds):.3f} ms per handshake (thread CPU, both ends; rounds "
                  + " ".join(f"{r:.3f}" for r in rounds) + ")")


if __name__ == "__main__":
    main()
