"""One benchmark run: every phase, in order, on one machine, with the baselines in the same run.

Phases:

1. **CPU in memory**: both ends in this thread over memory pipes (no network); CPU time of the
   thread (``time.thread_time``) per handshake, variants interleaved in rounds (the order rotates
   each round) so that a load change on the machine hits all of them alike; medians over rounds.
   Bytes on the wire and round trips are counted on the memory pipes.
2. **Stage breakdown** of the hybridkex variants (see :mod:`hybridkex.bench.stages`).
3. **Loopback latency**: sequential handshakes from a client worker process to a server in this
   process over 127.0.0.1, interleaved in rounds; median, p95, p99.  A counting proxy checks the
   bytes and round trips on real sockets.
4. **Throughput**: ``clients`` concurrent client threads (in the worker process) against the
   server for a fixed time; handshakes per second.
5. Optional: latency through a **delaying proxy** that adds a round-trip time.
"""

from __future__ import annotations

import contextlib
import os
import platform
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from OpenSSL import SSL

from .. import __version__
from ..tunnel.ktls import ktls_status
from .endpoints import pump
from .env import BenchEnv
from .loopback import ClientWorker, DelayProxy, LoopbackServer
from .progress import Progress
from .stages import STAGES, StageClock
from .stats import spread, summarize
from .variants import Variant, select
from .wire import WireLog

__all__ = ["BenchOptions", "run_benchmark"]


@dataclass
class BenchOptions:
    """How much to measure.  The defaults take a few minutes; :meth:`quick` well under one."""

    #: Variant id patterns (shell wildcards); None: all.
    variants: tuple[str, ...] | None = None
    #: Suite names: the headline hybridkex variant is also measured with each (variants.suite_variant).
    suites: tuple[str, ...] = ()
    #: Interleaved rounds of the in-memory CPU measurement.
    rounds: int = 7
    #: Most handshakes per variant and round.
    n: int = 200
    #: Time budget per variant and round (fewer handshakes for slow variants).
    round_seconds: float = 0.25
    #: Warm-up handshakes per variant before measuring (not counted).
    warmup: int = 20
    #: Handshakes per hybridkex variant in the stage breakdown (time-capped like the rounds).
    breakdown: int = 100
    #: Loopback: run the socket phases at all.
    loopback: bool = True
    #: Loopback latency samples per variant (over all rounds), and the rounds.
    samples: int = 200
    latency_rounds: int = 4
    #: Time cap per variant for its latency samples.
    latency_seconds: float = 4.0
    #: Concurrent clients and duration of the throughput measurement (0 clients: skip it).
    clients: int = 8
    throughput_seconds: float = 1.5
    #: Round-trip time the delaying proxy adds, ms (0: no proxy phase).
    proxy_rtt_ms: float = 0.0
    quick_mode: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        """A smoke run of every variant that finishes in well under a minute."""
        base = cls(rounds=3, n=40, round_seconds=0.06, warmup=5, breakdown=20, samples=40, latency_rounds=2,
                   latency_seconds=0.8, clients=4, throughput_seconds=0.4, quick_mode=True)
        for k, v in overrides.items():
            setattr(base, k, v)
        return base


@dataclass
class _Row:
    variant: Variant
    cpu_rounds: list[float] = field(default_factory=list)
    wall_rounds: list[float] = field(default_factory=list)
    n_per_round: int = 0
    wire: dict[str, int] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    loopback_wire: dict[str, int] | None = None
    breakdown: dict[str, float] | None = None
    latency: list[float] = field(default_factory=list)
    latency_errors: int = 0
    latency_error_text: str = ""
    throughput: float | None = None
    throughput_errors: int = 0
    proxy_latency: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _versions() -> dict[str, str]:
    out = {"hybridkex": __version__, "python": platform.python_version(),
           "python_implementation": platform.python_implementation(), "stdlib_openssl": ssl.OPENSSL_VERSION}
    for name, module in (("cryptography", "cryptography"), ("pyOpenSSL", "OpenSSL"), ("aiohttp", "aiohttp"),
                         ("matplotlib", "matplotlib")):
        try:
            mod = __import__(module)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    with contextlib.suppress(Exception):
        out["pyopenssl_openssl"] = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    # kTLS is a fact about this kernel and OpenSSL build, as the CPU is (cached: probed once per process).
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "loadavg_start": load,
            "ktls": ktls_status().as_dict()}


