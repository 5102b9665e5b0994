"""Tunnel metrics: the exposition (checked with prometheus_client's parsers), the documented names, the
HTTP endpoint over real sockets, and the multiprocess mode in real processes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from tunnelhelpers import WAIT, metric, metric_families, parse_prometheus

from hybridkex.tunnel import metrics as metrics_module
from hybridkex.tunnel.config import Address
from hybridkex.tunnel.logs import configure_logging
from hybridkex.tunnel.metrics import (
    HANDSHAKE_OUTCOMES,
    KME_ERROR_KINDS,
    LATENCY_BUCKETS,
    MetricsServer,
    TunnelMetrics,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tunnel.md"

pytestmark = pytest.mark.timeout(120)


def documented_metrics() -> dict[str, tuple[str, str, list[str]]]:
    """docs/tunnel.md's metrics table: name -> (type, label name or "", documented label values)."""
    section = DOCS.read_text().split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    section = section.split("**With `--workers N`**", 1)[0]  # the supervisor's own table follows
    rows: dict[str, tuple[str, str, list[str]]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `(hybridkex_\w+)` \| (\w+) \|([^|]*)\|", line)
        if m:
            ticks = re.findall(r"`([^`]+)`", m.group(3))
            rows[m.group(1)] = (m.group(2), ticks[0] if ticks else "", ticks[1:])
    return rows


def test_exposition_has_exactly_the_documented_metrics() -> None:
    docs = documented_metrics()
    assert len(docs) >= 12, "the docs' metrics table was not found"
    m = TunnelMetrics("server")
    m.set_qkd_pool_level("sae-b", 3)  # the only family without samples until a pool reports
    families = metric_families(m.render())
    # A counter's family is named without _total; the sample names keep it.
    exposed = {f.name + ("_total" if f.type == "counter" else ""): f for f in families.values()}
    assert set(exposed) == set(docs), "exposed and documented metrics differ"
    for name, (kind, label, values) in docs.items():
        family = exposed[name]
        assert family.type == kind, name
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert labels == ({label} if label else set()), name
        # Documented label values are exposed from the start (at 0), so rate() works from the first scrape.
        present = {s.labels.get(label) for s in family.samples}
        assert set(values) <= present, (name, set(values) - present)
    assert set(docs["hybridkex_tunnel_handshakes_total"][2]) == set(HANDSHAKE_OUTCOMES)
    assert set(docs["hybridkex_kme_errors_total"][2]) == set(KME_ERROR_KINDS)


def test_counters_gauges_histogram_and_factory_metrics() -> None:
    m = TunnelMetrics("client")
    m.add_bytes("in", 65536)
    m.add_bytes("in", 10)
    m.add_bytes("out", 7)
    for seconds in (0.004, 0.3, 12.0):
        m.count_handshake("ok", seconds)
    m.count_handshake("timeout")
    m.connection_opened()
    m.connection_opened()
    m.connection_ended()
    m.count_refused("max_connections")
    m.count_closed("idle_timeout")
    m.count_reload(ok=False)
    m.set_configured_peers(3)
    m.kme_error("unavailable")
    m.kme_error('we"ird\\\nkind')  # a factory's own kind, with everything the format must escape
    extra = m.counter("hybridkex_custom_total", "Factory-defined.\nSecond line.")
    extra.inc(2)
    text = m.render()
    samples = parse_prometheus(text)
    assert metric(samples, "hybridkex_tunnel_info", role="client") == 1
    assert metric(samples, "hybridkex_tunnel_bytes_total", direction="in") == 65546
    assert metric(samples, "hybridkex_tunnel_bytes_total", direction="out") == 7
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok") == 3
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="timeout") == 1
    assert metric(samples, "hybridkex_tunnel_connections_total") == 2
    assert metric(samples, "hybridkex_tunnel_active_connections") == 1
    assert metric(samples, "hybridkex_tunnel_rejected_connections_total", reason="max_connections") == 1
    assert metric(samples, "hybridkex_tunnel_closed_connections_total", outcome="idle_timeout") == 1
    assert metric(samples, "hybridkex_tunnel_config_reloads_total", outcome="error") == 1
    assert metric(samples, "hybridkex_tunnel_configured_peers") == 3
    assert metric(samples, "hybridkex_kme_errors_total", kind="unavailable") == 1
    assert metric(samples, "hybridkex_kme_errors_total", kind='we"ird\\\nkind') == 1
    assert metric(samples, "hybridkex_custom_total") == 2
    assert metric_families(text)["hybridkex_custom"].documentation == "Factory-defined.\nSecond line."
    # Cumulative buckets: 4 ms in the first, 0.3 s from 0.5 on, 12 s only in +Inf.
    name = "hybridkex_tunnel_handshake_duration_seconds"
    buckets = {le: metric(samples, name + "_bucket", le=le) for le in (*map(str, LATENCY_BUCKETS), "+Inf")}
    assert buckets["0.005"] == 1 and buckets["0.25"] == 1 and buckets["0.5"] == 2 and buckets["10.0"] == 2
    assert buckets["+Inf"] == 3 == metric(samples, name + "_count")
    assert metric(samples, name + "_sum") == pytest.approx(12.304)
    assert "_created" not in text  # the tunnel serves no creation timestamps
    # The pool gauge is replaced as a whole: a peer no longer reported disappears.
    m.set_qkd_pool_levels({"sae-a": 5, "sae-b": 0})
    m.set_qkd_pool_levels({"sae-a": 4})
    pool = {k: v for k, v in parse_prometheus(m.render()).items() if k[0] == "hybridkex_qkd_pool_keys"}
    assert pool == {("hybridkex_qkd_pool_keys", (("peer", "sae-a"),)): 4}


