"""Run the simulated KME pair: two HTTPS endpoints (KME A, KME B) over one :class:`KeyStore`.

:class:`KMEPairServer` is the asyncio core (the ``hybridkex kme`` command runs it in its own event
loop); :class:`SimulatedKMEPair` runs it in a background thread for in-process use::

    with SimulatedKMEPair.start(rate_bps=1_000_000) as kmes:      # throwaway PKI in a temp dir
        master = kmes.key_source("sae-a")                        # ETSI014Client for sae-a at KME A
        slave = kmes.key_source("sae-b")                         # ... for sae-b at KME B
        (k,) = master.get_keys("sae-b")
        assert slave.get_keys_by_id("sae-a", [k.key_id]) == [k]
"""

from __future__ import annotations

import asyncio
import os
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ...exceptions import ConfigurationError, HybridKEXError
from ..client import AsyncETSI014Client, ETSI014Client, certificate_common_name
from ..client import is_loopback_host as is_loopback  # the kme command's check of --host
from ..pki import DemoPKI
from .app import create_kme_app, server_ssl_context
from .listener import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, HTTP_LOG, KMESite
from .metrics import KMEMetrics, KMEMetricsServer
from .store import KeyStore, KeySupply, KMELimits, QKDLinkModel

if TYPE_CHECKING:  # the link simulation (numpy) loads only when a pair runs one
    from ...qkdlink.session import LinkSettings
    from .linksupply import LinkKeySupply

__all__ = ["DEFAULT_CAPACITY_BITS", "DEFAULT_RATE_BPS", "KMEPairServer", "KMEPairSettings", "SimulatedKMEPair",
           "is_loopback"]

#: Default link rate: 1 Mbit/s, about 3900 keys of 256 bits per second.
DEFAULT_RATE_BPS = 1_000_000.0
#: Default reservoir: 4 Mbit, i.e. 16384 keys of 256 bits.
DEFAULT_CAPACITY_BITS = 4 * 1024 * 1024


