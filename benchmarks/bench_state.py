"""What a shared state costs a steady-state connection: none vs SQLite vs PostgreSQL, on loopback.

    python benchmarks/bench_state.py [--n 100] [--rounds 5] [--quick] [--json FILE]

PostgreSQL 16 is started by pgserver in a temporary directory (Unix socket, fsync on, as shipped).
Three in-process HybridServers (steady state on, announced keys pre-fetched, QKD from the in-memory
link) differ only in ``ServerConfig.state``: none, an SQLite file, a PostgreSQL database.  One
client each makes its full handshake, then each sample is one steady-state connection (TLS 1.3
only, one round trip), a one-byte echo and close.  Variants are interleaved round by round so drift
hits all alike.  Also measured, the same way: one ``spend_claim`` (the steady-state connection's
whole database cost: one transaction) per backend, PostgreSQL with ``synchronous_commit=off`` (what
the WAL flush costs), and the largest event-loop stall of an asyncio server with PostgreSQL when
its claims run on the loop (before) and on a worker thread (after).

The issue's goal, as a ratio measured in this run: PostgreSQL adds <= 10% to a steady-state
connection's latency over SQLite.  No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridkex import Policy, QKDConfig
from hybridkex.api import (
    ClientConfig,
    HybridClient,
    HybridServer,
    HybridSocket,
    ReconnectPolicy,
    ServerConfig,
    SteadyPolicy,
    start_server,
)
from hybridkex.bench.stats import quantile
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import MemoryKeyLink
from hybridkex.state import SharedState, open_state

SEAL_KEY = os.urandom(32)


def configs(link: MemoryKeyLink, announce: int | None = None) -> tuple[ClientConfig, ServerConfig]:
    psk = os.urandom(32)
    ini = InitiatorConfig("bench-client", [PSKAuthenticator({"bench-server": psk})], Policy(),
                          QKDConfig("sae-c", "kme-c"), peer_identity="bench-server")
    res = ResponderConfig("bench-server", [PSKAuthenticator({"bench-client": psk})], Policy(),
                          QKDConfig("sae-s", "kme-s"))
    steady = SteadyPolicy() if announce is None else SteadyPolicy(announce=announce)
    return ClientConfig(ini, steady=steady), ServerConfig(res, steady=steady)


def echo_one(conn: HybridSocket, address: Any) -> None:
    data = conn.recv(1)
    if data:
        conn.sendall(data)


def steady_once(client: HybridClient, address: Any) -> None:
    with client.connect(address) as s:
        if s.session.steady is None:
            raise RuntimeError("expected a steady-state connection")
        s.sendall(b"x")
        s.recv(1)


def ms(samples: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(samples) * 1e3, 3), "p95_ms": round(quantile(samples, 0.95) * 1e3, 3)}


def loop_stall(state: SharedState, *, off_loop: bool, n: int, reconnect: bool = False) -> float:
    """The largest gap (ms) between 1 ms ticks of an asyncio server's loop while ``n`` steady-state
    connections (``reconnect``: reconnect tickets, the steady state off) are served with ``state``;
    ``off_loop=False`` makes their state calls on the loop (before)."""
    link = MemoryKeyLink(("kme-c", "kme-s"), max_keys=10_000_000)
    client_cfg, server_cfg = configs(link)
    if reconnect:
        off, rc = SteadyPolicy(enabled=False), ReconnectPolicy(enabled=True, max_uses=max(n, 1))
        client_cfg = dataclasses.replace(client_cfg, steady=off, reconnect=rc)
        server_cfg = dataclasses.replace(server_cfg, steady=off, reconnect=rc)
    cfg = dataclasses.replace(server_cfg, state=state, purge_every=0)
    worst = 0.0

    async def echo(reader: Any, writer: Any) -> None:
        data = await reader.read(1)
        if data:
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main() -> None:
        nonlocal worst
        srv = await start_server(echo, "127.0.0.1", 0, cfg, key_source=link.source("sae-s", 1))
        registry = srv.reconnect_registry if reconnect else srv.steady_registry
        assert registry is not None
        registry.off_loop = off_loop
        address = srv.sockets[0].getsockname()
        client = HybridClient(client_cfg, key_source=link.source("sae-c", 0))
        done = threading.Event()

        def drive() -> None:
            with client.connect(address) as s:  # the full handshake
                s.sendall(b"x")
                s.recv(1)
            for _ in range(n):
                if reconnect:
                    with client.connect(address) as s:
                        if not s.session.reconnect:
                            raise RuntimeError("expected a reconnect")
                        s.sendall(b"x")
                        s.recv(1)
                else:
                    steady_once(client, address)
            done.set()

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now
        t.join()
        srv.close()

    asyncio.run(main())
    return round(worst * 1e3, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="connections per variant and round (default 100)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (n=10, one round)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--announce", type=int, help="steady.announce (default: the policy's; 0: no pre-fetch, "
                        "each key fetched on demand, so no announced key is shared through the state)")
    parser.add_argument("--stall-only", action="store_true", help="only the event-loop stalls (steady state and "
                        "reconnect tickets, before/after, PostgreSQL)")
    args = parser.parse_args(argv)
    n, rounds = (10, 1) if args.quick else (args.n, args.rounds)

    import pgserver  # the [test] extra: a real PostgreSQL 16

    root = Path(tempfile.mkdtemp(prefix="hkx-bench-pg-"))
    pg = pgserver.get_server(root / "data", cleanup_mode="delete")
    try:
        import psycopg

        with psycopg.connect(pg.get_uri(), autocommit=True) as c:
            c.execute("CREATE DATABASE bench")
        pg_url = str(pg.get_uri("bench"))
        async_url = pg_url + ("&" if "?" in pg_url else "?") + "options=-csynchronous_commit%3Doff"
        states: dict[str, SharedState | None] = {
            "none": None,
            "sqlite": open_state(root / "state.sqlite3", seal_key=SEAL_KEY),
            "postgresql": open_state(pg_url, seal_key=SEAL_KEY),
        }
        if args.stall_only:
            pg_state = states["postgresql"]
            assert pg_state is not None
            runs: dict[str, list[float]] = {}
            for _ in range(rounds):  # interleaved: drift hits before and after alike
                for kind in ("steady", "reconnect"):
                    for where, off in (("on the loop (before)", False), ("worker thread (after)", True)):
                        runs.setdefault(f"{kind}, {where}", []).append(
                            loop_stall(pg_state, off_loop=off, n=n, reconnect=kind == "reconnect"))
            out = {"max_event_loop_stall_ms": runs,
                   "conditions": {"n": n, "rounds": rounds, "cpus": os.cpu_count(), "load": os.getloadavg()}}
            print(json.dumps(out, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            for st in states.values():
                if st is not None:
                    st.close()
            return 0
        async_pg = open_state(async_url, seal_key=SEAL_KEY)
        link = MemoryKeyLink(("kme-c", "kme-s"), max_keys=10_000_000)
        client_cfg, server_cfg = configs(link, args.announce)
        servers, clients = {}, {}
        for name, state in states.items():
            cfg = dataclasses.replace(server_cfg, state=state)
            servers[name] = HybridServer(("127.0.0.1", 0), cfg, echo_one, key_source=link.source("sae-s", 1)).start(
                0.05)
            clients[name] = HybridClient(client_cfg, key_source=link.source("sae-c", 0))
        try:
            conn: dict[str, Callable[[], None]] = {}
            for name, srv in servers.items():
                address, client = srv.server_address, clients[name]
                with client.connect(address) as s:  # the full handshake: the parent
                    s.sendall(b"x")
                    s.recv(1)
                conn[name] = lambda c=client, a=address: steady_once(c, a)  # type: ignore[misc]
            claim_states = {"sqlite": states["sqlite"], "postgresql": states["postgresql"],
                            "postgresql-async-commit": async_pg}
            counters = dict.fromkeys(claim_states, 0)

            def claim(name: str) -> Callable[[], None]:
                st = claim_states[name]
                assert st is not None

                def go() -> None:
                    counters[name] += 1
                    why = st.spend_claim(f"bench:steady:{name}", counters[name], "bench:qkd", [str(uuid.uuid4())])
                    if why is not None:
                        raise RuntimeError(f"refused: {why}")
                return go

            claims = {name: claim(name) for name in claim_states}
            for fn in [*conn.values(), *claims.values()]:  # warm-up: caches, prepared statements
                for _ in range(5):
                    fn()
            samples: dict[str, list[float]] = {k: [] for k in [*conn, *(f"spend_claim/{c}" for c in claims)]}
            per_round: dict[str, list[float]] = {k: [] for k in samples}
            for _ in range(rounds):
                for label, fn in [*conn.items(), *((f"spend_claim/{c}", f) for c, f in claims.items())]:
                    batch = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        fn()
                        batch.append(time.perf_counter() - t0)
                    samples[label] += batch
                    per_round[label].append(statistics.median(batch))
        finally:
            for srv in servers.values():
                srv.close()
        stall = {f"{kind}, {where}": loop_stall(states["postgresql"], off_loop=off, n=n,  # type: ignore[arg-type]
                                                reconnect=kind == "reconnect")
                 for kind in ("steady", "reconnect")
                 for where, off in (("on the loop (before)", False), ("worker thread (after)", True))}
        for st in [*states.values(), async_pg]:
            if st is not None:
                st.close()
    finally:
        pg.cleanup()

    results: dict[str, Any] = {k: ms(v) | {"round_medians_ms": [round(x * 1e3, 3) for x in per_round[k]]}
                               for k, v in samples.items()}
    sq, pq, none = (statistics.median(samples[k]) for k in ("sqlite", "postgresql", "none"))
    ratios = [p / s for p, s in zip(per_round["postgresql"], per_round["sqlite"], strict=True)]
    results["goal"] = {"postgresql_over_sqlite": round(pq / sq - 1, 3),
                       "per_round": [round(r - 1, 3) for r in ratios], "target": 0.10, "met": pq / sq - 1 <= 0.10,
                       "sqlite_over_none": round(sq / none - 1, 3)}
    results["max_event_loop_stall_ms"] = stall
    results["conditions"] = {"n": n, "rounds": rounds, "announce": args.announce, "cpus": os.cpu_count(),
                             "load": os.getloadavg(), "python": sys.version.split()[0]}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
