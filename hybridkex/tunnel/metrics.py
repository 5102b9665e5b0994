"""Tunnel metrics in the Prometheus text exposition format, a health state, and the HTTP endpoint.

:class:`TunnelMetrics` holds the metrics the runtime maintains (handshakes, latency, bytes,
connections) and the small API a channel factory uses to report its own state: the QKD key pool
level and KME errors, or any further counter, gauge or histogram it registers.  State that lives
elsewhere (the pool level, the KME's health) is read by *collectors* right before each scrape
and health check, so what is served is current, never the value of the last connection.  The
endpoint is a deliberately small asyncio HTTP/1.1 server (GET ``/metrics`` and ``/healthz``, one
request per connection, bounded request size and time); it is off unless configured and binds to
loopback by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Literal

from .config import Address
from .logs import log_event

__all__ = [
    "HANDSHAKE_OUTCOMES",
    "KME_ERROR_KINDS",
    "REJECT_REASONS",
    "Counter",
    "Gauge",
    "Health",
    "HealthState",
    "Histogram",
    "MetricsServer",
    "Registry",
    "TunnelMetrics",
]

#: Handshake outcomes, the ``outcome`` label of ``hybridkex_tunnel_handshakes_total``.
HANDSHAKE_OUTCOMES: Final = ("ok", "timeout", "auth_failed", "protocol_error", "policy_violation",
                             "key_source_error", "tls_error", "io_error", "target_unreachable", "rate_limited",
                             "internal_error", "steady_refused")
#: Why the server refused a connection under its limits, the ``reason`` label of ``..._rejected_total``:
#: open connections, the pre-authentication limit per address, the limit per peer identity.
REJECT_REASONS: Final = ("max_connections", "rate_limited", "peer_rate_limited")
#: Kinds of failed KME requests, the ``kind`` label of ``hybridkex_kme_errors_total``.
KME_ERROR_KINDS: Final = ("connection", "timeout", "unavailable", "key_not_found", "unauthorized", "bad_request",
                          "bad_response", "key_reuse", "other")
#: Handshake latency buckets in seconds; QKD handshakes with a remote KME take around a second.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class _Valued(_Metric):
    """A metric with one number per label combination (counters and gauges)."""

    _values: dict[tuple[str, ...], float]

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [*self.header(), *(f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items)]


class Counter(_Valued):
    """A monotonically increasing count, optionally split by labels."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 initial: Iterable[Sequence[str]] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0
        for values in initial:
            self._values[tuple(values)] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount



class Gauge(_Valued):
    """A value that goes up and down, optionally split by labels."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def remove(self, **labels: str) -> None:
        """Forget one label combination (e.g. a peer removed by a reload)."""
        with self._lock:
            self._values.pop(self._key(labels), None)

    def replace(self, values: Iterable[tuple[Sequence[str], float]]) -> None:
        """Set every label combination at once, forgetting those not given (a collector's snapshot)."""
        fresh = {tuple(str(v) for v in key): float(value) for key, value in values}
        with self._lock:
            self._values = fresh



class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count (no labels)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text)
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("histogram buckets must be a sorted, non-empty sequence")
        self.buckets = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            else:
                self._counts[-1] += 1

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        lines = self.header()
        running = 0
        for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        lines.append(f"{self.name}_sum {_num(total)}")
        lines.append(f"{self.name}_count {running}")
        return lines