@dataclass(frozen=True)
class KMEPairSettings:
    """How to run the pair. Ports 0 pick free ones."""

    host: str = "127.0.0.1"
    port_a: int = 0
    port_b: int = 0
    rate_bps: float = DEFAULT_RATE_BPS
    capacity_bits: int = DEFAULT_CAPACITY_BITS
    initial_bits: int | None = None
    limits: KMELimits = field(default_factory=KMELimits)
    db_path: Path | None = None
    delay: float = 0.0
    saes_a: tuple[str, ...] = ("sae-a",)
    saes_b: tuple[str, ...] = ("sae-b",)
    kme_a: str = "kme-a"
    kme_b: str = "kme-b"
    #: Seconds a connection may stay silent: TLS handshake, request headers, request body, between requests.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Connections each KME keeps open at once (TLS handshakes included); more are closed at once.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: A simulated BB84 link between the KMEs instead of the fixed-rate model (``rate_bps`` is then unused).
    link: LinkSettings | None = None
    #: Where KME B's link end connects (default: KME A's link port); tests put a tampering proxy here.
    link_connect_to: tuple[str, int] | None = None
    #: Serve each KME's Prometheus metrics at ``/metrics`` over plain HTTP, on a listener of its own.
    metrics: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port_a: int = 0
    metrics_port_b: int = 0

    def __post_init__(self) -> None:
        if not self.idle_timeout > 0:
            raise ConfigurationError("must be > 0 seconds", field="idle_timeout")
        if self.max_connections < 1:
            raise ConfigurationError("must be >= 1", field="max_connections")
        for name in ("port_a", "port_b", "metrics_port_a", "metrics_port_b"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigurationError("must be 0..65535", field=name)
        if set(self.saes_a) & set(self.saes_b):
            raise ConfigurationError("an SAE is served by one KME only", field="saes")
        if not self.saes_a or not self.saes_b:
            raise ConfigurationError("each KME must serve at least one SAE", field="saes")


class KMEPairServer:
    """Both KMEs in the running event loop: ``await start()``, then :attr:`url_a`/:attr:`url_b`, ``await stop()``."""

    def __init__(self, pki: DemoPKI, settings: KMEPairSettings | None = None) -> None:
        self.settings = s = settings or KMEPairSettings()
        self.pki = DemoPKI.load(pki.directory, required=(s.kme_a, s.kme_b))
        self.kme_id_a = certificate_common_name(self.pki.cert(s.kme_a))
        self.kme_id_b = certificate_common_name(self.pki.cert(s.kme_b))
        if self.kme_id_a == self.kme_id_b:
            raise ConfigurationError("the two KME certificates have the same CN", field="pki")
        homes = {sae: self.kme_id_a for sae in s.saes_a} | {sae: self.kme_id_b for sae in s.saes_b}
        self.link: LinkKeySupply | None = None
        link: KeySupply
        if s.link is not None:
            from .linksupply import LinkKeySupply  # noqa: PLC0415

            self.link = link = LinkKeySupply(s.link, s.capacity_bits, self.kme_id_a, self.kme_id_b,
                                             connect_to=s.link_connect_to)
        else:
            link = QKDLinkModel(s.rate_bps, s.capacity_bits, initial_bits=s.initial_bits)
        self._ssl_a = server_ssl_context(self.pki.cert(s.kme_a), self.pki.key(s.kme_a), self.pki.ca_cert)
        self._ssl_b = server_ssl_context(self.pki.cert(s.kme_b), self.pki.key(s.kme_b), self.pki.ca_cert)
        self.store = KeyStore(homes, link, limits=s.limits, db_path=s.db_path)
        # Each KME counts its own requests on its own registry, whether or not the metrics are served.
        self.metrics_a = KMEMetrics(self.kme_id_a, self.store, self.link)
        self.metrics_b = KMEMetrics(self.kme_id_b, self.store, self.link)
        self._runners: list[web.AppRunner] = []
        self._metrics_servers: list[KMEMetricsServer] = []
        self.url_a = self.url_b = ""
        #: ``http://HOST:PORT/metrics`` of each KME (empty unless ``settings.metrics``).
        self.metrics_url_a = self.metrics_url_b = ""

    async def start(self) -> None:
        """Listen on both ports; afterwards both accept connections.

        Raises:
            ConfigurationError: a port cannot be bound (message names it).
        """
        s = self.settings
        urls = []
        for side, kme_id, ctx, port, metrics in (("a", self.kme_id_a, self._ssl_a, s.port_a, self.metrics_a),
                                                 ("b", self.kme_id_b, self._ssl_b, s.port_b, self.metrics_b)):
            app = create_kme_app(self.store, kme_id, delay=s.delay, read_timeout=s.idle_timeout, metrics=metrics)
            # keepalive_timeout: aiohttp closes a connection that has no complete request after this long.
            runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=s.idle_timeout,
                                   logger=HTTP_LOG)
            await runner.setup()
            self._runners.append(runner)
            site = KMESite(runner, s.host, port, ssl_context=ctx, idle_timeout=s.idle_timeout,
                           max_connections=s.max_connections, label=kme_id,
                           on_refused=metrics.count_refused_connection)
            try:
                await site.start()
            except OSError as exc:
                await self.stop()
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ConfigurationError(
                    f"cannot listen on {s.host}:{port} for {kme_id} ({reason.lower()}); "
                    "pick another port, or 0 for a free one", field=f"port_{side}"
                ) from None
            host, bound = runner.addresses[0][:2]
            shown = f"[{host}]" if ":" in str(host) else host
            urls.append(f"https://{shown}:{bound}")
        self.url_a, self.url_b = urls
        if s.metrics:
            for side, metrics, port in (("a", self.metrics_a, s.metrics_port_a),
                                        ("b", self.metrics_b, s.metrics_port_b)):
                server = KMEMetricsServer(metrics, s.metrics_host, port, field=f"metrics_port_{side}")
                try:
                    await server.start()
                except ConfigurationError:
                    await self.stop()
                    raise
                self._metrics_servers.append(server)
            self.metrics_url_a, self.metrics_url_b = (m.url for m in self._metrics_servers)
        if self.link is not None:
            await self.link.start()  # KME A's end listens on loopback, KME B's connects to it

    async def stop(self) -> None:
        """Stop both KMEs and close the store (its database keeps the undelivered keys)."""
        if self.link is not None:
            await self.link.stop()
        servers, self._metrics_servers = self._metrics_servers, []
        for server in servers:
            await server.stop()
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        self.store.close()

    def url_for(self, sae_id: str) -> str:
        """The URL of the KME that serves ``sae_id``."""
        home = self.store.home(sae_id)
        if home is None:
            raise ConfigurationError(f"SAE {sae_id!r} is not served by this KME pair", field="sae_id")
        return self.url_a if home == self.kme_id_a else self.url_b


