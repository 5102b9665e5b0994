"""Server processes for the fleet tests: a HybridServer or an asyncio server in its own interpreter,
sharing a state (SQLite file, PostgreSQL) and a real simulated KME pair (ETSI GS QKD 014 over HTTPS)."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
from pathlib import Path
from typing import Any

from statehelpers import SEAL_KEY

from hybridkex import Policy, QKDConfig, Timeouts
from hybridkex.api import (
    ClientConfig,
    HybridServer,
    HybridSocket,
    ReconnectPolicy,
    ServerConfig,
    SteadyPolicy,
    start_server,
)
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd.client import ETSI014Client, certificate_common_name
from hybridkex.qkd.pki import DemoPKI
from hybridkex.state import open_state

CLIENT_ID, SERVER_ID = "client.example", "server.example"
CLIENT_SAE, SERVER_SAE = "sae-a", "sae-b"  # the simulated pair's SAEs: KME-A serves sae-a, KME-B sae-b


def kme_ids(pki_dir: str) -> tuple[str, str]:
    pki = DemoPKI(Path(pki_dir))
    return certificate_common_name(pki.cert("kme-a")), certificate_common_name(pki.cert("kme-b"))


def key_source(pki_dir: str, url: str, sae: str) -> ETSI014Client:
    pki = DemoPKI(Path(pki_dir))
    kme_a, kme_b = kme_ids(pki_dir)
    return ETSI014Client(url, cert=pki.cert(sae), key=pki.key(sae), ca=pki.ca_cert, sae_id=sae,
                         kme_id=kme_a if sae == CLIENT_SAE else kme_b)


def configs(pki_dir: str, psk: bytes, steady: SteadyPolicy, *, reconnect: bool = False) -> tuple[ClientConfig,
                                                                                                  ServerConfig]:
    """Matching configurations; ``reconnect``: the steady state off and reconnect tickets on instead."""
    kme_a, kme_b = kme_ids(pki_dir)
    policy = Policy(qkd="required", timeouts=Timeouts(handshake=10.0, kme=5.0))
    ini = InitiatorConfig(CLIENT_ID, (PSKAuthenticator({SERVER_ID: psk}),), policy, QKDConfig(CLIENT_SAE, kme_a),
                          peer_identity=SERVER_ID)
    res = ResponderConfig(SERVER_ID, (PSKAuthenticator({CLIENT_ID: psk}),), policy, QKDConfig(SERVER_SAE, kme_b))
    if reconnect:
        steady, rc = SteadyPolicy(enabled=False), ReconnectPolicy(enabled=True)
        return (ClientConfig(ini, steady=steady, reconnect=rc, timeout=10.0),
                ServerConfig(res, steady=steady, reconnect=rc, timeout=10.0))
    return ClientConfig(ini, steady=steady, timeout=10.0), ServerConfig(res, steady=steady, timeout=10.0)


def _echo(conn: HybridSocket, address: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


async def _aecho(reader: Any, writer: Any) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every server process of a fleet shares: the state, the KME (its PKI, KME-B's URL), the PSK."""

    state_url: str
    pki_dir: str
    kme_url: str
    psk: bytes = dataclasses.field(repr=False)
    announce: int = 0
    reconnect: bool = False


def serve(kind: str, spec: Spec, out: Any, stop: Any) -> None:
    """One server process: ``kind`` "blocking" (HybridServer) or "asyncio"; its port, then its steady
    registry's stats, go to ``out``."""
    state = open_state(spec.state_url, seal_key=SEAL_KEY)
    _, server_cfg = configs(spec.pki_dir, spec.psk, SteadyPolicy(announce=spec.announce), reconnect=spec.reconnect)
    cfg = dataclasses.replace(server_cfg, state=state)
    keys = key_source(spec.pki_dir, spec.kme_url, SERVER_SAE)
    try:
        if kind == "blocking":
            with HybridServer(("127.0.0.1", 0), cfg, _echo, key_source=keys).start(poll_interval=0.05) as srv:
                out.put(srv.server_address[1])
                stop.wait(120)
                reg: Any = (srv.steady_registry if srv.steady_registry is not None else srv.reconnect_registry)
        else:
            async def main() -> Any:
                srv = await start_server(_aecho, "127.0.0.1", 0, cfg, key_source=keys)
                out.put(srv.sockets[0].getsockname()[1])
                await asyncio.get_running_loop().run_in_executor(None, stop.wait, 120)
                srv.close()
                return (srv.steady_registry if srv.steady_registry is not None else srv.reconnect_registry)
            reg = asyncio.run(main())
        assert reg is not None
        s = reg.stats
        out.put({k: getattr(s, k, 0) for k in ("accepted", "refused", "replayed", "loaded", "prefetched", "on_demand",
                                                "shared_keys", "unknown")})
    finally:
        keys.close()
        state.close()


class Fleet:
    """Server processes sharing one state; :meth:`stats` stops them and returns their registries' stats."""

    def __init__(self, kinds: list[str], spec: Spec) -> None:
        c = mp.get_context("spawn")
        self._stop = c.Event()
        self._outs = [c.Queue() for _ in kinds]
        self._procs = [c.Process(target=serve, args=(k, spec, o, self._stop),
                                 daemon=True) for k, o in zip(kinds, self._outs, strict=True)]
        for p in self._procs:
            p.start()
        try:
            self.ports = [o.get(timeout=60) for o in self._outs]
        except BaseException:
            self.close()
            raise

    def stats(self) -> list[dict[str, int]]:
        self._stop.set()
        got = [o.get(timeout=60) for o in self._outs]
        self.close()
        return got

    def close(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(30)
            if p.is_alive():  # pragma: no cover - a hung server: do not leave it behind
                p.kill()
                p.join(5)