class Registry:
    """An ordered set of metrics rendered together; names must be unique."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


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


class TunnelMetrics:
    """The tunnel's metrics, and the API a channel factory uses to add its own.

    Factories should use :meth:`set_qkd_pool_level`, :meth:`kme_error` and :attr:`health`, and may
    register further metrics with :meth:`counter`, :meth:`gauge` and :meth:`histogram`.
    """

    def __init__(self, role: str) -> None:
        self.registry = Registry()
        self.health = Health()
        self.info = self.gauge("hybridkex_tunnel_info", "Tunnel role (value is always 1).", ("role",))
        self.info.set(1, role=role)
        self.handshakes = self.counter(
            "hybridkex_tunnel_handshakes_total", "Handshakes by outcome.", ("outcome",),
            initial=[(o,) for o in HANDSHAKE_OUTCOMES])
        self.handshake_seconds = self.histogram(
            "hybridkex_tunnel_handshake_duration_seconds", "Duration of successful handshakes in seconds.")
        self.bytes = self.counter(
            "hybridkex_tunnel_bytes_total",
            "Bytes relayed; direction in = from the listening side to the target, out = back.",
            ("direction",), initial=[("in",), ("out",)])
        self.active = self.gauge("hybridkex_tunnel_active_connections", "Open connections (incl. handshaking).")
        self.connections = self.counter("hybridkex_tunnel_connections_total", "Connections accepted.")
        self.rejected = self.counter(
            "hybridkex_tunnel_rejected_connections_total", "Connections refused under the limits, by reason.",
            ("reason",), initial=[(r,) for r in REJECT_REASONS])
        self.closed = self.counter(
            "hybridkex_tunnel_closed_connections_total", "Relayed connections closed, by how they ended.",
            ("outcome",))
        self.reloads = self.counter(
            "hybridkex_tunnel_config_reloads_total", "Configuration reloads (SIGHUP) by outcome.", ("outcome",),
            initial=[("ok",), ("error",)])
        self.peers = self.gauge("hybridkex_tunnel_configured_peers", "Peers in the running configuration.")
        self.qkd_pool = self.gauge(
            "hybridkex_qkd_pool_keys", "QKD keys ready in the local pool, per peer SAE.", ("peer",))
        self.kme_errors = self.counter(
            "hybridkex_kme_errors_total", "Failed KME requests, by kind.", ("kind",),
            initial=[(k,) for k in KME_ERROR_KINDS])
        self._collectors: list[Callable[[], None]] = []

    # --- factory API --------------------------------------------------------------------------

    def set_qkd_pool_level(self, peer: str, keys: int) -> None:
        """Report how many QKD keys are ready for ``peer`` (a gauge)."""
        self.qkd_pool.set(keys, peer=peer)

    def kme_error(self, kind: str) -> None:
        """Count one failed KME request; ``kind`` is one of :data:`KME_ERROR_KINDS` (or a factory's own)."""
        self.kme_errors.inc(kind=kind)

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
        """Register and return a new counter."""
        metric = Counter(name, help_text, labelnames, initial)
        self.registry.register(metric)
        return metric

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Register and return a new gauge."""
        metric = Gauge(name, help_text, labelnames)
        self.registry.register(metric)
        return metric

    def histogram(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        """Register and return a new histogram."""
        metric = Histogram(name, help_text, buckets)
        self.registry.register(metric)
        return metric

    def render(self) -> str:
        self.collect()
        return self.registry.render()


# --- HTTP endpoint ------------------------------------------------------------------------------

_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 5.0
#: Connections held at once. A new connection beyond this evicts the oldest one instead of being
#: refused, so idle or slow clients (which can hold a slot for _REQUEST_TIMEOUT) never lock out
#: the health checker: it always gets in, at the expense of whoever has waited longest.
_MAX_CLIENTS = 64
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   503: "Service Unavailable"}


class MetricsServer:
    """Serves ``/metrics`` and/or ``/healthz`` over plain HTTP/1.1 (meant for loopback)."""

    def __init__(self, metrics: TunnelMetrics, listen: Address, *, serve_metrics: bool, serve_health: bool) -> None:
        self.metrics = metrics
        self.listen = listen
        self.serve_metrics = serve_metrics
        self.serve_health = serve_health
        self._server: asyncio.Server | None = None
        self._tasks: dict[asyncio.Task[None], None] = {}  # insertion-ordered: oldest first
        self.evicted = 0

    @property
    def address(self) -> Address:
        """The bound address (the real port when the configured port was 0)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen.host, self.listen.port,
                                                  limit=_MAX_REQUEST)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        while len(self._tasks) >= _MAX_CLIENTS:
            oldest = next(iter(self._tasks))
            del self._tasks[oldest]
            oldest.cancel()
            self.evicted += 1
        self._tasks[task] = None
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                await self._respond(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a broken or slow scraper only loses its own request
        except asyncio.CancelledError:
            if task in self._tasks:  # cancelled by close(), not evicted: let the cancellation through
                raise
            task.uncancel()  # evicted: this connection just ends
        finally:
            self._tasks.pop(task, None)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._send(writer, 400, "bad request\n", head_only=False)
            return
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if path == "/metrics" and self.serve_metrics:
            status, body, ctype = 200, self.metrics.render(), CONTENT_TYPE
        elif path == "/healthz" and self.serve_health:
            ok, body = self.metrics.health_report()
            status, ctype = (200 if ok else 503), "text/plain; charset=utf-8"
        else:
            status, body, ctype = 404, "not found\n", "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            status, body, ctype = 405, "method not allowed\n", "text/plain; charset=utf-8"
        await self._send(writer, status, body, head_only=method == "HEAD", content_type=ctype)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: str, *, head_only: bool,
                    content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode("utf-8")
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + data)
        await writer.drain()


async def start_metrics_server(metrics: TunnelMetrics, listen: Address, *, serve_metrics: bool,
                               serve_health: bool) -> MetricsServer:
    """Start the endpoint and log where it listens."""
    server = MetricsServer(metrics, listen, serve_metrics=serve_metrics, serve_health=serve_health)
    await server.start()
    paths = [p for p, on in (("/metrics", serve_metrics), ("/healthz", serve_health)) if on]
    log_event(logging.INFO, "metrics_listening", "metrics endpoint listening", address=str(server.address),
              paths=paths)
    return server