def test_each_tunnel_has_its_own_registry() -> None:
    a, b = TunnelMetrics("server"), TunnelMetrics("server")  # the global registry would refuse the second
    a.add_bytes("out", 5)
    assert metric(parse_prometheus(a.render()), "hybridkex_tunnel_bytes_total", direction="out") == 5
    assert metric(parse_prometheus(b.render()), "hybridkex_tunnel_bytes_total", direction="out") == 0
    with pytest.raises(ValueError, match="Duplicated"):
        a.counter("hybridkex_tunnel_bytes_total", "again")


def test_collectors_run_before_each_scrape_and_a_failing_one_is_skipped() -> None:
    m = TunnelMetrics("server")
    level = [7]
    m.add_collector(lambda: m.set_qkd_pool_level("sae-a", level[0]))

    def broken() -> None:
        raise RuntimeError("collector bug")

    m.add_collector(broken)
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        assert metric(parse_prometheus(m.render()), "hybridkex_qkd_pool_keys", peer="sae-a") == 7
        level[0] = 2
        assert metric(parse_prometheus(m.render()), "hybridkex_qkd_pool_keys", peer="sae-a") == 2
    finally:
        configure_logging("text", "info")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["metrics_collector_failed"] * 2
    assert events[0]["error"] == "RuntimeError: collector bug"
    m.remove_collector(broken)
    m.remove_collector(broken)  # removing twice is harmless


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    m = TunnelMetrics("server")
    m.add_bytes("in", 3)
    body, ctype = m.exposition("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics_families(body.decode())}  # raises unless it ends in "# EOF"
    samples = {(s.name, tuple(s.labels.items())): s.value for s in families["hybridkex_tunnel_bytes"].samples}
    assert samples[("hybridkex_tunnel_bytes_total", (("direction", "in"),))] == 3
    body, ctype = m.exposition("")
    assert ctype == "text/plain; version=0.0.4; charset=utf-8" and not body.endswith(b"# EOF\n")


# --- the HTTP endpoint ------------------------------------------------------------------------------


@asynccontextmanager
async def endpoint(metrics: TunnelMetrics, *, serve_metrics: bool = True,
                   serve_health: bool = True) -> AsyncIterator[str]:
    server = MetricsServer(metrics, Address("127.0.0.1", 0), serve_metrics=serve_metrics, serve_health=serve_health)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.address.port}"
    finally:
        await server.close()


