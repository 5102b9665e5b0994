"""Limits on a real tunnel server: maximum connections, handshake rate per peer and per address, idle timeout."""

from __future__ import annotations

import pytest
from tunnelhelpers import (
    Conn,
    EchoService,
    Tunnels,
    echo_exchange,
    expected_echo,
    metric,
    refused_or_closed_without_data,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

METRICS = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'


def test_max_connections_refuses_excess_and_counts_it(echo: EchoService, tunnels: Tunnels) -> None:
    server, client = tunnels.pair(echo.port, server_extra="[limits]\nmax_connections = 2\n" + METRICS)
    assert server.metrics_port is not None
    held = [Conn(client.port), Conn(client.port)]
    try:
        for i, c in enumerate(held):
            c.send(b"E%d" % i)
            c.wait_received(1)  # both are relaying, so both count against the limit
        assert refused_or_closed_without_data(client.port)
        assert refused_or_closed_without_data(client.port)
        samples = scrape(server.metrics_port)
        assert metric(samples, "hybridkex_tunnel_rejected_connections_total", reason="max_connections") == 2
        assert metric(samples, "hybridkex_tunnel_active_connections") == 2
        refused = server.events("connection_refused")
        assert refused and refused[0]["reason"] == "max_connections"
        # Held connections are unaffected, and a slot freed is a slot available again.
        held[0].shutdown_write()
        assert held[0].wait_eof() == expected_echo(b"0")
        wait_until(lambda: metric(scrape(server.metrics_port), "hybridkex_tunnel_active_connections") == 1,
                   "the closed connection to be released")
        assert echo_exchange(client.port, b"fits again") == expected_echo(b"fits again")
        held[1].shutdown_write()
        assert held[1].wait_eof() == expected_echo(b"1")
    finally:
        for c in held:
            c.close()


def test_handshake_rate_limit_is_per_peer_identity_not_per_address(echo: EchoService, tunnels: Tunnels) -> None:
    # One token per 1000 s, burst 3, per peer: both clients connect from 127.0.0.1, yet each has its own.
    server, client_a = tunnels.pair(
        echo.port, server_peers=("client-a", "client-b"),
        server_extra="[limits]\nhandshake_rate = 0.001\nhandshake_burst = 3\n" + METRICS)
    client_b = tunnels.client(server, "client-b")
    assert server.metrics_port is not None
    for i in range(3):
        assert echo_exchange(client_a.port, b"a%d" % i) == expected_echo(b"a%d" % i)
    assert refused_or_closed_without_data(client_a.port)
    assert refused_or_closed_without_data(client_a.port)
    for i in range(3):  # client-a's refusals cost client-b nothing
        assert echo_exchange(client_b.port, b"b%d" % i) == expected_echo(b"b%d" % i)
    assert refused_or_closed_without_data(client_b.port)
    samples = scrape(server.metrics_port)
    assert metric(samples, "hybridkex_tunnel_rejected_connections_total", reason="peer_rate_limited") == 3
    assert metric(samples, "hybridkex_tunnel_rejected_connections_total", reason="rate_limited") == 0
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok") == 6
    refused = server.events("connection_refused")
    assert refused[0]["reason"] == "peer_rate_limited" and refused[0]["peer_identity"] == "client-a", refused
    # The tunnel client says why its connection was closed: the server's typed refusal.
    failed = client_a.wait_event("handshake_failed")
    assert failed["outcome"] == "rate_limited", failed
    assert failed["reason"].startswith("rate limited by server ("), failed


def test_address_limit_counts_only_handshakes_that_do_not_authenticate(echo: EchoService,
                                                                       tunnels: Tunnels) -> None:
    server, client = tunnels.pair(
        echo.port, server_extra="[limits]\naddress_rate = 0.001\naddress_burst = 3\n" + METRICS)
    assert server.metrics_port is not None
    for i in range(10):  # authenticated handshakes give their token back: a site is never cut off
        assert echo_exchange(client.port, b"%d" % i) == expected_echo(b"%d" % i)
    mallory = tunnels.client(server, "mallory")  # an identity the server does not know
    for _ in range(3):
        assert refused_or_closed_without_data(mallory.port)
    # Three failed handshakes used up 127.0.0.1's pre-authentication budget: now even client-a is refused,
    # before any handshake work, and told so.
    assert refused_or_closed_without_data(client.port)
    samples = scrape(server.metrics_port)
    assert metric(samples, "hybridkex_tunnel_rejected_connections_total", reason="rate_limited") == 1
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok") == 10
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="auth_failed") == 3
    failed = client.wait_event("handshake_failed")
    assert failed["outcome"] == "rate_limited" and failed["reason"].startswith("rate limited by server ("), failed


def test_idle_connections_are_closed(echo: EchoService, tunnels: Tunnels) -> None:
    server, client = tunnels.pair(echo.port, server_extra="[timeouts]\nidle = 0.3\n")
    with Conn(client.port) as c:
        c.send(b"Eping")
        c.wait_received(4)
        # Then nothing in either direction: the server closes it, which the tunnel client relays as EOF.
        assert c.wait_eof() == b"ping"
    rec = server.wait_event("connection_closed")
    assert rec["outcome"] == "idle_timeout"
    assert (rec["bytes_in"], rec["bytes_out"]) == (5, 4)
    # The idle timeout ends idle connections only: the tunnel keeps serving.
    assert echo_exchange(client.port, b"after") == expected_echo(b"after")
