"""Signals on a real tunnel process: SIGTERM drains, SIGHUP reloads the configuration.

Peers are observable with the INSECURE plain test channel because it checks the identity a tunnel
client claims against the server's configured peers (re-read on reload).
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
from tunnelhelpers import Conn, EchoService, Tunnels, echo_exchange, expected_echo, refused_or_closed_without_data

pytestmark = pytest.mark.timeout(90)

CHUNK = 1024 * 1024


def test_sigterm_drains_open_connections_and_refuses_new_ones(echo: EchoService, tunnels: Tunnels) -> None:
    server, client = tunnels.pair(echo.port, server_extra="[timeouts]\ndrain = 30\n")
    chunks = [os.urandom(CHUNK) for _ in range(8)]
    with Conn(client.port) as c:
        c.send(b"E" + chunks[0])
        c.wait_received(CHUNK)  # the transfer is under way through both tunnel ends
        server.send_signal(signal.SIGTERM)
        server.wait_event("draining", open_connections=1)
        # New connections: refused by the closed listener, or (through the tunnel client) closed unserved.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        assert refused_or_closed_without_data(client.port)
        assert server.proc.poll() is None  # still draining: our transfer is not finished
        for chunk in chunks[1:]:
            c.send(chunk)
        c.shutdown_write()
        data = c.wait_eof()
    payload = b"".join(chunks)
    assert data == expected_echo(payload)
    assert server.wait_exit() == 0
    closed = [r for r in server.events("connection_closed") if r["outcome"] == "closed"]
    assert [r["bytes_in"] for r in closed] == [len(payload) + 1]
    assert server.events("stopped")[0]["forced"] == 0


def test_drain_deadline_closes_remaining_connections(echo: EchoService, tunnels: Tunnels) -> None:
    server, client = tunnels.pair(echo.port, server_extra="[timeouts]\ndrain = 0.3\n")
    with Conn(client.port) as c:
        c.send(b"Ehello")
        c.wait_received(5)
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert c.wait_eof() == b"hello"  # cut at the deadline: no trailer, the service never saw our EOF
    assert server.events("drain_deadline")[0]["open_connections"] == 1
    assert server.events("connection_closed")[0]["outcome"] == "shutdown"
    assert server.events("stopped")[0]["forced"] == 1


def test_second_sigterm_ends_the_drain_at_once(echo: EchoService, tunnels: Tunnels) -> None:
    server, client = tunnels.pair(echo.port, server_extra="[timeouts]\ndrain = 60\n")
    with Conn(client.port) as c:
        c.send(b"Ewaiting")
        c.wait_received(7)
        server.send_signal(signal.SIGTERM)
        server.wait_event("draining", open_connections=1)
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0  # well before the 60 s drain deadline would have passed
        assert c.wait_eof() == b"waiting"
    assert server.events("drain_forced")
    assert server.events("stopped")[0]["forced"] == 1


def test_sighup_reload_adds_and_removes_peers_without_dropping_connections(echo: EchoService,
                                                                        tunnels: Tunnels) -> None:
    server, client_a = tunnels.pair(echo.port, server_peers=("client-a",))
    client_b = tunnels.client(server, "client-b")
    config = server.config
    original = config.read_text()

    def reload(peers: tuple[str, ...], expect: str = "config_reloaded") -> dict[str, object]:
        tunnels.rewrite(server, peers=peers)
        mark = len(server.records())
        server.send_signal(signal.SIGHUP)
        return server.wait_event(expect, start=mark)

    long_lived = Conn(client_a.port)
    sent = bytearray(b"first part ")
    long_lived.send(b"E" + bytes(sent))
    long_lived.wait_received(len(sent))

    # client-b is not a peer yet.
    mark = len(server.records())
    assert refused_or_closed_without_data(client_b.port)
    # The server logs the refusal after closing the connection: wait for the line, do not race it.
    failed = server.wait_event("handshake_failed", start=mark)
    assert failed["outcome"] == "auth_failed" and "client-b" in failed["reason"]

    rec = reload(("client-a", "client-b"))
    assert rec["added"] == ["client-b"] and rec["removed"] == []
    payload = os.urandom(10_000)
    assert echo_exchange(client_b.port, payload) == expected_echo(payload)
    part = b"second part after reload "
    long_lived.send(part)
    sent += part
    long_lived.wait_received(len(sent))

    rec = reload(("client-b",))
    assert rec["removed"] == ["client-a"]
    assert refused_or_closed_without_data(client_a.port)  # new connections of a removed peer are refused
    part = b"third part, peer removed meanwhile"
    long_lived.send(part)  # ... but its open connection keeps working
    sent += part
    long_lived.shutdown_write()
    assert long_lived.wait_eof() == expected_echo(bytes(sent))
    long_lived.close()

    # An invalid configuration is refused with one error line; the running one stays in force.
    config.write_text(original.replace('mode = "psk"', 'mode = "pks"', 1))
    mark = len(server.records())
    server.send_signal(signal.SIGHUP)
    err = server.wait_event("config_reload_failed", start=mark)
    assert err["level"] == "error"
    assert 'peers[0].mode: expected one of "psk", "pki", "recycled", got "pks"' in err["msg"]
    assert "\n" not in err["msg"]
    assert echo_exchange(client_b.port, b"still") == expected_echo(b"still")
    assert refused_or_closed_without_data(client_a.port)
    assert server.proc.poll() is None

