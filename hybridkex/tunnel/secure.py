"""The tunnel's real channel: the hybridkex handshake followed by TLS 1.3 with the combined PSK.

:func:`build_channel_factory` turns a :class:`~hybridkex.tunnel.config.TunnelConfig` into the
library's configuration objects (authenticators from the peers' key files and certificates, the
policy, the QKD place and a key source for the KME) and returns a :class:`HybridChannelFactory`
that the runtime calls for every connection.  Everything secret is read here, once per (re)load,
and kept only inside the authenticators; logs get :attr:`HybridStream.session_facts`, which holds
no key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..exceptions import ConfigurationError, SteadyStateRefused
from ..io import KeySourceArg
from ..io.aio import HybridStreamReader, HybridStreamWriter, ServerSide, accept_on_streams, connect_on_streams
from ..io.config import ClientConfig, ServerConfig, StateReads, SteadyPolicy, TLSOptions
from ..io.keys import QKDKeyManager
from ..policy import KeyBudget, Policy, QKDConfig, QKDMode, Timeouts
from ..protocol import AbortCode, InitiatorConfig, ResponderConfig, encode_abort
from ..recycle import SQLiteAuthKeyStore
from ..state import PostgresState, SQLiteState
from ..steady import SteadyTicket
from ..suites import get_suite
from ._state import StateConfig, open_config_state
from .config import PeerConfig, TunnelConfig
from .fastpath import Endpoint, TLSCodec, usable_transport
from .kmewatch import KMEWatch, PeerSAE, WatchedKeySource
from .limits import admit_peer
from .material import check_channel_config, load_channel_material, load_psk_file
from .metrics import TunnelMetrics

if TYPE_CHECKING:
    from ..io.session import HybridSession
    from ..qkd import ETSI014Client
from .streams import PlainStream

#: Set in a connection's task once the server refused its steady-state attempt: the retry the runtime
#: makes in the same task is then a full handshake, even if a concurrent connection's full handshake
#: has meanwhile installed a new ticket (with worker processes or replicas, that ticket's parent may
#: again be at another process than the one the retry reaches).
_STEADY_REFUSED: ContextVar[bool] = ContextVar("hybridkex_tunnel_steady_refused", default=False)

__all__ = ["HybridChannelFactory", "HybridStream", "build_channel_factory", "check_channel_config", "load_psk_file"]

#: Seconds without a successful KME request after which the KME is probed (metrics/health on).
PROBE_INTERVAL = 5.0

def _policy(config: TunnelConfig) -> Policy:
    timeouts = Timeouts(handshake=config.timeouts.handshake, kme=min(config.timeouts.handshake, 10.0))
    return Policy(suites=config.policy.suites, qkd=QKDMode(config.policy.qkd),
                  key_budget=KeyBudget(mode=config.policy.key_budget), timeouts=timeouts)


def _session_facts(session: HybridSession) -> dict[str, object]:
    """What the tunnel logs about a connection: negotiated facts, never keys."""
    info = session.info
    return {
        "peer_identity": info.peer_identity,  # the runtime also puts it on connection_closed
        "suite": info.suite,
        "components": [f"{c.name}:{c.secret_bytes * 8}" for c in info.components],
        "auth": info.auth_mode,
        # Recycled authentication: the public ID of the key that authenticated it (None otherwise).
        "auth_key_id": info.auth_key_id,
        "qkd": info.qkd_usage if info.qkd_used else f"none ({info.qkd_note})",
        "qkd_key_ids": list(session.qkd_key_ids),
        "tls_group": session.group,
        "tls_cipher": session.cipher,
        "reconnect": session.reconnect,
        # One TLS round trip after first contact, with its own QKD key (None: a full handshake).
        "steady": None if session.steady is None else {
            "index": session.steady.index, "qkd": session.steady.qkd_usage,
            "prefetched": session.steady.prefetched, "auth_key_id": session.steady.auth_key_id},
    }


class HybridStream(PlainStream):
    """A verified hybridkex connection as the tunnel relay uses it.

    The hybrid streams have asyncio's stream interface, so the relay adapter is the same as for
    plain TCP; this adds the session and its loggable facts.
    """

    def __init__(self, reader: HybridStreamReader, writer: HybridStreamWriter,
                 raw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None) -> None:
        super().__init__(cast(asyncio.StreamReader, reader), cast(asyncio.StreamWriter, writer),
                         _session_facts(writer.session))
        self.session = writer.session
        self._hreader = reader
        self._raw = raw

    def endpoint(self) -> Endpoint | None:
        """The TCP transport and the TLS connection, for the relay's fast path (``raw``: the TCP
        streams the handshake ran on); None without them."""
        transport = usable_transport(self._raw[1].transport) if self._raw is not None else None
        if self._raw is None or transport is None:
            return None
        tls, pending = self._hreader.detach()
        return Endpoint(transport, self._raw[0], TLSCodec(tls), pending)


class HybridChannelFactory:
    """Runs the hybridkex handshake and TLS for each tunnel connection (server or client role)."""

    def __init__(self, config: TunnelConfig, metrics: TunnelMetrics | None, *, key_source: KeySourceArg = None) -> None:
        self._metrics = metrics
        self._external_source = key_source
        self._owned: list[Any] = []
        self._server: ServerSide | None = None
        self._client: ClientConfig | None = None
        self._source: KeySourceArg = None
        #: The client's one long-lived key manager (the steady state reserves keys through it) and
        #: its steady-state ticket for the tunnel server.
        self._keys: KeySourceArg = None
        self._ticket: SteadyTicket | None = None
        self._watched: WatchedKeySource | None = None
        self._keys_per_handshake = 1
        self._probe_task: asyncio.Task[None] | None = None
        # Recycled-key stores by path, kept across reloads: a handshake in flight during a reload still
        # reads and rotates the store its configuration named.  Closed (queue written) by aclose().
        self._stores: dict[Path, SQLiteAuthKeyStore] = {}
        # The [state]s, by configuration, kept across reloads likewise (docs/fleet.md).
        self._states: dict[tuple[str, Path | None], SQLiteState | PostgresState] = {}
        #: The read gate's refusals already counted in the metrics: (gate, unknown_cached, rate_limited).
        self._reads_counted: tuple[object, int, int] = (None, 0, 0)
        count = metrics.kme_error if metrics is not None else (lambda kind: None)
        self.watch = KMEWatch(count, url="", master=config.role == "server")
        self._apply(config)
        if metrics is not None:
            metrics.add_collector(self._collect)

    @property
    def server(self) -> ServerSide | None:
        """The server side the current configuration built (None in the client role): metrics, tests."""
        return self._server

    # -- configuration ----------------------------------------------------------------------------

    def _key_source(self, config: TunnelConfig, client: ETSI014Client | None,
                    peer_sae_ids: Sequence[str]) -> KeySourceArg:
        if self._external_source is not None or client is None:
            self._watched = None
            return self._external_source
        self._owned.append(client)
        # Every KME request (pool refills, direct fetches, fetches by ID, probes) is counted and
        # feeds the health state.
        watched = self._watched = WatchedKeySource(client, self.watch)
        if config.role == "server":  # ETSI master: keep a pool so handshakes never wait on the KME
            from ..qkd import KeyPool  # noqa: PLC0415 - only when a real KME is configured

            pool = KeyPool(watched, peer_sae_ids)
            self._owned.append(pool)
            return pool
        return watched

    def _watch_peers(self, config: TunnelConfig) -> None:
        target = self._target_peer(config)
        peers = [PeerSAE(p.sae_id, p.identity, f"peers[{i}].sae_id") for i, p in enumerate(config.peers)
                 if p.sae_id and (target is None or p is target)]
        self.watch.configure(peers, config.policy.qkd, url=(config.kme.url or "") if config.kme else "")
        bits = [get_suite(name).qkd_key_bits for name in config.policy.suites]
        self._keys_per_handshake = max(1, max(bits, default=0) // 256)

    def _apply(self, config: TunnelConfig) -> None:
        # The same loader as --check-config: what passed there cannot fail here for a file problem.
        material = load_channel_material(config, kme=self._external_source is None, open_store=self._store,
                                         open_state=self._state)
        auths, sae_ids = material.authenticators, material.peer_sae_ids
        policy = _policy(config)
        source = self._key_source(config, material.kme_client, sorted(set(sae_ids.values())))
        qkd = None
        if policy.uses_qkd:
            if source is None:
                raise ConfigurationError("QKD is enabled but no key source is configured", field="kme")
            target_peer = self._target_peer(config)
            qkd = QKDConfig.from_key_source(
                source, peer_sae_id=target_peer.sae_id if target_peer is not None else None)
        tls = TLSOptions()
        timeout = config.timeouts.handshake + 5.0
        if config.role == "server":
            responder = ResponderConfig(config.identity, auths, policy=policy, qkd=qkd, peer_sae_ids=sae_ids,
                                        admit=admit_peer)
            old = self._server
            steady = SteadyPolicy(enabled=config.policy.steady)
            shared = self._state(config.state) if config.state is not None else None
            purge = (config.state.purge_every, config.state.spent_older_than) if config.state else (0.0, None)
            reads = config.state.reads if config.state is not None else StateReads()
            self._server = ServerSide(ServerConfig(responder, tls=tls, timeout=timeout, steady=steady, state=shared,
                                                   purge_every=purge[0], spent_older_than=purge[1],
                                                   state_reads=reads),
                                      key_source=source)
            if old is not None:
                self._count_reads(old)  # before its counters go with it
                old.close()
        else:
            peer = self._target_peer(config)
            assert peer is not None
            initiator = InitiatorConfig(config.identity, auths, policy=policy, qkd=qkd, peer_identity=peer.identity)
            self._client = ClientConfig(initiator, tls=tls, timeout=timeout,
                                        steady=SteadyPolicy(enabled=config.policy.steady))
        self._source = source
        if config.role == "client":
            # A reload gets a new manager and forgets the ticket: the next connection is a full
            # handshake under the new configuration.
            blocking = (source is not None and not isinstance(source, QKDKeyManager)
                        and not inspect.iscoroutinefunction(getattr(source, "get_keys", None)))
            self._keys = QKDKeyManager(source, policy.key_budget) if blocking else source  # type: ignore[arg-type]
            if self._ticket is not None:
                self._ticket.erase()
                self._ticket = None
        self._watch_peers(config)

    def _store(self, path: Path) -> SQLiteAuthKeyStore:
        if path not in self._stores:
            self._stores[path] = SQLiteAuthKeyStore(path)
        return self._stores[path]

    def _state(self, config: StateConfig) -> SQLiteState | PostgresState:
        where = (config.url, config.key_file)  # a reload that changes only the purge keeps the state open
        if where not in self._states:
            self._states[where] = open_config_state(config)
        return self._states[where]

    @staticmethod
    def _target_peer(config: TunnelConfig) -> PeerConfig | None:
        if config.role != "client":
            return None
        wanted = config.target_identity or (config.peers[0].identity if len(config.peers) == 1 else None)
        for p in config.peers:
            if p.identity == wanted:
                return p
        raise ConfigurationError(f"no peer named {wanted!r}", field="target_identity")

    # -- ChannelFactory ---------------------------------------------------------------------------

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     peer_addr: str) -> HybridStream:
        if self._server is None:
            raise ConfigurationError("this channel factory is configured for the client role", field="role")
        hreader, hwriter = await accept_on_streams(reader, writer, self._server)
        return HybridStream(hreader, hwriter, (reader, writer))

    async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> HybridStream:
        """The client side on a new TCP connection: a steady-state connection while this factory's
        ticket lasts, else a full handshake (which gives the next ticket).

        Raises:
            SteadyStateRefused: the server refused the steady-state connection (it restarted or
                forgot the session); the ticket is dropped and the caller retries once on a new
                connection, which runs a full handshake.
        """
        if self._client is None:
            raise ConfigurationError("this channel factory is configured for the server role", field="role")
        usable = self._ticket is not None and self._ticket.usable and not _STEADY_REFUSED.get()
        ticket = self._ticket if usable else None
        try:
            hreader, hwriter = await connect_on_streams(reader, writer, self._client, key_source=self._keys,
                                                        ticket=ticket)
        except SteadyStateRefused:
            assert ticket is not None
            _STEADY_REFUSED.set(True)
            if self._ticket is ticket:
                self._ticket = None
            ticket.erase()
            raise
        new = hwriter.reconnect_ticket
        if isinstance(new, SteadyTicket):
            if self._ticket is not None and self._ticket.usable:
                # Concurrent full handshakes (first contact under load) each make a ticket: keep the
                # one in use (connections may hold attempts from it) and drop the newcomer, unused.
                new.erase()
            else:
                self._ticket = new
                new.refill()
        return HybridStream(hreader, hwriter, (reader, writer))

    async def refuse(self, writer: asyncio.StreamWriter) -> None:
        """Abort "rate limited" (9) as the first bytes: the client raises RateLimited for it."""
        writer.write(encode_abort(AbortCode.RATE_LIMITED))
        await writer.drain()

    async def reconfigure(self, config: TunnelConfig) -> None:
        """Apply a reloaded configuration to new connections; open ones are not touched."""
        owned, self._owned = self._owned, []
        try:
            # Building the config may contact the KME (to learn its ID): keep it off the event loop.
            await asyncio.to_thread(self._apply, config)
        except BaseException:
            _close_all(self._owned)
            self._owned = owned
            raise
        _close_all(owned)

    async def aclose(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        if self._metrics is not None:
            self._metrics.remove_collector(self._collect)
        if self._server is not None:
            self._server.close()
        _close_all(self._owned)
        self._owned = []
        _close_all(list(self._stores.values()))
        self._stores.clear()
        _close_all(list(self._states.values()))
        self._states.clear()

    # -- KME health -------------------------------------------------------------------------------

    def _count_reads(self, server: ServerSide | None) -> None:
        """Add what the server's read gate refused since the last count to the metrics."""
        steady = server.state.steady if server is not None else None
        reads = steady.reads if steady is not None else None
        if self._metrics is None or reads is None:
            return
        gate, cached, limited = self._reads_counted
        if gate is not reads:
            cached = limited = 0
        now_cached, now_limited = reads.cached, reads.limited  # read once: claims go on meanwhile
        self._metrics.count_state_reads_refused("unknown_cached", now_cached - cached)
        self._metrics.count_state_reads_refused("rate_limited", now_limited - limited)
        self._reads_counted = (reads, now_cached, now_limited)

    def _collect(self) -> None:
        """Before each scrape / health check: the pool level per peer SAE, the ``kme`` health, and the
        state read gate's refusals."""
        assert self._metrics is not None
        self._count_reads(self._server)
        stats = getattr(self._source, "stats", None)
        levels: dict[str, int] | None = None
        if callable(stats):  # the server's pool
            levels = dict(stats().levels)
            self._metrics.set_qkd_pool_levels(levels)
        state, detail = self.watch.health(levels, self._keys_per_handshake)
        self._metrics.health.set("kme", state, detail)

    def probe_peers(self, *, attempts: int = 3, pause: float = 0.5) -> None:
        """Ask the KME about each watched peer SAE (blocking; a thread). Failures are recorded, not raised.

        A probe that found the KME unreachable (at start-up it may still be busy) is tried again, up
        to ``attempts`` times ``pause`` s apart, so that a peer SAE the KME refuses is still reported
        before ``listening``."""
        watched = self._watched
        if watched is None:
            return
        pending = [p.sae_id for p in self.watch.peers]
        for attempt in range(attempts):
            pending = [sae for sae in pending if not watched.probe(sae) and not self.watch.refused(sae)]
            if not pending or attempt == attempts - 1:
                return
            time.sleep(pause)

    def start_probing(self, interval: float = PROBE_INTERVAL) -> None:
        """Probe the KME whenever no request has succeeded for ``interval`` s, so health notices an
        outage even while no connection needs a key."""
        async def loop() -> None:
            while True:
                # Wake when the KME has been idle for ``interval``: a fixed tick would probe up to
                # twice ``interval`` after the last success.  After a probe, a whole interval.
                idle = self.watch.idle_for()
                if idle < interval:
                    await asyncio.sleep(max(interval - idle, 0.05))
                    continue
                await asyncio.to_thread(self.probe_peers)
                await asyncio.sleep(interval)

        if self._probe_task is None:
            self._probe_task = asyncio.get_running_loop().create_task(loop(), name="hybridkex-kme-probe")


def _close_all(items: Sequence[Any]) -> None:
    # Newest first: the key pool stops (and its refill thread ends) before the KME client it uses
    # is closed, so no refill fails with "client is closed" on the way out.
    for item in reversed(items):
        with contextlib.suppress(Exception):
            item.close()


async def build_channel_factory(config: TunnelConfig, metrics: TunnelMetrics) -> HybridChannelFactory:
    """The provider the tunnel CLI calls (see :data:`hybridkex.tunnel.channel.SECURE_MODULE`).

    The server asks its KME about every peer SAE before it listens, so a peer SAE the KME refuses
    is reported (once, ``kme_peer_refused``) before ``listening``; with metrics or health on, the
    KME is then probed while idle.
    """
    factory = await asyncio.to_thread(HybridChannelFactory, config, metrics)
    if config.role == "server":
        await asyncio.to_thread(factory.probe_peers)
    if config.metrics.enabled or config.health.enabled:
        factory.start_probing()
    return factory