class SimulatedKMEPair:
    """The simulated KME pair running in a background thread (its own event loop).

    Start it with :meth:`start` and stop it with :meth:`stop` or a ``with`` block.  When no PKI is
    given, a throwaway one is created in a temporary directory and deleted on stop.
    """

    def __init__(self, server: KMEPairServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 stop_event: asyncio.Event, cleanup: ExitStack) -> None:
        self._server = server
        self._loop = loop
        self._thread = thread
        self._stop_event = stop_event
        self._cleanup = cleanup
        self._stopped = False

    @classmethod
    def start(
        cls,
        pki: DemoPKI | str | Path | None = None,
        *,
        rate_bps: float = DEFAULT_RATE_BPS,
        capacity_bits: int = DEFAULT_CAPACITY_BITS,
        settings: KMEPairSettings | None = None,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> SimulatedKMEPair:
        """Start both KMEs on loopback and return once both accept connections.

        Args:
            pki: a demo PKI (object or directory); ``None`` creates a temporary one.
            rate_bps: QKD link rate in bits per second.
            capacity_bits: the link's key store, in bits.
            settings: full settings (overrides ``rate_bps``, ``capacity_bits`` and ``kwargs``).
            kwargs: further :class:`KMEPairSettings` fields (``port_a``, ``db_path``, ``delay``, ...).
        """
        cleanup = ExitStack()
        try:
            if pki is None:
                pki_obj = cleanup.enter_context(DemoPKI.temporary())
            else:
                pki_obj = pki if isinstance(pki, DemoPKI) else DemoPKI(Path(pki))
            if settings is None:
                settings = KMEPairSettings(rate_bps=rate_bps, capacity_bits=capacity_bits, **kwargs)
            server = KMEPairServer(pki_obj, settings)
        except BaseException:
            cleanup.close()
            raise
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []
        holder: dict[str, asyncio.Event] = {}

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                stop_event = asyncio.Event()
                holder["stop"] = stop_event
                loop.run_until_complete(server.start())
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_until_complete(stop_event.wait())
            finally:
                loop.run_until_complete(server.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=main, name="hybridkex-kme-pair", daemon=True)
        thread.start()
        if not ready.wait(timeout) or errors:
            cleanup.close()
            if errors:
                if isinstance(errors[0], HybridKEXError):
                    raise errors[0]
                raise ConfigurationError(f"the simulated KME pair did not start: {errors[0]}",
                                         field="kme") from errors[0]
            raise ConfigurationError(f"the simulated KME pair did not start within {timeout:g} s", field="kme")
        return cls(server, loop, thread, holder["stop"], cleanup)

    # -- what callers need ------------------------------------------------------------------------

    @property
    def url_a(self) -> str:
        """``https://127.0.0.1:PORT`` of KME A."""
        return self._server.url_a

    @property
    def url_b(self) -> str:
        """``https://127.0.0.1:PORT`` of KME B."""
        return self._server.url_b

    @property
    def kme_id_a(self) -> str:
        """KME A's ID (the CN of ``kme-a.crt``)."""
        return self._server.kme_id_a

    @property
    def kme_id_b(self) -> str:
        """KME B's ID (the CN of ``kme-b.crt``)."""
        return self._server.kme_id_b

    @property
    def pki(self) -> DemoPKI:
        """The PKI the KMEs use (certificates for SAEs and peers too)."""
        return self._server.pki

    @property
    def metrics_url_a(self) -> str:
        """``http://127.0.0.1:PORT/metrics`` of KME A (empty unless started with ``metrics=True``)."""
        return self._server.metrics_url_a

    @property
    def metrics_url_b(self) -> str:
        """``http://127.0.0.1:PORT/metrics`` of KME B (empty unless started with ``metrics=True``)."""
        return self._server.metrics_url_b

    def metrics(self, kme_id: str) -> KMEMetrics:
        """The metrics of KME ``kme_id`` (:attr:`kme_id_a` or :attr:`kme_id_b`), served or not."""
        if kme_id not in (self.kme_id_a, self.kme_id_b):
            raise ConfigurationError(f"{kme_id!r} is not a KME of this pair", field="kme_id")
        return self._server.metrics_a if kme_id == self.kme_id_a else self._server.metrics_b

    @property
    def link(self) -> LinkKeySupply | None:
        """The simulated BB84 link feeding the KMEs (``None`` with the fixed-rate model)."""
        return self._server.link

    @property
    def store(self) -> KeyStore:
        """The shared key store (for counters: ``store.stats()``)."""
        return self._server.store

    def url_for(self, sae_id: str) -> str:
        """The URL of the KME serving ``sae_id``."""
        return self._server.url_for(sae_id)

    def _client_args(self, sae_id: str) -> dict[str, Any]:
        url = self.url_for(sae_id)
        kme_id = self.kme_id_a if url == self.url_a else self.kme_id_b
        return {"url": url, "cert": self.pki.cert(sae_id), "key": self.pki.key(sae_id), "ca": self.pki.ca_cert,
                "sae_id": sae_id, "kme_id": kme_id}

    def key_source(self, sae_id: str, **kwargs: Any) -> ETSI014Client:
        """A ready blocking :class:`~hybridkex.qkd.KeySource` for ``sae_id`` (``"sae-a"`` or ``"sae-b"``).

        ``kwargs`` go to :class:`~hybridkex.qkd.ETSI014Client` (``timeout``, ``retries``...).
        """
        return ETSI014Client(**(self._client_args(sae_id) | kwargs))

    def async_key_source(self, sae_id: str, **kwargs: Any) -> AsyncETSI014Client:
        """A ready :class:`~hybridkex.qkd.AsyncKeySource` for ``sae_id``; close it with ``aclose()``."""
        return AsyncETSI014Client(**(self._client_args(sae_id) | kwargs))

    # -- lifecycle --------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Stop both KMEs, wait for the thread, delete a temporary PKI. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(timeout)
        self._cleanup.close()

    def __enter__(self) -> SimulatedKMEPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatedKMEPair(url_a={self.url_a!r}, url_b={self.url_b!r})"
