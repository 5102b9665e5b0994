"""Limits on a real tunnel server: maximum connections, handshake rate per peer, idle timeout."""

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


def test_handshake_rate_limit_per_peer(echo: EchoService, tunnels: Tunnels) -> None:
    # One token per 1000 s: after the burst of 3 every further connection from 127.0.0.1 is refused.
    server, client = tunnels.pair(
        echo.port, server_extra="[limits]\nhandshake_rate = 0.001\nhandshake_burst = 3\n" + METRICS)
    assert server.metrics_port is not None
    for i in range(3):
        assert echo_exchange(client.port, b"%d" % i) == expected_echo(b"%d" % i)
    assert refused_or_closed_without_data(client.port)
    assert refused_or_closed_without_data(client.port)
    samples = scrape(server.metrics_port)
    assert metric(samples, "hybridkex_tunnel_rejected_connections_total", reason="rate_limited") == 2
    assert metric(samples, "hybridkex_tunnel_handshakes_total", outcome="ok") == 3


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
