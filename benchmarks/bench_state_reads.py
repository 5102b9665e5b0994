"""What a flood of steady-state identities for unknown parents costs the shared state, with and without the gate.

    python benchmarks/bench_state_reads.py [--n 2000] [--addresses 50]

PostgreSQL 16 is started by pgserver in a temporary directory (as in bench_state.py).  One server
registry (``SteadyRegistry``, what a server process runs) on that state is sent ``--n`` well-formed
steady-state identities naming random parents, from ``--addresses`` client addresses, as fast as
one thread can claim them.  Once with the read gate off (``StateReads(rate=0, address_rate=0)``:
every identity is one read, as before the gate) and once with the defaults.  Reported: database
reads (``get_ticket`` calls, counted at the real state object), the wall time of the flood, and, as
the normal path, the median claim of a known parent (in memory) in the same run.  No assertions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from hybridkex import Policy, get_suite
from hybridkex.combiner import CombinedSecret
from hybridkex.io.config import StateReads, SteadyPolicy
from hybridkex.protocol import SessionInfo
from hybridkex.state import SharedState, open_state
from hybridkex.steady import SteadyRegistry, SteadyTicket
from hybridkex.steady.derive import SteadyIdentity

SUITE = get_suite("x25519-mlkem768-hkdfsha256")  # no QKD: the claim's own cost, no key source in the way
SEAL_KEY = os.urandom(32)


class Counting:
    """The real state; its parent reads counted."""

    def __init__(self, state: SharedState) -> None:
        self._state = state
        self.reads = 0

    def get_ticket(self, kind: str, handle: bytes) -> Any:
        self.reads += 1
        return self._state.get_ticket(kind, handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def _info(role: str) -> SessionInfo:
    local, peer = ("client", "server") if role == "initiator" else ("server", "client")
    return SessionInfo(
        version=1, role=role, suite=SUITE.name, offered_suites=(SUITE.name,), local_identity=local,  # type: ignore[arg-type]
        peer_identity=peer, auth_mode="psk", components=(), qkd_used=False, qkd_usage="none",
        qkd_policy="disabled", qkd_key_ids=(), master_sae_id=None, slave_sae_id=None, master_kme_id=None,
        slave_kme_id=None, qkd_note=None, transcript_hash="00")


def run(url: str, reads: StateReads, n: int, addresses: int) -> tuple[int, float, float]:
    """(database reads, flood seconds, median known-parent claim in microseconds)."""
    counted = Counting(open_state(url, seal_key=SEAL_KEY))
    try:
        policy, qkd = SteadyPolicy(announce=0), Policy(qkd="disabled", suites=(SUITE.name,))
        registry = SteadyRegistry(policy, qkd, None, state=counted, reads=reads)  # type: ignore[arg-type]
        forged = [SteadyIdentity(os.urandom(16), 1, False, (), ()).encode(os.urandom(32), SUITE) for _ in range(n)]
        start = time.perf_counter()
        for i, identity in enumerate(forged):
            registry.claim(identity, SUITE.tls_cipher, source=f"198.51.100.{i % addresses}")
        flood = time.perf_counter() - start
        flood_reads = counted.reads
        raw = os.urandom(32)
        registry.register(CombinedSecret(SUITE, raw), _info("responder"))
        ticket = SteadyTicket(CombinedSecret(SUITE, raw), _info("initiator"), policy, qkd, None)
        known = []
        for _ in range(200):
            attempt = ticket.take()
            assert attempt is not None
            identity = attempt.credentials()[0]
            t = time.perf_counter()
            registry.claim(identity, SUITE.tls_cipher, source="198.51.100.1")
            known.append(time.perf_counter() - t)
        return flood_reads, flood, statistics.median(known) * 1e6
    finally:
        counted.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=2000, help="forged identities per variant")
    parser.add_argument("--addresses", type=int, default=50, help="client addresses they come from")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver  # the [test] extra: a real PostgreSQL 16
    root = Path(tempfile.mkdtemp(prefix="hkx-bench-reads-"))
    pg = pgserver.get_server(root / "data", cleanup_mode="delete")
    try:
        import psycopg

        with psycopg.connect(pg.get_uri(), autocommit=True) as c:
            c.execute("CREATE DATABASE bench")
        url = str(pg.get_uri("bench"))
        print(f"{args.n} identities for random parents from {args.addresses} addresses, PostgreSQL 16 (pgserver)")
        for name, reads in (("gate off (rate=0, address_rate=0)", StateReads(rate=0, address_rate=0)),
                            ("defaults (20/s burst 100; 2/s burst 20 per address)", StateReads())):
            db, flood, known = run(url, reads, args.n, args.addresses)
            print(f"  {name}: {db} database reads, flood {flood:.2f} s ({flood / args.n * 1e3:.3f} ms per "
                  f"identity); known parent's claim, median {known:.0f} us")
    finally:
        pg.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
