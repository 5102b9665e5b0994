"""Relay mechanics end to end: real client -> tunnel client -> tunnel server -> real TCP service.

Both tunnel ends are real ``python -m hybridkex tunnel`` processes running the INSECURE plain test
channel (selected by the test-only hook), so what is tested here is the transport-independent
runtime: byte-exact relaying, half-close in both directions, many sequential and concurrent
connections, metrics, health, and that misbehaving peers only hurt themselves.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest
from tunnelhelpers import (
    AFTER_EOF,
    BANNER,
    Conn,
    EchoService,
    TunnelProcess,
    Tunnels,
    echo_exchange,
    expected_echo,
    http_get,
    metric,
    scrape,
    trailer,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def echo_mod() -> Iterator[EchoService]:
    service = EchoService()
    yield service
    service.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory,
         echo_mod: EchoService) -> Iterator[tuple[TunnelProcess, TunnelProcess]]:
    t = Tunnels(tmp_path_factory.mktemp("relay"))
    try:
        yield t.pair(echo_mod.port, server_extra=(
            "[timeouts]\nhandshake = 1.5\n\n[limits]\nhandshake_rate = 0\n\n"
            '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n\n[health]\nenabled = true\n'))
    finally:
        t.stop_all()


def test_bytes_pass_unchanged_both_ways(pair: tuple[TunnelProcess, TunnelProcess]) -> None:
    _, client = pair
    for payload in (b"", b"x", os.urandom(3 * 1024 * 1024 + 17), bytes(range(256)) * 1000):
        assert echo_exchange(client.port, payload) == expected_echo(payload)


def test_client_half_close_reaches_service_while_replies_keep_flowing(pair: tuple[TunnelProcess, TunnelProcess],
                                                                      echo_mod: EchoService) -> None:
    _, client = pair
    payload = os.urandom(200_000)
    with Conn(client.port) as c:
        c.send(b"E" + payload)
        c.wait_received(len(payload))  # the echo flows while our write side is still open
        assert not c.eof.is_set()
        eofs = echo_mod.eof_seen
        c.shutdown_write()
        # The service saw our EOF (it reports it in the trailer) and keeps sending afterwards.
        data = c.wait_eof()
    assert echo_mod.eof_seen == eofs + 1
    assert data == payload + trailer(payload) + AFTER_EOF


def test_service_half_close_reaches_client_while_requests_keep_flowing(pair: tuple[TunnelProcess, TunnelProcess],
                                                                       echo_mod: EchoService) -> None:
    _, client = pair
    late = os.urandom(500_000)
    before = len(echo_mod.received)
    with Conn(client.port) as c:
        c.send(b"R")
        assert c.wait_eof() == BANNER  # the service finished sending; our direction is still open
        c.send(late)
        c.shutdown_write()
        wait_until(lambda: len(echo_mod.received) > before, "the service to record the late bytes")
    assert echo_mod.received[before] == late


def test_500_sequential_connections(pair: tuple[TunnelProcess, TunnelProcess]) -> None:
    _, client = pair
    failures = []
    for i in range(500):
        payload = i.to_bytes(4, "big") * (1 + i % 50)
        if echo_exchange(client.port, payload) != expected_echo(payload):
            failures.append(i)
    assert failures == []


async def _one_async(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"E" + payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()


def test_100_concurrent_connections(pair: tuple[TunnelProcess, TunnelProcess]) -> None:
    _, client = pair
    payloads = [os.urandom(20_000 + 997 * i) for i in range(100)]

    async def main() -> list[bytes | BaseException]:
        return await asyncio.gather(*(_one_async(client.port, p) for p in payloads), return_exceptions=True)

    results = asyncio.run(main())
    bad = [i for i, (p, r) in enumerate(zip(payloads, results, strict=True)) if r != expected_echo(p)]
    assert bad == []


def test_metrics_and_health_endpoint(pair: tuple[TunnelProcess, TunnelProcess]) -> None:
    server, client = pair
    assert server.metrics_port is not None
    before = scrape(server.metrics_port)
    payloads = [os.urandom(1000 * (i + 1)) for i in range(5)]
    for p in payloads:
        assert echo_exchange(client.port, p) == expected_echo(p)
    wait_until(lambda: metric(scrape(server.metrics_port), "hybridkex_tunnel_active_connections") == 0,
               "connections to be closed")
    after = scrape(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("hybridkex_tunnel_handshakes_total", outcome="ok") == 5
    assert delta("hybridkex_tunnel_connections_total") == 5
    assert delta("hybridkex_tunnel_closed_connections_total", outcome="closed") == 5
    # "in" = from the tunnel client to the service (mode byte + payload), "out" = everything back.
    assert delta("hybridkex_tunnel_bytes_total", direction="in") == sum(len(p) + 1 for p in payloads)
    assert delta("hybridkex_tunnel_bytes_total", direction="out") == sum(len(expected_echo(p)) for p in payloads)
    assert metric(after, "hybridkex_tunnel_info", role="server") == 1
    assert metric(after, "hybridkex_tunnel_configured_peers") == 1
    # The latency histogram: cumulative buckets, +Inf bucket == count == successful handshakes.
    buckets = sorted(((float(dict(lbl)["le"]), v) for (name, lbl), v in after.items()
                      if name == "hybridkex_tunnel_handshake_duration_seconds_bucket"))
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf")
    total = metric(after, "hybridkex_tunnel_handshake_duration_seconds_count")
    assert buckets[-1][1] == total == metric(after, "hybridkex_tunnel_handshakes_total", outcome="ok")
    assert metric(after, "hybridkex_tunnel_handshake_duration_seconds_sum") > 0

    assert http_get(server.metrics_port, "/healthz")[::2] == (200, "ok\n")
    assert http_get(server.metrics_port, "/nope")[0] == 404


def test_slowloris_and_garbage_peers_do_not_block_others(pair: tuple[TunnelProcess, TunnelProcess]) -> None:
    server, client = pair
    start = len(server.records())
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=15) for _ in range(5)]
    dribbling = [socket.create_connection(("127.0.0.1", server.port), timeout=15) for _ in range(5)]
    for s in dribbling:
        s.sendall(b"HKX-INS")  # a handshake that never finishes
    garbage = [socket.create_connection(("127.0.0.1", server.port), timeout=15) for _ in range(3)]
    garbage[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    garbage[1].sendall(os.urandom(4096) + b"\n")
    garbage[2].sendall(b"A" * 100_000)  # an over-long first line
    try:
        # While all of them are connected and unfinished, real traffic goes through.
        for i in range(20):
            payload = os.urandom(5000 + i)
            assert echo_exchange(client.port, payload) == expected_echo(payload)
        # Each bad peer is then closed by the server: garbage at once, the silent ones at the handshake deadline.
        for s in silent + dribbling + garbage:
            s.settimeout(15)
            try:
                rest = s.recv(100)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
    finally:
        for s in silent + dribbling + garbage:
            s.close()
    outcomes = [r["outcome"] for r in server.records()[start:] if r.get("event") == "handshake_failed"]
    assert outcomes.count("timeout") == 10
    assert outcomes.count("protocol_error") == 3
    assert all("key" not in r for r in server.records())