class _Bench:
    def __init__(self, opts: BenchOptions, variants: tuple[Variant, ...], progress: Progress,
                 log: Callable[[str], None]) -> None:
        self.o = opts
        self.variants = variants
        self.progress = progress
        self.log = log
        self.rows = {v.id: _Row(v) for v in variants}

    # --- 1. CPU in memory -------------------------------------------------------------------------

    def cpu_phase(self, env: BenchEnv) -> None:
        o, p = self.o, self.progress
        p.phase("CPU in memory (warm-up)")
        per_hs_wall: dict[str, float] = {}
        for v in self.variants:
            client, server = env.memory_client(v.id), env.server(v.id)
            t0 = time.perf_counter()
            for _ in range(max(o.warmup, 1)):
                pump(client.memory_end(), server.memory_end())
            per_hs_wall[v.id] = (time.perf_counter() - t0) / max(o.warmup, 1)
            # Counted after the warm-up: a reconnect needs its first full handshake, recycled keys
            # their bootstrap, before a handshake looks like every later one.
            wire = WireLog()
            c_end = client.memory_end()
            pump(c_end, server.memory_end(), wire)
            self.rows[v.id].wire = wire.summary().as_dict()
            self.rows[v.id].facts = c_end.facts()
            # Slow variants (waiting on a KME) get fewer handshakes per round, never fewer than 3.
            n = max(3, min(o.n, int(o.round_seconds / max(per_hs_wall[v.id], 1e-6))))
            self.rows[v.id].n_per_round = n
            p.step(v.id)
        p.phase("CPU in memory")
        order = list(self.variants)
        for r in range(o.rounds):
            for v in order:
                row = self.rows[v.id]
                client, server = env.memory_client(v.id), env.server(v.id)
                n = row.n_per_round
                c0, w0 = time.thread_time(), time.perf_counter()
                for _ in range(n):
                    pump(client.memory_end(), server.memory_end())
                row.cpu_rounds.append((time.thread_time() - c0) / n * 1e3)
                row.wall_rounds.append((time.perf_counter() - w0) / n * 1e3)
                p.step(f"round {r + 1}/{o.rounds} {v.id}")
            order = order[1:] + order[:1]  # rotate: no variant always runs first after a pause

    # --- 2. stage breakdown -----------------------------------------------------------------------

    def breakdown_phase(self, env: BenchEnv) -> None:
        self.progress.phase("stage breakdown")
        for v in self.variants:
            row = self.rows[v.id]
            if not v.is_hybridkex:
                row.breakdown = {"tls": statistics.median(row.wall_rounds)} if row.wall_rounds else None
                self.progress.step(v.id)
                continue
            client, server = env.memory_client(v.id), env.server(v.id)
            deadline = time.perf_counter() + max(self.o.round_seconds * 4, 0.2)
            per_handshake: list[dict[str, float]] = []
            missing: list[str] = []
            for i in range(self.o.breakdown):
                clock = StageClock()
                with clock.instrument():
                    c, s = client.memory_end(clock), server.memory_end(clock)
                    clock.begin()
                    pump(c, s)
                    clock.end()
                per_handshake.append(clock.per_handshake_ms())
                missing = clock.missing
                if i >= 2 and time.perf_counter() > deadline:
                    break
            # Median per stage: one handshake hit by a garbage collection or a busy neighbour must
            # not dominate the picture.
            row.breakdown = {st: statistics.median(h[st] for h in per_handshake) for st in STAGES}
            if missing:
                row.notes.append("breakdown: not wrapped (counted as other): " + ", ".join(missing))
            self.progress.step(v.id)

    # --- 3-5. loopback ----------------------------------------------------------------------------

    def loopback_phases(self, env: BenchEnv) -> None:
        o, p = self.o, self.progress
        net = [v for v in self.variants if v.loopback]
        for v in self.variants:
            if not v.loopback:
                self.rows[v.id].notes.append("in-memory key link: measured in memory only (no loopback run)")
        if not net:
            return
        p.phase("loopback: starting client worker")
        servers: dict[str, LoopbackServer] = {}
        with contextlib.ExitStack() as stack:
            worker = stack.enter_context(ClientWorker())
            for v in net:
                kit = env.loopback_server(v.id)
                servers[v.id] = stack.enter_context(LoopbackServer(kit.handshake, workers=max(4, o.clients),
                                                                   finish=kit.finish))
            self._latency(env, worker, servers, net)
            self._wire_check(env, worker, servers, net)
            if o.clients > 0:
                self._throughput(env, worker, servers, net)
            if o.proxy_rtt_ms > 0:
                self._proxy(env, worker, servers, net)
            for v in net:
                srv = servers[v.id]
                if srv.failed:
                    self.rows[v.id].notes.append(f"server: {srv.failed} failed handshakes ({srv.last_error})")

    def _ask(self, worker: ClientWorker, env: BenchEnv, v: Variant, address: tuple[str, int],
             count: int) -> dict[str, Any]:
        return worker.request({"op": "latency", "variant": v.id, "spec": env.client_spec(v.id).to_json(),
                               "address": list(address), "count": count})

    def _latency(self, env: BenchEnv, worker: ClientWorker, servers: dict[str, LoopbackServer],
                 net: list[Variant]) -> None:
        o, p = self.o, self.progress
        p.phase("loopback latency")
        per_round: dict[str, int] = {}
        for v in net:  # warm-up, and size each variant's rounds to the time cap
            t0 = time.perf_counter()
            self._ask(worker, env, v, servers[v.id].address, max(3, o.warmup // 4))
            each = (time.perf_counter() - t0) / max(3, o.warmup // 4)
            total = max(o.latency_rounds * 5, min(o.samples, int(o.latency_seconds / max(each, 1e-6))))
            per_round[v.id] = max(5, total // o.latency_rounds)
            p.step(f"warm-up {v.id}")
        order = list(net)
        for r in range(o.latency_rounds):
            for v in order:
                row = self.rows[v.id]
                answer = self._ask(worker, env, v, servers[v.id].address, per_round[v.id])
                row.latency += answer["samples_ms"]
                row.latency_errors += answer["errors"]
                row.latency_error_text = answer["last_error"] or row.latency_error_text
                p.step(f"round {r + 1}/{o.latency_rounds} {v.id}")
            order = order[1:] + order[:1]

    def _wire_check(self, env: BenchEnv, worker: ClientWorker, servers: dict[str, LoopbackServer],
                    net: list[Variant]) -> None:
        self.progress.phase("loopback bytes and round trips (counting proxy)")
        for v in net:
            with DelayProxy(servers[v.id].address) as proxy:
                # The client keeps its connection open while the proxy's count is read, so that only
                # the connection setup (and what the server sends right after it) is counted, not
                # the close_notify alerts of closing.
                # Twice: the second connection is the steady state (a reconnect ticket is kept per
                # address, so the first one through the proxy is a full handshake).
                logs = []
                for _ in range(2):
                    worker.request({"op": "hold", "variant": v.id, "spec": env.client_spec(v.id).to_json(),
                                    "address": list(proxy.address)})
                    logs = _settled(proxy)
                    worker.request({"op": "release"})
            if logs:
                self.rows[v.id].loopback_wire = logs[-1].as_dict()
            self.progress.step(v.id)

    def _throughput(self, env: BenchEnv, worker: ClientWorker, servers: dict[str, LoopbackServer],
                    net: list[Variant]) -> None:
        o = self.o
        self.progress.phase(f"throughput, {o.clients} concurrent clients")
        for v in net:
            answer = worker.request({"op": "throughput", "variant": v.id, "spec": env.client_spec(v.id).to_json(),
                                     "address": list(servers[v.id].address), "clients": o.clients,
                                     "seconds": o.throughput_seconds})
            row = self.rows[v.id]
            row.throughput = answer["handshakes"] / answer["elapsed_s"]
            row.throughput_errors = answer["errors"]
            self.progress.step(v.id)

    def _proxy(self, env: BenchEnv, worker: ClientWorker, servers: dict[str, LoopbackServer],
               net: list[Variant]) -> None:
        o = self.o
        self.progress.phase(f"latency through a proxy adding {o.proxy_rtt_ms:g} ms RTT")
        count = max(5, min(o.samples // 4, 40))
        for v in net:
            with DelayProxy(servers[v.id].address, one_way=o.proxy_rtt_ms / 2000) as proxy:
                answer = self._ask(worker, env, v, proxy.address, count)
            self.rows[v.id].proxy_latency = answer["samples_ms"]
            self.progress.step(v.id)

    # --- results ----------------------------------------------------------------------------------

    def results(self) -> list[dict[str, Any]]:
        out = []
        for v in self.variants:
            r = self.rows[v.id]
            lat = summarize(r.latency) if r.latency else None
            d: dict[str, Any] = v.describe()
            d.update(
                cpu_ms_median=statistics.median(r.cpu_rounds) if r.cpu_rounds else None,
                cpu_ms_rounds=[round(x, 4) for x in r.cpu_rounds],
                cpu_noise=round(spread(r.cpu_rounds), 4),
                wall_memory_ms_median=statistics.median(r.wall_rounds) if r.wall_rounds else None,
                handshakes_per_round=r.n_per_round,
                latency_ms_median=lat["median"] if lat else None,
                latency_ms_p95=lat["p95"] if lat else None,
                latency_ms_p99=lat["p99"] if lat else None,
                latency_samples=len(r.latency),
                latency_errors=r.latency_errors,
                handshakes_per_s=r.throughput,
                throughput_errors=r.throughput_errors,
                proxy_latency_ms_median=statistics.median(r.proxy_latency) if r.proxy_latency else None,
                breakdown_ms=r.breakdown,
                established=r.facts,
                loopback_wire=r.loopback_wire,
                latency_ms_samples=[round(x, 4) for x in r.latency],
                notes=r.notes + ([f"loopback client errors: {r.latency_errors} ({r.latency_error_text})"]
                                 if r.latency_errors else []),
            )
            d.update(r.wire)
            out.append(d)
        return out


def _settled(proxy: DelayProxy, timeout: float = 3.0) -> list[Any]:
    """The proxy's counts once nothing has moved for 0.15 s: post-handshake records (a session
    ticket) arrive after the client is done, later still on a loaded machine."""
    deadline = time.monotonic() + timeout
    last: tuple[int, ...] = ()
    quiet_since = time.monotonic()
    while True:
        logs = proxy.live_logs()
        now = tuple(s.total for s in logs)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= 0.15 or time.monotonic() > deadline:
            return logs
        time.sleep(0.03)


def _goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["id"]: r for r in rows}

    def val(vid: str, key: str) -> float | None:
        x = by.get(vid, {}).get(key)
        return float(x) if isinstance(x, int | float) else None

    goals: list[dict[str, Any]] = []
    a, e = val("stdlib-cert", "cpu_ms_median"), val("hybridkex", "cpu_ms_median")
    goals.append({
        "id": "cpu-vs-stdlib-cert",
        "text": "full hybridkex CPU per handshake (both ends, in memory) <= 1.0x the stdlib certificate handshake",
        "numerator": "hybridkex", "denominator": "stdlib-cert", "limit": 1.0,
        "ratio": e / a if a and e else None,
    })
    for key, what in (("latency_ms_median", "loopback latency"), ("wall_memory_ms_median", "in-memory wall time")):
        pool, none = val("hybridkex-kme5ms-pool", key), val("hybridkex-no-qkd", key)
        goals.append({
            "id": f"qkd-pool-overhead-{'loopback' if key.startswith('latency') else 'memory'}",
            "text": f"QKD with the pool adds <= 5% {what} over hybridkex without QKD, KME latency 5 ms",
            "numerator": "hybridkex-kme5ms-pool", "denominator": "hybridkex-no-qkd", "limit": 1.05,
            "ratio": pool / none if pool and none else None,
        })
        epoch = val("hybridkex-epoch-kme5ms", key)
        goals.append({
            "id": f"qkd-epoch-overhead-{'loopback' if key.startswith('latency') else 'memory'}",
            "text": f"(same with the epoch key budget) {what}, KME latency 5 ms",
            "numerator": "hybridkex-epoch-kme5ms", "denominator": "hybridkex-no-qkd", "limit": 1.05,
            "ratio": epoch / none if epoch and none else None,
        })
    goals += _steady_goals(val)
    for g in goals:
        g["met"] = None if g["ratio"] is None else bool(g["ratio"] <= g["limit"])
    return goals


def _steady_goals(val: Callable[[str, str], float | None]) -> list[dict[str, Any]]:
    """Issue 14's goals for the steady state (hybridkex-1rtt) and the full handshake."""

    def ratio(num: str, den: str, key: str) -> float | None:
        a, b = val(num, key), val(den, key)
        return a / b if a is not None and b else None

    def goal(gid: str, text: str, num: str, den: str, *, key: str, limit: float,
             inverse: bool = False) -> dict[str, Any]:
        r = ratio(den, num, key) if inverse else ratio(num, den, key)
        return {"id": gid, "text": text, "numerator": num, "denominator": den, "limit": limit, "ratio": r}

    rt = val("hybridkex-1rtt", "round_trips")
    psk_bytes, one_bytes = val("tls-psk", "bytes_on_wire"), val("hybridkex-1rtt", "bytes_on_wire")
    return [
        {"id": "1rtt-round-trips", "text": "a steady-state connection counts 1 round trip",
         "numerator": "hybridkex-1rtt", "denominator": None, "limit": 1.0, "ratio": rt},
        goal("1rtt-cpu", "steady-state CPU (both ends, in memory) <= 0.9x stdlib-cert", "hybridkex-1rtt",
             "stdlib-cert", key="cpu_ms_median", limit=0.9),
        goal("1rtt-latency", "steady-state loopback latency <= 1.0x stdlib-cert", "hybridkex-1rtt", "stdlib-cert",
             key="latency_ms_median", limit=1.0),
        # Written as stdlib / steady so that <= 1.0 means "at least as many handshakes per second".
        goal("1rtt-throughput", "steady-state handshakes/s with concurrent clients >= 1.0x stdlib-cert "
             "(ratio: stdlib-cert / hybridkex-1rtt)", "hybridkex-1rtt", "stdlib-cert", key="handshakes_per_s",
             limit=1.0, inverse=True),
        {"id": "1rtt-bytes", "text": "steady-state bytes on the wire <= tls-psk + 300 (ratio: bytes / (tls-psk + 300))",
         "numerator": "hybridkex-1rtt", "denominator": "tls-psk", "limit": 1.0,
         "ratio": one_bytes / (psk_bytes + 300) if one_bytes is not None and psk_bytes is not None else None},
        goal("1rtt-kme-off-critical-path", "steady-state loopback latency with KME +5 ms <= 1.05x at 0 ms",
             "hybridkex-1rtt-kme5ms", "hybridkex-1rtt", key="latency_ms_median", limit=1.05),
        goal("full-cpu-2x", "full hybridkex handshake CPU <= 2.0x stdlib-cert", "hybridkex", "stdlib-cert",
             key="cpu_ms_median", limit=2.0),
    ]


def run_benchmark(opts: BenchOptions, *, progress: bool = True, log: Callable[[str], None] | None = None,
                  command: str = "") -> dict[str, Any]:
    """Run the benchmark and return the report (a JSON-ready dict)."""
    variants = select(opts.variants, opts.suites)
    loop_n = sum(1 for v in variants if v.loopback) if opts.loopback else 0
    total = (len(variants) * (opts.rounds + 2) + loop_n * (1 + opts.latency_rounds + 1)
             + (loop_n if opts.clients > 0 else 0) + (loop_n if opts.proxy_rtt_ms > 0 else 0))
    bar = Progress(total, enabled=progress)
    started = time.time()
    machine = _machine()
    bench = _Bench(opts, variants, bar, log or (lambda _m: None))
    try:
        bar.phase("set-up (certificates, simulated KMEs, key pools)")
        with BenchEnv(variants) as env:
            bench.cpu_phase(env)
            bench.breakdown_phase(env)
            if opts.loopback:
                bench.loopback_phases(env)
            env_info = env.info()
    finally:
        bar.close()
    with contextlib.suppress(OSError, AttributeError):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = bench.results()
    noise = [r["cpu_noise"] for r in rows if r["cpu_ms_rounds"]]
    return {
        "schema": "hybridkex-bench/1",
        "command": command or " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine,
        "versions": _versions(),
        "options": asdict(opts),
        "method": {
            "cpu": "time.thread_time of the one thread that drives both ends over memory pipes; the KME "
                   "server and the key pool's refill thread are other threads and not counted",
            "latency": "client-side wall time from TCP connect to a verified TLS session, sequential, client "
                       "in a separate process, server in this one, 127.0.0.1, TCP_NODELAY",
            "throughput": f"{opts.clients} client threads in the worker process, server with "
                          f"{max(4, opts.clients)} handler threads, both on this machine",
            "rounds": "variants interleaved in rounds with a rotating order; medians over rounds",
            "noise": "cpu_noise = (max - min) / median of the per-round CPU values",
        },
        "environment": env_info,
        "noise_cpu_median": statistics.median(noise) if noise else None,
        "noise_cpu_max": max(noise) if noise else None,
        "variants": rows,
        "goals": _goals(rows),
    }
