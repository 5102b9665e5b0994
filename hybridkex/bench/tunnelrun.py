"""``hybridkex bench tunnel``: the tunnel's data path against a direct connection and stunnel, in one run.

Method:

1. Start the benchmark's own service (:mod:`hybridkex.bench.tunnelload`), the hybridkex tunnel
   pair (client and server processes, QKD required, the simulated KME in a process of its own) and,
   when installed, an stunnel pair (TLS 1.3 external PSK), all on 127.0.0.1.
2. For every round and every load, run the load through each relay in turn (the order rotates
   each round so that a change of machine load hits all of them alike).  Each run opens its
   connections and sends one warm-up request on each before timing starts, so handshakes are not
   part of the data-path numbers.
3. Per relay and load: requests per second and MB/s (medians over rounds); latency percentiles
   over every request batch of every round; CPU of the relay's processes (both ends, from /proc)
   per MB moved, and the cores they kept busy (CPU seconds per second), medians over rounds.
   Ratios are against stunnel measured in the same run.

The load generator runs in this process and shares the machine's cores with the relays: on a
small machine it caps the direct connection's numbers, which are a reference, not a goal.
"""

from __future__ import annotations

import asyncio
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .progress import Progress
from .runner import _machine, _versions
from .stats import spread, summarize
from .tunnelload import LOADS, Load, LoadResult, run_load
from .tunnelprocs import Procs, Relay

__all__ = ["TunnelBenchOptions", "run_tunnel_benchmark"]

SCHEMA = "hybridkex-bench-tunnel/1"


@dataclass
class TunnelBenchOptions:
    """How much to measure.  The defaults take about two minutes; :meth:`quick` well under one."""

    rounds: int = 5
    seconds: float = 2.0
    loads: tuple[str, ...] = tuple(load.id for load in LOADS if not load.reconnect)
    stunnel: bool = True
    #: With uvloop installed, also measure a tunnel pair on asyncio's own event loop.
    asyncio: bool = True
    quick_mode: bool = False
    #: > 1: also a tunnel pair whose server runs this many worker processes (``--workers``), side by side.
    workers: int = 1
    #: The client's worker processes in that pair (``--client-workers``; None: as many as the server's).
    client_workers: int | None = None

    @property
    def workers_relay(self) -> str:
        """The id of the relay with worker processes: ``workers2`` (both ends 2), ``workers2-client1`` ..."""
        client = self.workers if self.client_workers is None else self.client_workers
        return f"workers{self.workers}" + (f"-client{client}" if client != self.workers else "")

    @classmethod
    def quick(cls) -> TunnelBenchOptions:
        return cls(rounds=1, seconds=0.3, asyncio=False, quick_mode=True)


@dataclass
class _Cell:
    rates: list[float] = field(default_factory=list)
    mbps: list[float] = field(default_factory=list)
    cpu_ms_per_mb: list[float] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    error_text: str = ""

    def add(self, r: LoadResult, cpu: float | None) -> None:
        self.errors += r.errors
        if r.errors:
            self.error_text = r.error_text
            return
        self.requests += r.requests
        self.rates.append(r.rate)
        self.mbps.append(r.mb_per_s)
        self.latencies += r.latencies_ms
        if cpu is not None and r.bytes_total:
            self.cpu_ms_per_mb.append(cpu * 1000 / (r.bytes_total / 1e6))
            self.cores.append(cpu / r.seconds)

    def row(self) -> dict[str, Any]:
        lat = summarize(self.latencies)
        return {"rate_median": _median(self.rates), "rate_rounds": self.rates, "rate_noise": spread(self.rates),
                "mb_per_s_median": _median(self.mbps), "cpu_ms_per_mb_median": _median(self.cpu_ms_per_mb),
                "cpu_ms_per_mb_rounds": self.cpu_ms_per_mb, "cores_median": _median(self.cores),
                "latency_ms_p50": lat["median"] if lat["n"] else None,
                "latency_ms_p95": lat["p95"] if lat["n"] else None, "latency_ms_p99": lat["p99"] if lat["n"] else None,
                "latency_samples": lat["n"], "requests": self.requests, "errors": self.errors,
                "error": self.error_text or None}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _measure(relay: Relay, load: Load, seconds: float) -> tuple[LoadResult, float | None]:
    before = relay.cpu() if relay.pids else None
    result = asyncio.run(run_load(relay.port, load, seconds))
    cpu = relay.cpu() - before if before is not None else None
    return result, cpu


