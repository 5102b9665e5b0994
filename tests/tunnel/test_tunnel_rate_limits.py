"""Rate limits over the REAL secure channel (real `hybridkex kme` and tunnel processes).

A whole site behind one tunnel client must not be throttled as if it were one abusive address:
2000 connection-per-request exchanges through a tunnel pair with default limits must all succeed.
What the limits do refuse is told to the client as Abort 9 (rate limited), which it logs as such.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kmehelpers import KMEProcess, make_psk, secure_toml, start_secure
from tunnelhelpers import WAIT, ThreadedService, TunnelProcess, refused_or_closed_without_data, stop_all, wait_until

pytestmark = pytest.mark.timeout(400)


class PingService(ThreadedService):
    """A tiny request/response TCP service (like redis): one line in, one line out, per connection."""

    def __init__(self) -> None:
        self.served = 0
        self._lock = threading.Lock()
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(WAIT)
            with contextlib.suppress(OSError):
                line = b""
                while not line.endswith(b"\n") and (chunk := conn.recv(256)):
                    line += chunk
                conn.sendall(b"+PONG " + line)
                with self._lock:
                    self.served += 1
                while conn.recv(256):  # until the client closes, as redis does
                    pass


def ping(port: int, i: int) -> bool:
    """One connection, one request, one reply, close: what `redis-benchmark -k 0` does per request."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            request = b"PING %d\n" % i
            s.sendall(request)
            reply = b""
            while not reply.endswith(b"\n") and (chunk := s.recv(256)):
                reply += chunk
            return reply == b"+PONG " + request
    except OSError:
        return False


@pytest.fixture
def service() -> Iterator[PingService]:
    s = PingService()
    yield s
    s.close()


@pytest.fixture
def procs() -> Iterator[list[TunnelProcess]]:
    started: list[TunnelProcess] = []
    yield started
    stop_all(started)


def start_pair(tmp_path: Path, pki: Path, kme: KMEProcess, target_port: int, procs: list[TunnelProcess], *,
               server_extra: str = "", psk: Path | None = None) -> tuple[TunnelProcess, TunnelProcess]:
    psk = psk or make_psk(tmp_path / "a.psk")
    server = start_secure("server", tmp_path / "server.toml", secure_toml(
        listen="127.0.0.1:0", target=f"127.0.0.1:{target_port}", identity="server", peer="client-a",
        peer_sae="sae-a", psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki, extra=server_extra), procs)
    return server, start_client(tmp_path, pki, kme, server, procs, psk=psk)


def start_client(tmp_path: Path, pki: Path, kme: KMEProcess, server: TunnelProcess, procs: list[TunnelProcess], *,
                 psk: Path, name: str = "client") -> TunnelProcess:
    return start_secure("client", tmp_path / f"{name}.toml", secure_toml(
        listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}", identity="client-a", peer="server",
        peer_sae="sae-b", psk=psk, kme_url=kme.url_a, sae="sae-a", pki=pki), procs)


def test_2000_connection_per_request_exchanges_through_a_default_pair(
        tmp_path: Path, pki: Path, kme: KMEProcess, service: PingService, procs: list[TunnelProcess]) -> None:
    # Default limits: no [limits] table. 10 at a time, as `redis-benchmark -k 0 -n 2000 -c 10`.
    server, client = start_pair(tmp_path, pki, kme, service.port, procs)
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda i: ping(client.port, i), range(2000)))
    why = [(r.get("outcome"), r.get("reason")) for p in (client, server) for r in p.events("handshake_failed")]
    assert results.count(False) == 0, why[:6]
    assert service.served == 2000
    wait_until(lambda: len(server.events("handshake_ok")) == 2000, "2000 handshakes logged", timeout=60)
    assert not server.events("connection_refused") and not server.events("handshake_failed")
    assert not client.events("handshake_failed")


def test_over_its_rate_a_peer_is_refused_with_abort_9_and_an_impostor_cannot_spend_its_budget(
        tmp_path: Path, pki: Path, kme: KMEProcess, service: PingService, procs: list[TunnelProcess]) -> None:
    psk = make_psk(tmp_path / "a.psk")
    server, client = start_pair(tmp_path, pki, kme, service.port, procs, psk=psk,
                                server_extra="[limits]\nhandshake_rate = 0.001\nhandshake_burst = 2\n")
    # Someone who claims client-a without its key fails authentication, and is not charged to client-a.
    impostor = start_client(tmp_path, pki, kme, server, procs, psk=make_psk(tmp_path / "wrong.psk"),
                            name="impostor")
    for _ in range(3):
        assert refused_or_closed_without_data(impostor.port)
    wait_until(lambda: len(server.events("handshake_failed")) == 3, "three failed impostor handshakes")
    assert ping(client.port, 1) and ping(client.port, 2)  # client-a's burst of 2 is intact
    assert not ping(client.port, 3)
    failed = client.wait_event("handshake_failed")
    assert failed["outcome"] == "rate_limited", failed
    assert failed["reason"].startswith("rate limited by server (the peer aborted the handshake: rate limited"), \
        failed
    refused = server.wait_event("connection_refused")
    assert (refused["reason"], refused["peer_identity"]) == ("peer_rate_limited", "client-a"), refused
    assert service.served == 2


def test_over_the_address_limit_the_server_refuses_before_the_hello_with_abort_9(
        tmp_path: Path, pki: Path, kme: KMEProcess, service: PingService, procs: list[TunnelProcess]) -> None:
    server, client = start_pair(tmp_path, pki, kme, service.port, procs,
                                server_extra="[limits]\naddress_rate = 0.001\naddress_burst = 2\n")
    for _ in range(2):  # not hybridkex at all: two failed handshakes from 127.0.0.1
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            with contextlib.suppress(OSError):
                while s.recv(4096):
                    pass
    wait_until(lambda: len(server.events("handshake_failed")) == 2, "two failed handshakes")
    assert not ping(client.port, 1)
    failed = client.wait_event("handshake_failed")
    assert failed["outcome"] == "rate_limited" and failed["reason"].startswith("rate limited by server ("), failed
    refused = server.wait_event("connection_refused")
    assert refused["reason"] == "rate_limited", refused
    assert service.served == 0
