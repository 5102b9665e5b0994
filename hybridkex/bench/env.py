"""The benchmark's world: certificates, the simulated KMEs, key pools, and both ends of each variant.

Everything is created for the selected variants only and torn down by :meth:`BenchEnv.close`
(or the ``with`` block): KME threads, pool threads, KME clients and the temporary directory.

QKD placement (the protocol's default): the responder (server) is the ETSI master, SAE ``sae-a`` at
KME A, and takes keys from a :class:`~hybridkex.qkd.KeyPool` (``pool``) or from its KME directly
(``direct``); the initiator (client) is the slave, SAE ``sae-b`` at KME B, and fetches the keys by
ID from its KME in every handshake (a slave cannot pre-fetch: it learns the key IDs in the
handshake).  Each KME delay gets its own simulated KME pair (the delay applies to every answer).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..io import QKDKeyManager
from ..io.config import ServerConfig, TLSOptions
from ..policy import Policy, QKDConfig
from ..protocol import Authenticator, PSKAuthenticator, ResponderConfig
from ..qkd.base import KeySource
from ..qkd.kme import KMELimits, SimulatedKMEPair
from ..qkd.memory import MemoryKeyLink
from ..qkd.pki import DemoPKI
from ..qkd.pool import KeyPool
from ..recycle import RecycledAuthenticator, SQLiteAuthKeyStore
from .certs import SERVER_HOST, BaselineCerts, HybridPKI
from .endpoints import (
    ClientKit,
    ClientSpec,
    KMEClientSpec,
    ServerKit,
    key_budget,
    reconnect_policy,
    steady_policy,
)
from .kmeproc import KMEProcessPair
from .variants import Variant

__all__ = ["CLIENT_ID", "SERVER_ID", "BenchEnv"]

CLIENT_ID = "bench-client.example"
SERVER_ID = "bench-server.example"
MASTER_SAE, SLAVE_SAE = "sae-a", "sae-b"

#: Pool watermarks: deep enough that a burst of concurrent handshakes never waits on the KME.
POOL_LOW, POOL_HIGH, POOL_BATCH = 64, 512, 128


class BenchEnv:
    """Builds and owns every resource the selected variants need."""

    def __init__(self, variants: tuple[Variant, ...], *, kme_process: bool = True) -> None:
        self.variants = variants
        #: The simulated KMEs in a process of their own (default), or in a thread of this one.
        self._kme_process = kme_process
        self._stack = ExitStack()
        self._servers: dict[str, ServerKit] = {}
        self._client_specs: dict[str, ClientSpec] = {}
        self._memory_clients: dict[str, ClientKit] = {}
        self._pairs: dict[int, SimulatedKMEPair | KMEProcessPair] = {}
        self._pools: dict[int, KeyPool] = {}
        self._memory_link: MemoryKeyLink | None = None
        self._master_sources: dict[str, KeySource] = {}
        try:
            self.tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="hybridkex-bench-")))
            self.certs = BaselineCerts.create(self.tmp)
            self.psk_identity, self.psk = b"bench-psk-client", os.urandom(32)
            self.auth_psk = os.urandom(32)
            needs_pki = any(v.is_hybridkex and v.auth.startswith("pki-") for v in variants)
            self.pki = HybridPKI.create({"client": CLIENT_ID, "server": SERVER_ID}) if needs_pki else None
            self._demo_pki: DemoPKI | None = None
            for v in variants:
                self._build(v)
        except BaseException:
            self.close()
            raise

    # --- resources --------------------------------------------------------------------------------

    def _kme_pair(self, delay_ms: int) -> SimulatedKMEPair | KMEProcessPair:
        pair = self._pairs.get(delay_ms)
        if pair is None:
            if self._demo_pki is None:
                self._demo_pki = self._stack.enter_context(DemoPKI.temporary())
            if self._kme_process:
                # Its own process, as KMEs are other machines: see hybridkex.bench.kmeproc.
                pair = KMEProcessPair(self._demo_pki, delay_ms=delay_ms)
            else:
                # A link that is never the bottleneck: the benchmark is about handshakes, not key rates.
                pair = SimulatedKMEPair.start(self._demo_pki, rate_bps=1e12, capacity_bits=1 << 40,
                                              delay=delay_ms / 1000, limits=KMELimits(max_pending_keys=1_000_000))
            self._stack.callback(pair.stop)
            self._pairs[delay_ms] = pair
        return pair

    def pool(self, delay_ms: int) -> KeyPool:
        """The master's key pool at the KME with ``delay_ms`` (shared by the variants using it)."""
        pool = self._pools.get(delay_ms)
        if pool is None:
            pair = self._kme_pair(delay_ms)
            source = pair.key_source(MASTER_SAE)
            self._stack.callback(source.close)
            pool = KeyPool(source, [SLAVE_SAE], low_watermark=POOL_LOW, high_watermark=POOL_HIGH,
                           batch_size=POOL_BATCH)
            self._stack.callback(pool.close)
            pool.wait_ready(30)
            self._pools[delay_ms] = pool
        return pool

    def pools(self) -> dict[int, KeyPool]:
        return dict(self._pools)

    def memory_link(self) -> MemoryKeyLink:
        if self._memory_link is None:
            self._memory_link = MemoryKeyLink(("kme-mem-a", "kme-mem-b"), max_keys=10_000_000)
        return self._memory_link

    # --- variants ---------------------------------------------------------------------------------

    def _server_auths(self, v: Variant) -> tuple[Authenticator, ...]:
        psk = PSKAuthenticator({CLIENT_ID: self.auth_psk})
        if v.auth == "psk":
            return (psk,)
        if v.auth == "recycled":
            # Recycled keys first, the bootstrap PSK after it (docs/recycle.md); each side its own store.
            store = SQLiteAuthKeyStore(self.tmp / f"{v.id}-server.sqlite3")
            self._stack.callback(store.close)
            return (RecycledAuthenticator(store), psk)
        assert self.pki is not None
        return (self.pki.authenticator(v.auth, "server"),)

    def _build(self, v: Variant) -> None:
        c = self.certs
        if v.kind == "stdlib-cert":
            self._servers[v.id] = ServerKit(v.kind, cert_path=str(c.cert_path), key_path=str(c.key_path))
            self._client_specs[v.id] = ClientSpec(v.kind, ca_path=str(c.ca_path), server_host=SERVER_HOST)
        elif v.kind == "pyopenssl-cert":
            self._servers[v.id] = ServerKit(v.kind, groups=v.groups, cert_path=str(c.cert_path),
                                            key_path=str(c.key_path))
            self._client_specs[v.id] = ClientSpec(v.kind, groups=v.groups, ca_path=str(c.ca_path),
                                                  server_host=SERVER_HOST)
        elif v.kind == "tls-psk":
            self._servers[v.id] = ServerKit(v.kind, psk_table={self.psk_identity: self.psk})
            self._client_specs[v.id] = ClientSpec(v.kind, psk_identity=self.psk_identity, psk=self.psk)
        else:
            self._build_hybrid(v)

    def _build_hybrid(self, v: Variant) -> None:
        uses_qkd = v.qkd != "none"
        budget = key_budget(v.budget)
        master_source: KeySource | None = None
        kme: KMEClientSpec | None = None
        kme_ids = ("kme-none", "kme-none")
        if v.qkd == "memory":
            link = self.memory_link()
            master_source = link.source(MASTER_SAE, 0)
            kme_ids = ("kme-mem-a", "kme-mem-b")
        elif v.uses_kme:
            pair = self._kme_pair(v.kme_delay_ms)
            kme_ids = (pair.kme_id_a, pair.kme_id_b)
            if v.qkd == "pool":
                master_source = self.pool(v.kme_delay_ms)
            else:
                direct = pair.key_source(MASTER_SAE)
                self._stack.callback(direct.close)
                master_source = direct
            pki = pair.pki
            kme = KMEClientSpec(pair.url_for(SLAVE_SAE), str(pki.cert(SLAVE_SAE)), str(pki.key(SLAVE_SAE)),
                                str(pki.ca_cert), SLAVE_SAE, kme_ids[1])
        policy = Policy(suites=(v.suite,), qkd="required" if uses_qkd else "disabled",  # type: ignore[arg-type]
                        key_budget=budget)
        res_cfg = ResponderConfig(SERVER_ID, self._server_auths(v), policy,
                                  QKDConfig(MASTER_SAE, kme_ids[0]) if uses_qkd else None)
        keys = QKDKeyManager(master_source, budget) if master_source is not None else None
        server_cfg = ServerConfig(res_cfg, tls=TLSOptions(groups=v.tls_groups), reconnect=reconnect_policy(v.reconnect),
                                  steady=steady_policy(v.steady))
        self._servers[v.id] = ServerKit("hybridkex", config=server_cfg, keys=keys)
        if master_source is not None:
            self._master_sources[v.id] = master_source
        anchors: dict[str, bytes] = {}
        creds: dict[str, tuple[bytes, bytes]] = {}
        if v.auth.startswith("pki-"):
            assert self.pki is not None
            enc = serialization.Encoding.DER
            for alg, anchor in self.pki.anchors.items():
                anchors[alg] = anchor.public_bytes(enc)
                cred = self.pki.credentials[(alg, "client")]
                creds[alg] = (cred.chain[0].public_bytes(enc), cred.private_key.private_bytes(
                    enc, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self._client_specs[v.id] = ClientSpec(
            "hybridkex", identity=CLIENT_ID, peer_identity=SERVER_ID, auth=v.auth, auth_psk=self.auth_psk,
            anchors=anchors, credentials=creds, suite=v.suite, qkd=v.qkd, budget=v.budget, sae_id=SLAVE_SAE,
            kme_id=kme_ids[1], kme=kme, reconnect=v.reconnect, steady=v.steady, tls_groups=v.tls_groups,
            recycle_store=str(self.tmp / f"{v.id}-client.sqlite3") if v.auth == "recycled" else "")
        if v.qkd == "memory":
            self._memory_clients[v.id] = self._own_client(
                ClientKit(self._client_specs[v.id], key_source=self.memory_link().source(SLAVE_SAE, 1)))

    def _own_client(self, kit: ClientKit) -> ClientKit:
        self._stack.callback(kit.close)
        return kit

    # --- what the measurements use ----------------------------------------------------------------

    def server(self, vid: str) -> ServerKit:
        return self._servers[vid]

    def loopback_server(self, vid: str) -> ServerKit:
        """The server of ``vid`` for the loopback phases.

        A hybridkex server gets a key manager of its own: the client worker is a new slave whose
        key manager never saw the in-memory phase's epoch key, which the KME delivered once already.
        """
        kit = self._servers[vid]
        if kit.kind != "hybridkex":
            return kit
        source = self._master_sources.get(vid)
        keys = QKDKeyManager(source, kit.config.handshake.policy.key_budget) if source is not None else None
        return ServerKit("hybridkex", config=kit.config, keys=keys)

    def client_spec(self, vid: str) -> ClientSpec:
        return self._client_specs[vid]

    def memory_client(self, vid: str) -> ClientKit:
        """The in-process client of ``vid`` (built once; its KME client is reused)."""
        kit = self._memory_clients.get(vid)
        if kit is None:
            kit = self._memory_clients[vid] = self._own_client(ClientKit(self._client_specs[vid]))
        return kit

    def pair_count(self) -> int:
        return len(self._pairs)

    def info(self) -> dict[str, Any]:
        """Facts about the set-up, for the report."""
        return {
            "kme_pairs": sorted(self._pairs),
            "pool": {"low_watermark": POOL_LOW, "high_watermark": POOL_HIGH, "batch_size": POOL_BATCH},
            "qkd_roles": {"master": f"server ({MASTER_SAE}, KME A)", "slave": f"client ({SLAVE_SAE}, KME B)"},
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()

    def __enter__(self) -> BenchEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