async def raw(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh TCP connection and read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


def test_endpoint_serves_metrics_and_health_over_http() -> None:
    async def main() -> None:
        metrics = TunnelMetrics("server")
        metrics.add_bytes("out", 11)
        async with endpoint(metrics) as url, aiohttp.ClientSession() as http:
            async with http.get(url + "/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                assert resp.headers["Cache-Control"] == "no-store"
                samples = parse_prometheus(await resp.text())
            assert metric(samples, "hybridkex_tunnel_bytes_total", direction="out") == 11
            async with http.head(url + "/metrics") as resp:
                assert resp.status == 200 and await resp.read() == b""
            async with http.get(url + "/healthz") as resp:
                assert (resp.status, await resp.text()) == (200, "ok\n")
            metrics.health.set("kme", "degraded", "KME unreachable; the pool covers the next handshakes")
            async with http.get(url + "/healthz") as resp:
                assert (resp.status, await resp.text()) == (
                    200, "degraded\nkme: KME unreachable; the pool covers the next handshakes\n")
            metrics.health.set("kme", False, "KME unreachable")
            async with http.get(url + "/healthz") as resp:
                assert (resp.status, await resp.text()) == (503, "unhealthy\nkme: KME unreachable\n")
            metrics.health.set("kme", True)
            metrics.health.draining = True
            async with http.get(url + "/healthz") as resp:
                assert (resp.status, await resp.text()) == (503, "draining\n")

    asyncio.run(main())


def test_endpoint_answers_bad_requests_cleanly_and_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_IDLE_TIMEOUT", 0.5)

    async def main() -> None:
        metrics = TunnelMetrics("server")
        async with endpoint(metrics, serve_health=False) as url, aiohttp.ClientSession() as http:
            async with http.get(url + "/nope") as resp:
                assert resp.status == 404
            async with http.get(url + "/healthz") as resp:  # health is off here
                assert resp.status == 404
            async with http.post(url + "/metrics", data=b"x") as resp:
                assert resp.status == 405 and resp.headers["Allow"] == "GET,HEAD"
            async with http.delete(url + "/metrics") as resp:
                assert resp.status == 405
            for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # a TLS hello
                         b"GET /metrics HTTP/1.1\r\n\r\n",  # no Host
                         b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # over the line limit
                         b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",  # too many headers
                         b"NOT HTTP AT ALL\r\n\r\n"):
                answer = await raw(url, junk)
                assert re.match(rb"HTTP/1\.[01] 400 Bad Request\r\n", answer), answer[:80]
            # Silent and half-sent connections are closed after the idle timeout, and while they are
            # open every other request is served.
            idle = [await asyncio.open_connection(*url.removeprefix("http://").split(":")) for _ in range(100)]
            idle[0][1].write(b"GET /metr")
            async with http.get(url + "/metrics") as resp:
                assert resp.status == 200
            for reader, writer in idle:
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
                writer.close()
            async with http.get(url + "/metrics") as resp:
                assert resp.status == 200 and "hybridkex_tunnel_info" in await resp.text()

    asyncio.run(main())


def test_endpoint_refuses_a_busy_port() -> None:
    async def main() -> None:
        async with endpoint(TunnelMetrics("server")) as url:
            port = int(url.rsplit(":", 1)[1])
            second = MetricsServer(TunnelMetrics("server"), Address("127.0.0.1", port), serve_metrics=True,
                                   serve_health=False)
            with pytest.raises(OSError):
                await second.start()
            await second.close()

    asyncio.run(main())


# --- multiprocess mode ------------------------------------------------------------------------------

_WORKER = """
import sys
from hybridkex.tunnel.metrics import MULTIPROCESS, TunnelMetrics
assert MULTIPROCESS
m = TunnelMetrics("server")
m.add_bytes("in", int(sys.argv[1]))
m.count_handshake("ok", 0.02)
m.set_configured_peers(2)
"""

_SCRAPER = """
from hybridkex.tunnel.metrics import TunnelMetrics
print(TunnelMetrics("server").render(), end="")
"""


def test_multiprocess_mode_sums_what_every_process_counted(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in (100, 23):
        subprocess.run([sys.executable, "-c", _WORKER, str(n)], env=env, check=True, timeout=WAIT * 4)
    out = subprocess.run([sys.executable, "-c", _SCRAPER], env=env, check=True, timeout=WAIT * 4,
                         capture_output=True, text=True).stdout
    samples = parse_prometheus(out)
    assert "_created" not in out
    assert metric(samples, "hybridkex_tunnel_bytes_total", direction="in") == 123
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok") == 2
    assert metric(samples, "hybridkex_tunnel_handshake_duration_seconds_count") == 2
    assert metric(samples, "hybridkex_tunnel_configured_peers") == 2  # "max": one configuration, not a sum
    assert metric(samples, "hybridkex_tunnel_info", role="server") == 1
