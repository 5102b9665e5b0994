"""Where a steady-state connection's CPU goes under concurrent clients (issue 14's throughput goal).

    python benchmarks/bench_steady_cpu.py [--variants IDS] [--rounds 5] [--seconds 1.0] [--clients 8] [--json FILE]

The same set-up as ``hybridkex bench``'s throughput phase (the server in this process, a fixed pool
of handler threads; the clients in the worker process; the simulated KMEs in a process of their
own), but instead of handshakes per second alone it reports the CPU each handshake costs, per
process and per server thread, and the server's context switches.  On a machine where every core
is busy the handshakes per second follow the total CPU per handshake (server + client + KME), and
that is the figure this script's ratios are taken on: it is far less disturbed by other load than
the handshake rate is.  Variants run interleaved round by round; medians over rounds.  Linux only
(``/proc``).  No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import resource
import statistics
import threading
from typing import Any

from hybridkex.bench.env import BenchEnv
from hybridkex.bench.loopback import ClientWorker, LoopbackServer
from hybridkex.bench.variants import select

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> float:
    """User + system CPU seconds from a /proc .../stat file (0.0 when it is gone)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _threads() -> collections.Counter[str]:
    """CPU seconds of this process's threads, by name (numbered pool threads summed)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: collections.Counter[str] = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        out[re.sub(r"[-_]\d+$", "", names.get(int(tid), "other"))] += _stat_cpu(f"/proc/self/task/{tid}/stat")
    return out


def _children(exclude: int) -> list[int]:
    pids = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return [p for p in pids if p != exclude]


def measure(ids: list[str], rounds: int, seconds: float, clients: int) -> dict[str, dict[str, Any]]:
    variants = select(ids)
    rows: dict[str, dict[str, list[Any]]] = {v.id: collections.defaultdict(list) for v in variants}
    with BenchEnv(variants) as env, ClientWorker() as worker, contextlib.ExitStack() as stack:
        servers = {}
        for v in variants:
            kit = env.loopback_server(v.id)
            servers[v.id] = stack.enter_context(LoopbackServer(kit.handshake, workers=max(4, clients),
                                                               finish=kit.finish))

        def ask(vid: str, op: str, **kw: Any) -> dict[str, Any]:
            return worker.request({"op": op, "variant": vid, "spec": env.client_spec(vid).to_json(),
                                   "address": list(servers[vid].address), **kw})

        for v in variants:  # warm-up: the first connection of a steady variant is its full handshake
            ask(v.id, "latency", count=20)
        kmes = _children(worker.pid)
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                t0, k0, c0 = _threads(), sum(_stat_cpu(f"/proc/{p}/stat") for p in kmes), \
                    _stat_cpu(f"/proc/{worker.pid}/stat")
                u0 = resource.getrusage(resource.RUSAGE_SELF)
                answer = ask(v.id, "throughput", clients=clients, seconds=seconds)
                u1 = resource.getrusage(resource.RUSAGE_SELF)
                t1, k1, c1 = _threads(), sum(_stat_cpu(f"/proc/{p}/stat") for p in kmes), \
                    _stat_cpu(f"/proc/{worker.pid}/stat")
                n = max(1, answer["handshakes"])
                row = rows[v.id]
                row["hs_per_s"].append(answer["handshakes"] / answer["elapsed_s"])
                row["errors"].append(answer["errors"])
                row["server_ms"].append(sum(t1.values()) - sum(t0.values()))
                row["client_ms"].append(c1 - c0)
                row["kme_ms"].append(k1 - k0)
                row["csw"].append((u1.ru_nvcsw - u0.ru_nvcsw + u1.ru_nivcsw - u0.ru_nivcsw) / n)
                row["threads"].append({k: (t1[k] - t0[k]) / n * 1e3 for k in t1})
                for key in ("server_ms", "client_ms", "kme_ms"):
                    row[key][-1] = row[key][-1] / n * 1e3
    out: dict[str, dict[str, Any]] = {}
    for vid, row in rows.items():
        med = {k: statistics.median(row[k]) for k in ("hs_per_s", "server_ms", "client_ms", "kme_ms", "csw")}
        med["total_ms"] = statistics.median(s + c + k for s, c, k in zip(row["server_ms"], row["client_ms"],
                                                                        row["kme_ms"], strict=True))
        names = {k for t in row["threads"] for k in t}
        med["threads_ms"] = {k: statistics.median(t.get(k, 0.0) for t in row["threads"]) for k in sorted(names)}
        med["errors"] = sum(row["errors"])
        out[vid] = med
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="stdlib-cert,tls-psk,hybridkex-reconnect,hybridkex-1rtt")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    res = measure(a.variants.split(","), a.rounds, a.seconds, a.clients)
    base = res.get("stdlib-cert")
    print(f"{'variant':22s} {'hs/s':>7s} {'x':>5s} | CPU ms per handshake: {'server':>6s} {'client':>6s} "
          f"{'KME':>6s} {'total':>6s} {'x':>5s} | ctx sw/hs")
    for vid, m in res.items():
        hx = m["hs_per_s"] / base["hs_per_s"] if base else float("nan")
        cx = m["total_ms"] / base["total_ms"] if base else float("nan")
        print(f"{vid:22s} {m['hs_per_s']:7.0f} {hx:5.2f} | {'':21s} {m['server_ms']:6.3f} {m['client_ms']:6.3f} "
              f"{m['kme_ms']:6.3f} {m['total_ms']:6.3f} {cx:5.2f} | {m['csw']:.1f}")
    for vid, m in res.items():
        busy = {k: v for k, v in m["threads_ms"].items() if v >= 0.005}
        print(f"  {vid} server threads, ms/handshake: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                   sorted(busy.items(), key=lambda kv: -kv[1])))
        if m["errors"]:
            print(f"  {vid}: {m['errors']} failed handshakes")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
