"""Tunnel metrics (``prometheus_client``), a health state, and the HTTP endpoint (``aiohttp.web``).

:class:`TunnelMetrics` owns one *private* :class:`prometheus_client.CollectorRegistry` (never the
library's global default, so two runtimes in one process, or an application that embeds the
tunnel and has its own metrics, never collide).  The runtime reports through a few named methods
(:meth:`TunnelMetrics.add_bytes` on the data path, :meth:`TunnelMetrics.count_handshake`, ...);
a channel factory uses :meth:`~TunnelMetrics.set_qkd_pool_levels`, :meth:`~TunnelMetrics.kme_error`,
:attr:`~TunnelMetrics.health`, and may register metrics of its own.  State that lives elsewhere
(the pool level, the KME's health) is read by *collectors* right before each scrape and health
check, so what is served is current, never the value of the last connection.

Worker processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set before this module is imported,
``prometheus_client`` keeps every value in memory-mapped files in that directory and
:meth:`TunnelMetrics.exposition` serves the sum over all processes (its multiprocess mode); each
gauge below says how its values combine.  Nothing else changes for the callers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, Literal, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .config import Address
from .logs import log_event

__all__ = [
    "CLOSE_OUTCOMES",
    "CONTENT_TYPE",
    "HANDSHAKE_OUTCOMES",
    "KME_ERROR_KINDS",
    "LATENCY_BUCKETS",
    "MULTIPROCESS",
    "REJECT_REASONS",
    "STATE_READ_REFUSALS",
    "Health",
    "HealthState",
    "MetricsServer",
    "MetricsSource",
    "TunnelMetrics",
    "start_metrics_server",
    "without_created",
]

#: Handshake outcomes, the ``outcome`` label of ``hybridkex_tunnel_handshakes_total``.
HANDSHAKE_OUTCOMES: Final = ("ok", "timeout", "auth_failed", "protocol_error", "policy_violation",
                             "key_source_error", "tls_error", "io_error", "target_unreachable", "rate_limited",
                             "failed", "internal_error", "steady_refused")
#: Why the server refused a connection under its limits, the ``reason`` label of ``..._rejected_total``:
#: open connections, the pre-authentication limit per address, the limit per peer identity.
REJECT_REASONS: Final = ("max_connections", "rate_limited", "peer_rate_limited")
#: Why a steady-state identity for a parent not in memory was refused without reading the shared state, the
#: ``reason`` label of ``hybridkex_state_reads_refused_total``: the state did not hold it moments ago
#: (``[state] unknown_ttl``), or over the read limits (``read_rate``, ``read_address_rate``).
STATE_READ_REFUSALS: Final = ("unknown_cached", "rate_limited")
#: How relayed connections ended, the ``outcome`` label of ``hybridkex_tunnel_closed_connections_total``: the
#: relay's outcomes, ``shutdown`` (cut at the drain deadline) and ``target_unreachable``.
CLOSE_OUTCOMES: Final = ("closed", "idle_timeout", "reset", "stream_error", "io_error", "internal_error", "shutdown",
                         "target_unreachable")
#: Kinds of failed KME requests, the ``kind`` label of ``hybridkex_kme_errors_total``.
KME_ERROR_KINDS: Final = ("connection", "timeout", "unavailable", "key_not_found", "unauthorized", "bad_request",
                          "bad_response", "key_reuse", "other")
#: Handshake latency buckets in seconds; QKD handshakes with a remote KME take around a second.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: What a scraper that asks for nothing in particular gets (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

#: prometheus_client picks its value storage when it is first imported, from this variable; read
#: it once here, too, so the exposition matches the storage.
MULTIPROCESS: Final = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

Direction = Literal["in", "out"]
HealthState = Literal["ok", "degraded", "unhealthy"]


class Health:
    """Named health components: ``ok``, ``degraded`` (still serving, answered 200) or ``unhealthy`` (503).

    The body's first line is the overall state (``ok``, ``degraded``, ``unhealthy`` or ``draining``);
    one ``component: reason`` line follows for each component that is not ok.
    """

    def __init__(self) -> None:
        self._components: dict[str, tuple[HealthState, str]] = {}
        self.draining = False

    def set(self, component: str, ok: bool | HealthState, detail: str = "") -> None:
        """Report ``component`` (e.g. ``"kme"``): ``True``/``"ok"``, ``"degraded"``, or ``False``/``"unhealthy"``,
        with a short public reason."""
        state: HealthState = ("ok" if ok else "unhealthy") if isinstance(ok, bool) else ok
        self._components[component] = (state, detail)

    def report(self) -> tuple[bool, str]:
        """``(serving, body)``: ``serving`` is False (HTTP 503) when draining or any component is unhealthy."""
        if self.draining:
            return False, "draining\n"
        bad = sorted((name, state, detail) for name, (state, detail) in self._components.items() if state != "ok")
        if not bad:
            return True, "ok\n"
        overall = "unhealthy" if any(state == "unhealthy" for _, state, _ in bad) else "degraded"
        lines = [f"{name}: {detail or state}" for name, state, detail in bad]
        return overall != "unhealthy", "".join(line + "\n" for line in (overall, *lines))


class _WithoutCreated(Collector):
    """A registry's metrics without the ``<name>_created`` timestamps ``prometheus_client`` adds to counters
    and histograms: they would double the number of series, and the tunnel never served them.  (The
    library's own switch, ``disable_created_metrics()``, is process-wide.)"""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        for family in self._source.collect():
            created = family.name + "_created"
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [s for s in family.samples if s.name != created]
            yield copy


def without_created(source: Collector) -> Collector:
    """``source``'s metrics without the ``<name>_created`` samples (as every tunnel endpoint serves them)."""
    return _WithoutCreated(source)


class TunnelMetrics:
    """The tunnel's metrics on a private registry, and the API the runtime and channel factories use.

    The runtime calls :meth:`add_bytes` (per relayed chunk), :meth:`count_handshake`,
    :meth:`connection_opened` / :meth:`connection_ended`, :meth:`count_refused`,
    :meth:`count_closed`, :meth:`count_reload` and :meth:`set_configured_peers`.  Factories use
    :meth:`set_qkd_pool_levels`, :meth:`kme_error`, :attr:`health` and :meth:`add_collector`, and
    may register further metrics with :meth:`counter`, :meth:`gauge` and :meth:`histogram`.  The
    ``prometheus_client`` objects are attributes (``handshakes``, ``bytes``, ...) for reading.
    """

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.health = Health()
        self._collectors: list[Callable[[], None]] = []
        # Gauges say how worker processes' values combine in multiprocess mode (ignored otherwise).
        self.info = self.gauge("hybridkex_tunnel_info", "Tunnel role (value is always 1).", ("role",),
                               multiprocess_mode="max")
        self.info.labels(role).set(1)
        self.handshakes = self.counter("hybridkex_tunnel_handshakes_total", "Handshakes by outcome.", ("outcome",),
                                       initial=[(o,) for o in HANDSHAKE_OUTCOMES])
        self.handshake_seconds = self.histogram(
            "hybridkex_tunnel_handshake_duration_seconds", "Duration of successful handshakes in seconds.")
        self.bytes = self.counter(
            "hybridkex_tunnel_bytes_total",
            "Bytes relayed; direction in = from the listening side to the target, out = back.",
            ("direction",), initial=[("in",), ("out",)])
        self.active = self.gauge("hybridkex_tunnel_active_connections", "Open connections (incl. handshaking).",
                                 multiprocess_mode="livesum")
        self.connections = self.counter("hybridkex_tunnel_connections_total", "Connections accepted.")
        self.rejected = self.counter(
            "hybridkex_tunnel_rejected_connections_total", "Connections refused under the limits, by reason.",
            ("reason",), initial=[(r,) for r in REJECT_REASONS])
        self.closed = self.counter(
            "hybridkex_tunnel_closed_connections_total", "Relayed connections closed, by how they ended.",
            ("outcome",), initial=[(o,) for o in CLOSE_OUTCOMES])
        self.reloads = self.counter(
            "hybridkex_tunnel_config_reloads_total", "Configuration reloads (SIGHUP) by outcome.", ("outcome",),
            initial=[("ok",), ("error",)])
        self.peers = self.gauge("hybridkex_tunnel_configured_peers", "Peers in the running configuration.",
                                multiprocess_mode="max")
        self.qkd_pool = self.gauge("hybridkex_qkd_pool_keys", "QKD keys ready in the local pool, per peer SAE.",
                                   ("peer",), multiprocess_mode="livesum")
        self.state_reads_refused = self.counter(
            "hybridkex_state_reads_refused_total",
            "Steady-state identities for parents not in memory refused without a shared-state read, by reason.",
            ("reason",), initial=[(r,) for r in STATE_READ_REFUSALS])
        self.kme_errors = self.counter("hybridkex_kme_errors_total", "Failed KME requests, by kind.", ("kind",),
                                       initial=[(k,) for k in KME_ERROR_KINDS])
        # The data path's counters, resolved once: one dict lookup and one locked add per chunk.
        self._bytes = {d: self.bytes.labels(d).inc for d in ("in", "out")}
        self._connections = self.connections.inc
        self._active_inc, self._active_dec = self.active.inc, self.active.dec

    # --- the runtime's API ----------------------------------------------------------------------

    def add_bytes(self, direction: Direction, n: int) -> None:
        """Count ``n`` relayed bytes; ``direction`` ``"in"`` = listening side -> target, ``"out"`` = back.

        Called for every chunk the relay delivers (or for a batch of them): keep it this cheap.
        """
        self._bytes[direction](n)

    def count_handshake(self, outcome: str, seconds: float | None = None) -> None:
        """Count one handshake by ``outcome`` (:data:`HANDSHAKE_OUTCOMES`); ``seconds`` is a success's duration."""
        self.handshakes.labels(outcome).inc()
        if seconds is not None:
            self.handshake_seconds.observe(seconds)

    def connection_opened(self) -> None:
        """An accepted connection (past the limits) is now open."""
        self._connections()
        self._active_inc()

    def connection_ended(self) -> None:
        self._active_dec()

    def count_refused(self, reason: str) -> None:
        """A connection refused under the limits (:data:`REJECT_REASONS`)."""
        self.rejected.labels(reason).inc()

    def count_closed(self, outcome: str) -> None:
        """A relayed connection closed, by how it ended (or ``target_unreachable``)."""
        self.closed.labels(outcome).inc()

    def count_reload(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "error").inc()

    def set_configured_peers(self, n: int) -> None:
        self.peers.set(n)

    # --- factory API ----------------------------------------------------------------------------

    def set_qkd_pool_level(self, peer: str, keys: int) -> None:
        """Report how many QKD keys are ready for ``peer`` (a gauge)."""
        self.qkd_pool.labels(peer).set(keys)

    def set_qkd_pool_levels(self, levels: Mapping[str, int]) -> None:
        """Report the level of every peer's pool at once, forgetting peers not given (e.g. removed by a reload)."""
        self.qkd_pool.clear()
        for peer, keys in levels.items():
            self.qkd_pool.labels(peer).set(keys)

    def count_state_reads_refused(self, reason: str, n: int = 1) -> None:
        """``n`` identities refused without a shared-state read (:data:`STATE_READ_REFUSALS`)."""
        if n > 0:
            self.state_reads_refused.labels(reason).inc(n)

    def kme_error(self, kind: str) -> None:
        """Count one failed KME request; ``kind`` is one of :data:`KME_ERROR_KINDS` (or a factory's own)."""
        self.kme_errors.labels(kind).inc()

    def add_collector(self, collect: Callable[[], None]) -> None:
        """Run ``collect`` before every scrape and health check (to set gauges and health from live state).

        A collector that raises is logged and skipped: a scrape never fails because of one.
        """
        self._collectors.append(collect)

    def remove_collector(self, collect: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._collectors.remove(collect)

    def collect(self) -> None:
        for collect in list(self._collectors):
            try:
                collect()
            except Exception as exc:
                log_event(logging.ERROR, "metrics_collector_failed", "a metrics collector failed",
                          error=f"{type(exc).__name__}: {exc}")

    def health_report(self) -> tuple[bool, str]:
        """:meth:`Health.report` on freshly collected state."""
        self.collect()
        return self.health.report()

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                initial: Iterable[Sequence[str]] = ()) -> Counter:
        """Register and return a new counter; ``initial`` label values are exposed (as 0) from the start."""
        metric = Counter(name, help_text, labelnames, registry=self.registry)
        for values in initial:
            metric.labels(*values)
        return metric

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = (), *,
              multiprocess_mode: Literal["all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
                                         "mostrecent", "livemostrecent"] = "all") -> Gauge:
        """Register and return a new gauge."""
        return Gauge(name, help_text, labelnames, registry=self.registry, multiprocess_mode=multiprocess_mode)

    def histogram(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        """Register and return a new histogram (no labels)."""
        return Histogram(name, help_text, registry=self.registry, buckets=buckets)

    # --- exposition -----------------------------------------------------------------------------

    def exposed(self) -> Collector:
        """What a scrape reads: this registry, or in multiprocess mode every process's values."""
        if not MULTIPROCESS:
            return _WithoutCreated(self.registry)
        merged = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # the library leaves it unannotated
        return merged  # the multiprocess mode has no _created samples

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """``(body, content type)`` for a scrape whose ``Accept`` header is ``accept``, on fresh state.

        Without an ``Accept`` that asks for OpenMetrics or a newer text format, the Prometheus text
        format 0.0.4 (:data:`CONTENT_TYPE`).
        """
        self.collect()
        encode, content_type = choose_encoder(accept)
        return encode(self.exposed()), content_type

    def render(self) -> str:
        """The text format 0.0.4, on fresh state (for tests and debugging)."""
        self.collect()
        return generate_latest(self.exposed()).decode("utf-8")


# --- HTTP endpoint ------------------------------------------------------------------------------

#: Longest request line and header line accepted (a longer one is answered 400).
_MAX_LINE = 8190
#: A connection that has not completed a request this long after connecting (or after the last
#: response) is closed: slow or idle clients cost a socket for at most this long and, since every
#: connection is served on its own, never delay the health checker.
_IDLE_TIMEOUT = 5.0
_TEXT: Final = "text/plain; charset=utf-8"


class _QuietBadRequests(logging.Filter):
    """aiohttp logs every malformed request as an error with a traceback; for a metrics endpoint that is
    a confused client, not a fault of the tunnel: one debug event instead.  Other errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        log_event(logging.DEBUG, "metrics_bad_request", "malformed request to the metrics endpoint answered 400",
                  error=f"{type(exc).__name__}: {exc.message}")
        return False


_HTTP_LOG: Final = logging.getLogger(__name__ + ".http")
_HTTP_LOG.addFilter(_QuietBadRequests())


class MetricsSource(Protocol):
    """What the endpoint serves: a :class:`TunnelMetrics`, or the worker supervisor's merged view."""

    def exposition(self, accept: str = "") -> tuple[bytes, str]: ...

    def health_report(self) -> tuple[bool, str]: ...


class MetricsServer:
    """Serves ``/metrics`` and/or ``/healthz`` over plain HTTP/1.1 with ``aiohttp.web`` (meant for loopback).

    ``GET`` and ``HEAD`` only; other methods on these paths are answered 405, other paths 404.
    """

    def __init__(self, metrics: MetricsSource, listen: Address, *, serve_metrics: bool, serve_health: bool) -> None:
        self.metrics = metrics
        self.listen = listen
        self.serve_metrics = serve_metrics
        self.serve_health = serve_health
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> Address:
        """The bound address (the real port when the configured port was 0)."""
        assert self._runner is not None
        host, port = self._runner.addresses[0][:2]
        return Address(host, port)

    async def start(self) -> None:
        app = web.Application()
        if self.serve_metrics:
            app.router.add_get("/metrics", self._metrics)
        if self.serve_health:
            app.router.add_get("/healthz", self._health)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0, logger=_HTTP_LOG,
                               keepalive_timeout=_IDLE_TIMEOUT, max_line_size=_MAX_LINE, max_field_size=_MAX_LINE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.listen.host, self.listen.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    async def _health(self, request: web.Request) -> web.Response:
        ok, body = self.metrics.health_report()
        return web.Response(status=200 if ok else 503, body=body.encode("utf-8"),
                            headers={"Content-Type": _TEXT, "Cache-Control": "no-store"})


async def start_metrics_server(metrics: MetricsSource, listen: Address, *, serve_metrics: bool,
                               serve_health: bool) -> MetricsServer:
    """Start the endpoint and log where it listens."""
    server = MetricsServer(metrics, listen, serve_metrics=serve_metrics, serve_health=serve_health)
    await server.start()
    paths = [p for p, on in (("/metrics", serve_metrics), ("/healthz", serve_health)) if on]
    log_event(logging.INFO, "metrics_listening", "metrics endpoint listening", address=str(server.address),
              paths=paths)
    return server
