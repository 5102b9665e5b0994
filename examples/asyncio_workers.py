"""Several asyncio server processes on one port, sharing one state: the recipe for the API's servers.

    python examples/asyncio_workers.py [WORKERS]

The tunnel has ``--workers N``; an application on the library does the same itself: each worker
process calls ``hybridkex.start_server(..., reuse_port=True)`` on the same port (the kernel spreads
the connections, SO_REUSEPORT) with a ``ServerConfig(state=...)`` opened on the same SQLite file
(PostgreSQL for several hosts, docs/fleet.md) and the same state key.  The steady-state parents, the
anti-replay counters and the announced QKD keys then live in that state, sealed, so a connection is
one TLS round trip whichever worker it reaches, and a replay to another worker is refused.  A
simulated KME pair (ETSI GS QKD 014 over HTTPS with mutual TLS) serves every process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import hybridkex
from hybridkex import Policy, QKDConfig
from hybridkex.api import ClientConfig, HybridClient, ServerConfig
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import ETSI014Client
from hybridkex.qkd.client import certificate_common_name
from hybridkex.qkd.kme import SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI
from hybridkex.state import open_state


@dataclasses.dataclass(frozen=True)
class Shared:
    """What every process is given: the port, the state and its key, the KME, the bootstrap PSK."""

    port: int
    state_path: str
    seal_key: bytes = dataclasses.field(repr=False)
    pki_dir: str
    kme_urls: tuple[str, str]
    psk: bytes = dataclasses.field(repr=False)


def kme_client(shared: Shared, sae: str) -> ETSI014Client:
    pki = DemoPKI(Path(shared.pki_dir))
    url = shared.kme_urls[0] if sae == "sae-a" else shared.kme_urls[1]
    kme = "kme-a" if sae == "sae-a" else "kme-b"
    return ETSI014Client(url, cert=pki.cert(sae), key=pki.key(sae), ca=pki.ca_cert, sae_id=sae,
                         kme_id=certificate_common_name(pki.cert(kme)))


def qkd(shared: Shared, sae: str) -> QKDConfig:
    kme = "kme-a" if sae == "sae-a" else "kme-b"
    return QKDConfig(sae_id=sae, kme_id=certificate_common_name(DemoPKI(Path(shared.pki_dir)).cert(kme)))


async def answer(reader: Any, writer: Any) -> None:
    """Echo, prefixed by the worker's PID, so the client sees which process served it."""
    data = await reader.read(65536)
    writer.write(b"%d:%s" % (os.getpid(), data))
    await writer.drain()
    await writer.aclose()


def worker(shared: Shared, ready: Any, stop: Any) -> None:
    async def main() -> None:
        responder = ResponderConfig("server.example", [PSKAuthenticator({"client.example": shared.psk})], Policy(),
                                    qkd(shared, "sae-b"))
        with open_state(shared.state_path, seal_key=shared.seal_key) as state, kme_client(shared, "sae-b") as keys:
            config = ServerConfig(responder, state=state)
            server = await hybridkex.start_server(answer, "127.0.0.1", shared.port, config, key_source=keys,
                                                  reuse_port=True)
            ready.put(os.getpid())
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            server.close()
            await server.wait_closed()
    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(workers: int) -> int:
    with tempfile.TemporaryDirectory() as tmp, SimulatedKMEPair.start() as kmes:
        shared = Shared(free_port(), str(Path(tmp) / "state.sqlite3"), secrets.token_bytes(32),
                        str(kmes.pki.directory), (kmes.url_for("sae-a"), kmes.url_for("sae-b")),
                        secrets.token_bytes(32))
        ctx = mp.get_context("spawn")  # fresh interpreters: no event loop, socket or lock inherited
        ready, stop = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=worker, args=(shared, ready, stop)) for _ in range(workers)]
        for p in procs:
            p.start()
        try:
            pids = {ready.get(timeout=60) for _ in procs}
            print(f"{workers} server processes on 127.0.0.1:{shared.port}: PIDs {sorted(pids)}")
            initiator = InitiatorConfig("client.example", [PSKAuthenticator({"server.example": shared.psk})],
                                        Policy(), qkd(shared, "sae-a"), peer_identity="server.example")
            served: dict[int, int] = {}
            one_rtt = 0
            with kme_client(shared, "sae-a") as keys:
                client = HybridClient(ClientConfig(initiator), key_source=keys)
                for i in range(12):
                    with client.connect(("127.0.0.1", shared.port)) as conn:
                        conn.sendall(b"hello %d" % i)
                        pid, _, echoed = conn.recv(65536).partition(b":")
                        steady = conn.session.steady is not None
                    assert echoed == b"hello %d" % i
                    served[int(pid)] = served.get(int(pid), 0) + 1
                    one_rtt += steady
                    print(f"connection {i + 1:2}: served by PID {int(pid)}, "
                          f"{'steady state (one TLS round trip)' if steady else 'full handshake'}")
            print(f"{len(served)} of {workers} processes served; {one_rtt} of 12 connections were one round trip")
            return 0
        finally:
            stop.set()
            for p in procs:
                p.join(30)


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
