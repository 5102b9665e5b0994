"""Prometheus metrics of one simulated KME, served at ``/metrics`` over plain HTTP on a listener of its own.

Each KME has its own :class:`KMEMetrics` with a private :class:`prometheus_client.CollectorRegistry`
(never the library's global one), so the two KMEs of a pair, or a KME and a tunnel in one process,
never mix their series.  Request counts are kept here as the HTTP layer reports them; everything
else (the key store, the link) is read from the live objects at each scrape by a collector, so a
scrape shows the same figures as an ETSI ``status`` call made at the same moment.

Why a separate listener: the ETSI port is mutual TLS and admits only the SAEs the KME serves; a
scraper is not an SAE.  The metrics listener is plain HTTP, loopback by default, and serves only
``/metrics`` (``GET``); it carries counts and rates, never key material, key IDs or SAE secrets
(SAE IDs are not labels either: the request counters are by endpoint and status only).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ...exceptions import ConfigurationError
from .listener import HTTP_LOG

if TYPE_CHECKING:
    from .linksupply import LinkKeySupply
    from .store import KeyStore

__all__ = ["ABORT_REASONS", "ALARM_KINDS", "ENDPOINTS", "KMEMetrics", "KMEMetricsServer"]

log = logging.getLogger("hybridkex.qkd.kme")

#: The ``endpoint`` label of ``hybridkex_kme_requests_total``.
ENDPOINTS: Final = ("status", "enc_keys", "dec_keys", "openapi", "other")
#: The ``status`` label values exposed from the start (ETSI GS QKD 014 uses only these).
STATUSES: Final = ("200", "400", "401", "503")
#: The ``reason`` label of ``hybridkex_qkdlink_blocks_aborted_total`` (see :func:`..qkdlink.session.abort_reason`).
ABORT_REASONS: Final = ("qber", "verification", "authentication", "no_secret_key", "abandoned", "other")
#: The ``kind`` label of ``hybridkex_qkdlink_alarms_total``.
ALARM_KINDS: Final = ("qber", "authentication", "replay", "stopped")
_IDLE_TIMEOUT = 5.0
_MAX_LINE = 8190


class KMEMetrics(Collector):
    """One KME's metrics: counters the HTTP layer feeds, and a live view of the store and its link end."""

    def __init__(self, kme_id: str, store: KeyStore, link: LinkKeySupply | None = None) -> None:
        self.kme_id = kme_id
        self._store = store
        self._link = link
        self._lock = threading.Lock()
        self._requests = {(e, s): 0 for e in ENDPOINTS for s in STATUSES}
        self._keys = {"master": 0, "slave": 0}
        self._refused_connections = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def __repr__(self) -> str:
        return f"KMEMetrics({self.kme_id!r})"

    # -- what the HTTP layer reports ---------------------------------------------------------------

    def count_request(self, endpoint: str, status: int) -> None:
        """One answered request; ``endpoint`` outside :data:`ENDPOINTS` counts as ``other``."""
        key = (endpoint if endpoint in ENDPOINTS else "other", str(status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def count_keys(self, role: str, n: int) -> None:
        """``n`` keys handed out: to a master (``enc_keys``) or a slave (``dec_keys``)."""
        with self._lock:
            self._keys[role] += n

    def count_refused_connection(self) -> None:
        """A connection closed at accept because the KME had ``max_connections`` open."""
        with self._lock:
            self._refused_connections += 1

    # -- the collector -----------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return []  # families are built at each scrape (auto_describe is off)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            requests, keys, refused = dict(self._requests), dict(self._keys), self._refused_connections
        info = GaugeMetricFamily("hybridkex_kme_info", "This KME (value is always 1).", labels=["kme", "supply"])
        info.add_metric([self.kme_id, "bb84" if self._link is not None else "model"], 1.0)
        yield info
        fam = CounterMetricFamily("hybridkex_kme_requests", "ETSI 014 requests answered, by endpoint and HTTP status.",
                                  labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(requests.items()):
            fam.add_metric([endpoint, status], n)
        yield fam
        fam = CounterMetricFamily("hybridkex_kme_keys_served", "Keys handed out by this KME: to masters "
                                  "(enc_keys) and to slaves (dec_keys).", labels=["role"])
        for role, n in sorted(keys.items()):
            fam.add_metric([role], n)
        yield fam
        yield CounterMetricFamily("hybridkex_kme_refused_connections", "Connections closed at accept: "
                                  "max_connections were open.", value=refused)
        yield from self._store_families()
        if self._link is not None:
            yield from self._link_families(self._link)

    def _store_families(self) -> Iterable[Metric]:
        st = self._store.stats()
        key_size = self._store.limits.key_size
        capacity = self._store.capacity_bits
        yield GaugeMetricFamily("hybridkex_kme_stored_keys", "Keys of key_size ready to be handed out "
                                "(ETSI status stored_key_count).", value=st.available_bits // key_size)
        yield GaugeMetricFamily("hybridkex_kme_max_keys", "Keys of key_size the store holds at most "
                                "(ETSI status max_key_count).", value=capacity // key_size)
        yield GaugeMetricFamily("hybridkex_kme_stored_key_bits", "Key material ready, in bits.",
                                value=st.available_bits)
        yield GaugeMetricFamily("hybridkex_kme_key_store_fill_ratio", "Stored key material over the store's "
                                "capacity (0 to 1).", value=min(1.0, st.available_bits / capacity))
        yield GaugeMetricFamily("hybridkex_kme_pending_keys", "Keys handed to a master, waiting for a slave "
                                "(the pair's shared count; never expired by the simulation).",
                                value=st.pending_keys)

    def _link_families(self, link: LinkKeySupply) -> Iterable[Metric]:
        ext = link.status_extension(self.kme_id)  # the same figures as ETSI status_extension at this KME
        side = link.side_stats(self.kme_id)
        yield GaugeMetricFamily("hybridkex_qkdlink_up", "1 while the link runs, 0 once it stopped "
                                "(link_stopped in the status says why).", value=0.0 if "link_stopped" in ext else 1.0)
        yield GaugeMetricFamily("hybridkex_qkdlink_distance_km", "Fibre length.", value=ext["distance_km"])
        yield CounterMetricFamily("hybridkex_qkdlink_blocks_started", "Blocks started at this end.",
                                  value=ext["blocks_started"])
        yield CounterMetricFamily("hybridkex_qkdlink_blocks_completed", "Blocks that gave a key at this end.",
                                  value=ext["blocks_ok"])
        fam = CounterMetricFamily("hybridkex_qkdlink_blocks_aborted", "Blocks that gave no key, by reason.",
                                  labels=["reason"])
        for reason in ABORT_REASONS:
            fam.add_metric([reason], side.aborted_reasons.get(reason, 0))
        yield fam
        fam = CounterMetricFamily("hybridkex_qkdlink_alarms", "Alarms: QBER above threshold (an eavesdropper?), "
                                  "MAC failure (tampering), replayed block number, link stopped.", labels=["kind"])
        for kind in ALARM_KINDS:
            fam.add_metric([kind], side.alarm_kinds.get(kind, 0))
        yield fam
        yield CounterMetricFamily("hybridkex_qkdlink_pending_keys_discarded", "Keys held back and discarded "
                                  "(the peer did not complete the block).", value=ext["pending_keys_discarded"])
        for name, key, help_text in (
                ("hybridkex_qkdlink_qber", "qber", "QBER of the last block measured (ratio)."),
                ("hybridkex_qkdlink_qber_mean", "qber_mean", "Mean QBER of the blocks measured (ratio).")):
            if ext[key] is not None:  # no block measured yet: no sample rather than a made-up 0
                yield GaugeMetricFamily(name, help_text, value=ext[key])
        yield GaugeMetricFamily("hybridkex_qkdlink_secret_key_rate_bps", "Secret key distilled per second of fibre "
                                "time at the real pulse rate (real-rate equivalent).", value=ext["secret_key_rate_bps"])
        yield GaugeMetricFamily("hybridkex_qkdlink_net_key_rate_bps", "Key that reached the KME, net of "
                                "authentication, per second of fibre time (real-rate equivalent).",
                                value=ext["net_key_rate_bps"])
        yield CounterMetricFamily("hybridkex_qkdlink_key_bits_delivered", "Key bits this end put in its KME's "
                                  "buffer.", value=ext["key_bits_delivered"])
        yield CounterMetricFamily("hybridkex_qkdlink_error_correction_leaked_bits", "Bits Cascade and the "
                                  "verification hash disclosed.", value=ext["error_correction_leaked_bits"])
        yield CounterMetricFamily("hybridkex_qkdlink_pulses", "Pulses of the finished blocks.", value=ext["pulses"])
        yield GaugeMetricFamily("hybridkex_qkdlink_auth_bootstrap_bits", "The bootstrap pre-shared secret, in bits.",
                                value=ext["auth_bootstrap_bits"])
        yield CounterMetricFamily("hybridkex_qkdlink_auth_consumed_bits", "Authentication key used by the "
                                  "Wegman-Carter MAC, in bits.", value=ext["auth_consumed_bits"])
        yield CounterMetricFamily("hybridkex_qkdlink_auth_reserved_bits", "Key taken from confirmed blocks to "
                                  "authenticate later ones, in bits.", value=ext["auth_reserved_bits"])
        yield GaugeMetricFamily("hybridkex_qkdlink_auth_available_bits", "Authentication key left in the pool, "
                                "in bits.", value=ext["auth_available_bits"])

    # -- exposition --------------------------------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """``(body, content type)`` for a scrape (text format 0.0.4 unless ``accept`` asks for another)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class KMEMetricsServer:
    """``GET /metrics`` of one KME over plain HTTP (``aiohttp.web``); other paths 404, other methods 405."""

    def __init__(self, metrics: KMEMetrics, host: str, port: int, *, field: str = "metrics") -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        self._field = field
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        """Listen; :attr:`url` then says where.

        Raises:
            ConfigurationError: the address cannot be bound (message names it).
        """
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0, logger=HTTP_LOG,
                               keepalive_timeout=_IDLE_TIMEOUT, max_line_size=_MAX_LINE, max_field_size=_MAX_LINE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ConfigurationError(f"cannot listen on {self.host}:{self.port} for {self.metrics.kme_id}'s metrics "
                                     f"({reason}); pick another port, or 0 for a free one", field=self._field) from None
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/metrics"
        log.info("%s: metrics at %s", self.metrics.kme_id, self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