def _ratios(rows: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """hybridkex against stunnel per load, and the goals of issue 15 (met or not)."""
    out: dict[str, dict[str, Any]] = {}
    h, s, d = rows.get("hybridkex", {}), rows.get("stunnel", {}), rows.get("direct", {})
    for load_id, hr in h.items():
        sr, dr = s.get(load_id), d.get(load_id)
        entry: dict[str, Any] = {}
        if sr and hr["rate_median"] and sr["rate_median"]:
            entry["rate_vs_stunnel"] = hr["rate_median"] / sr["rate_median"]
        if sr and hr["cpu_ms_per_mb_median"] and sr["cpu_ms_per_mb_median"]:
            entry["cpu_per_mb_vs_stunnel"] = hr["cpu_ms_per_mb_median"] / sr["cpu_ms_per_mb_median"]
        if dr and dr["latency_ms_p50"] is not None:
            entry["added_p50_ms"] = hr["latency_ms_p50"] - dr["latency_ms_p50"]
            if sr and sr["latency_ms_p50"] is not None:
                entry["stunnel_added_p50_ms"] = sr["latency_ms_p50"] - dr["latency_ms_p50"]
        if "rate_vs_stunnel" in entry:
            entry["goal_rate"] = entry["rate_vs_stunnel"] >= 1.0
        if "cpu_per_mb_vs_stunnel" in entry:
            entry["goal_cpu"] = entry["cpu_per_mb_vs_stunnel"] <= 1.5
        if "stunnel_added_p50_ms" in entry:
            entry["goal_latency"] = entry["added_p50_ms"] <= entry["stunnel_added_p50_ms"]
        out[load_id] = entry
    return out


def _worker_ratios(rows: dict[str, dict[str, dict[str, Any]]], opts: TunnelBenchOptions) -> dict[str, dict[str, Any]]:
    """The pair with worker processes against one process per end (issue 16: >= 1.6x) and against
    stunnel (issue 15: >= 1.0x), per load."""
    many, one, st = rows.get(opts.workers_relay, {}), rows.get("hybridkex", {}), rows.get("stunnel", {})
    client = opts.workers if opts.client_workers is None else opts.client_workers
    out: dict[str, dict[str, Any]] = {}
    for load_id, mr in many.items():
        base = one.get(load_id, {}).get("rate_median")
        if mr["rate_median"] and base:
            ratio = mr["rate_median"] / base
            entry: dict[str, Any] = {"workers": opts.workers, "client_workers": client, "relay": opts.workers_relay,
                                     "rate_vs_one_worker": ratio, "goal_rate": ratio >= 1.6}
            stunnel_rate = st.get(load_id, {}).get("rate_median")
            if stunnel_rate:
                entry["rate_vs_stunnel"] = mr["rate_median"] / stunnel_rate
                entry["goal_rate_vs_stunnel"] = entry["rate_vs_stunnel"] >= 1.0
            out[load_id] = entry
    return out


def _method(opts: TunnelBenchOptions, loads: list[Load]) -> dict[str, str]:
    """How each number is measured (printed under the table and kept in the JSON, as the handshake
    benchmark's ``method``)."""
    return {
        "processes": "the service, each relay's two processes and the simulated KME are separate processes on "
                     "127.0.0.1; the load generator runs in the benchmark process and shares the cores",
        "warm-up": "each run opens its connections and answers one request on each before timing starts: "
                   "handshakes are not in these numbers (the handshake benchmark measures them)",
        "rate": "requests per second (a pipelined batch counts each request), median over rounds; MB/s: "
                "request + response bytes",
        "latency": "per request batch (send to last response byte), percentiles over all rounds (inclusive "
                   "quantiles, hybridkex.bench.stats)",
        "cpu": "user + system CPU of both relay processes (all threads, /proc) per MB moved, median over "
               "rounds; cores: those CPU seconds per second of the run",
        "ktls": "not used by any hybridkex relay: the tunnel's TLS runs on memory BIOs, so OpenSSL never owns "
                "the socket; whether this kernel offers kTLS (the tls TCP ULP) and whether pyOpenSSL exposes it "
                "is in machine.ktls; the stunnel pair's configuration does not enable it either (OpenSSL 3 "
                "keeps kTLS off unless SSL_OP_ENABLE_KTLS is set), so both relays encrypt in user space",
        "rounds": f"{opts.rounds} rounds of {opts.seconds:g} s per relay and load ({', '.join(x.id for x in loads)}); "
                  "relays measured in turn, the order rotating each round; ratios against stunnel from the "
                  "same run",
    }


def run_tunnel_benchmark(opts: TunnelBenchOptions, *, progress: bool = True, command: str = "hybridkex bench tunnel",
                         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the data-path benchmark; returns the report (see :mod:`hybridkex.bench.tunnelreport`)."""
    loads = [load for load in LOADS if load.id in opts.loads]
    t0 = time.monotonic()
    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="hybridkex-bench-tunnel-") as tmp:
        procs = Procs(Path(tmp))
        try:
            bar = Progress(2 + opts.rounds * len(loads) * 3, enabled=progress)
            bar.phase("starting the service, the tunnel pair and the simulated KME")
            direct = procs.service()
            relays = [direct, procs.hybridkex(direct.port)]
            if opts.workers > 1:
                client = opts.workers if opts.client_workers is None else opts.client_workers
                relays.append(procs.hybridkex(
                    direct.port, name=opts.workers_relay, workers=opts.workers, client_workers=client,
                    label=f"hybridkex tunnel pair, server --workers {opts.workers}, client --workers {client}"))
            if opts.asyncio and importlib.util.find_spec("uvloop") is not None:
                # The default pair runs on uvloop: also measure asyncio's own loop, for comparison.
                relays.append(procs.hybridkex(direct.port, name="hybridkex-asyncio",
                                              env={"HYBRIDKEX_EVENT_LOOP": "asyncio"}))
            if opts.stunnel:
                st = procs.stunnel(direct.port)
                if st is not None:
                    relays.insert(1, st)
            else:
                procs.notes.append("stunnel baseline skipped (--no-stunnel)")
            bar.step("started", 2)
            bar.total = 2 + opts.rounds * len(loads) * len(relays)
            cells = {(r.id, load.id): _Cell() for r in relays for load in loads}
            for rnd in range(opts.rounds):
                bar.phase(f"round {rnd + 1}/{opts.rounds}")
                for load in loads:
                    k = rnd % len(relays)
                    for relay in relays[k:] + relays[:k]:
                        result, cpu = _measure(relay, load, opts.seconds)
                        cells[(relay.id, load.id)].add(result, cpu)
                        bar.step(f"{load.id} via {relay.id}")
            protocol = procs.stunnel_protocol() if any(r.id == "stunnel" for r in relays) else None
            notes = list(procs.notes)
            stunnel_version = procs.stunnel_version
        finally:
            procs.close()
        bar.close()
    rows: dict[str, dict[str, dict[str, Any]]] = {
        r.id: {load.id: cells[(r.id, load.id)].row() for load in loads} for r in relays}
    machine["loadavg_end"] = _machine()["loadavg_start"]
    return {
        "schema": SCHEMA,
        "command": command,
        "machine": machine,
        "versions": {**_versions(), "stunnel": stunnel_version or None, "stunnel_tls": protocol},
        "options": asdict(opts),
        "loads": [asdict(load) for load in loads],
        "method": _method(opts, loads),
        "relays": [{"id": r.id, "label": r.label, "processes": len(r.pids)} for r in relays],
        "results": rows,
        "vs_stunnel": _ratios(rows),
        "vs_one_worker": _worker_ratios(rows, opts),
        "notes": notes,
        "duration_s": round(time.monotonic() - t0, 1),
    }
