"""Per-call cost of the ETSI GS QKD 014 clients against the simulated KME (in its own process).

    python benchmarks/bench_kme_client.py [--n 2000] [--rounds 5]

The KME runs as ``python -m hybridkex kme`` in a subprocess, so the CPU counted here is the
client's alone: ``time.thread_time()`` of the calling thread (sync) or ``time.process_time()`` of
this process (async: the event loop runs in this thread).  Reports, per request kind, the median
over rounds of the mean CPU and wall microseconds per call on one keep-alive connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hybridkex.qkd import AsyncETSI014Client, ETSI014Client
from hybridkex.qkd.pki import DemoPKI


def start_kme(pki: DemoPKI) -> tuple[subprocess.Popen[bytes], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridkex", "kme", "--pki", str(pki.directory), "--rate", "1e12",
         "--capacity", str(1 << 40), "--log-level", "error"],
        stdout=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    urls: dict[str, str] = {}
    buf = b""
    deadline = time.monotonic() + 30
    while len(urls) < 2:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            raise SystemExit("the KME did not start")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise SystemExit("the KME exited")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            name, _, url = line.decode().partition(" ")
            urls[name] = url
    sel.close()
    return proc, urls["KME-A"], urls["KME-B"]


def args_for(pki: DemoPKI, name: str) -> dict[str, Any]:
    return {"cert": pki.cert(name), "key": pki.key(name), "ca": pki.ca_cert}


def measure_sync(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    c0, w0 = time.thread_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.thread_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6


async def measure_async(fn: Callable[[], Awaitable[Any]], n: int) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.process_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6


def report(name: str, runs: list[tuple[float, float]]) -> None:
    cpu = statistics.median(r[0] for r in runs)
    wall = statistics.median(r[1] for r in runs)
    spread = f"{min(r[0] for r in runs):.0f}-{max(r[0] for r in runs):.0f}"
    print(f"{name:28s} cpu {cpu:7.0f} us/call (rounds {spread})   wall {wall:7.0f} us/call", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--no-async", action="store_true", help="only the blocking client")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = DemoPKI.create(Path(tmp) / "pki")
        proc, url_a, url_b = start_kme(pki)
        try:
            with ETSI014Client(url_a, **args_for(pki, "sae-a")) as master, \
                    ETSI014Client(url_b, **args_for(pki, "sae-b")) as slave:
                master.status("sae-b")
                kinds: dict[str, Callable[[], Any]] = {
                    "sync status": lambda: master.status("sae-b"),
                    "sync enc_keys(1)": lambda: master.get_keys("sae-b", 1),
                }
                for name, fn in kinds.items():
                    report(name, [measure_sync(fn, opts.n) for _ in range(opts.rounds)])
                pending = [master.get_keys("sae-b", 128) for _ in range(opts.n * opts.rounds // 128 + 1)]
                ids = [k.key_id for batch in pending for k in batch]
                it = iter(ids)
                report("sync dec_keys(1)",
                       [measure_sync(lambda: slave.get_keys_by_id("sae-a", [next(it)]), opts.n)
                        for _ in range(opts.rounds)])
            if not opts.no_async:
                asyncio.run(run_async(pki, url_a, opts))
        finally:
            proc.terminate()
            proc.wait(15)


async def run_async(pki: DemoPKI, url_a: str, opts: argparse.Namespace) -> None:
    async with AsyncETSI014Client(url_a, **args_for(pki, "sae-a")) as master:
        await master.status("sae-b")
        runs = [await measure_async(lambda: master.status("sae-b"), opts.n) for _ in range(opts.rounds)]
        report("async status", runs)
        runs = [await measure_async(lambda: master.get_keys("sae-b", 1), opts.n) for _ in range(opts.rounds)]
        report("async enc_keys(1)", runs)


if __name__ == "__main__":
    main()
