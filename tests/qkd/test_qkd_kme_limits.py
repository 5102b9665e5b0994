"""The simulated KME's connection limits, over real sockets: idle/read timeouts and a connection cap.

Before these limits a TCP connection that never sent a ClientHello stayed open for asyncio's 60 s
TLS handshake timeout, one that completed TLS and said nothing for aiohttp's keep-alive timeout (an
hour), and any number of them could be open.  Each test waits at most ``GUARD`` seconds for the
KME to close a connection: far above the configured limits, far below the old behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qkdhelpers import KMEProcess, client_context, https_request

from hybridkex.exceptions import ConfigurationError
from hybridkex.qkd import KMEConnectionError
from hybridkex.qkd.kme import KMEPairSettings, SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI

GUARD = 15.0  # seconds; a hung connection fails the test instead of hanging it


def address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def closed_by_peer(sock: socket.socket) -> bool:
    """Block until the peer closes ``sock`` (True), or GUARD passes (False)."""
    sock.settimeout(GUARD)
    try:
        while sock.recv(65536):
            pass  # e.g. an error answer before the close
    except TimeoutError:
        return False
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        pass  # closed hard (abort) or without close_notify
    return True


@contextlib.contextmanager
def tcp(url: str) -> Iterator[socket.socket]:
    with socket.create_connection(address(url), timeout=GUARD) as sock:
        yield sock


@contextlib.contextmanager
def tls(url: str, pki: DemoPKI, name: str = "sae-a") -> Iterator[ssl.SSLSocket]:
    host, port = address(url)
    with client_context(pki, name).wrap_socket(socket.create_connection((host, port), timeout=GUARD),
                                               server_hostname=host) as sock:
        yield sock


def wait_until(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def quick(make_pair: Callable[..., SimulatedKMEPair]) -> SimulatedKMEPair:
    return make_pair(idle_timeout=0.5)


def test_a_silent_tcp_connection_is_closed(quick: SimulatedKMEPair) -> None:
    with tcp(quick.url_a) as sock:  # never sends a ClientHello
        assert closed_by_peer(sock)


def test_a_tls_connection_that_sends_no_request_is_closed(quick: SimulatedKMEPair, pki: DemoPKI) -> None:
    with tls(quick.url_a, pki) as sock:
        assert closed_by_peer(sock)


def test_incomplete_request_headers_are_not_waited_for(quick: SimulatedKMEPair, pki: DemoPKI) -> None:
    with tls(quick.url_a, pki) as sock:
        sock.sendall(b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        assert closed_by_peer(sock)


def test_a_body_that_does_not_arrive_is_refused(quick: SimulatedKMEPair, pki: DemoPKI) -> None:
    with tls(quick.url_a, pki) as sock:
        sock.sendall(b"POST /api/v1/keys/sae-b/enc_keys HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"number\": 1")
        sock.settimeout(GUARD)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"request body not received within 0.5 s" in answer
    assert quick.store.stats().keys_issued == 0


def test_a_keep_alive_connection_idle_between_requests_is_closed(quick: SimulatedKMEPair, pki: DemoPKI) -> None:
    with tls(quick.url_a, pki) as sock:
        sock.sendall(b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(GUARD)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert closed_by_peer(sock)


def test_a_malformed_request_is_a_400_without_a_traceback_in_the_log(
        quick: SimulatedKMEPair, pki: DemoPKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with tls(quick.url_a, pki) as sock:
        sock.sendall(b"GET /api/v1/keys/sae-b/status HTTP/1.1\r\nBad Header Line\r\n\r\n")
        assert sock.recv(200).startswith(b"HTTP/1.0 400")
    assert wait_until(lambda: any("malformed HTTP request answered 400" in r.getMessage() for r in caplog.records))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_requests_keep_working_with_the_limits(quick: SimulatedKMEPair) -> None:
    with quick.key_source("sae-a") as master, quick.key_source("sae-b") as slave:
        for _ in range(3):
            (key,) = master.get_keys("sae-b")
            assert slave.get_keys_by_id("sae-a", [key.key_id]) == [key]


def test_the_connection_cap_holds_for_silent_and_tls_connections(
    make_pair: Callable[..., SimulatedKMEPair], pki: DemoPKI, caplog: pytest.LogCaptureFixture
) -> None:
    pair = make_pair(idle_timeout=60.0, max_connections=3)
    url = pair.url_a
    with contextlib.ExitStack() as held:
        held.enter_context(tcp(url))  # mid-handshake (no ClientHello yet) counts
        held.enter_context(tls(url, pki))
        held.enter_context(tls(url, pki))
        with caplog.at_level(logging.WARNING, logger="hybridkex.qkd.kme"), tcp(url) as extra:
            assert closed_by_peer(extra)  # the fourth is closed at once
        assert "refused 1 connection(s): 3 open" in caplog.text
        with pair.key_source("sae-a", retries=0) as master, pytest.raises(KMEConnectionError):
            master.get_keys("sae-b")
        assert https_request(pair.url_b, "GET", "/api/v1/keys/sae-a/status", pki=pki, name="sae-b").status == 200
    # The held connections are gone: their slots are free again.
    with pair.key_source("sae-a", retries=0) as master:
        assert wait_until(lambda: _try_get(master))


def _try_get(master: object) -> bool:
    try:
        master.get_keys("sae-b")  # type: ignore[attr-defined]
    except KMEConnectionError:
        return False
    return True


def test_the_limits_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="idle_timeout"):
        KMEPairSettings(idle_timeout=0)
    with pytest.raises(ConfigurationError, match="max_connections"):
        KMEPairSettings(max_connections=0)


def test_hybridkex_kme_applies_both_limits(pki: DemoPKI, tmp_path: Path) -> None:
    kme = KMEProcess(pki, "--idle-timeout", "2", "--max-connections", "2", log_path=tmp_path / "log")
    try:
        with tcp(kme.url_a) as silent:
            assert closed_by_peer(silent)
        with tls(kme.url_a, pki), tls(kme.url_a, pki), tcp(kme.url_a) as third:
            assert closed_by_peer(third)
    finally:
        assert kme.stop(signal.SIGTERM) == 0
    assert "refused 1 connection(s): 2 open" in (tmp_path / "log").read_text()


def test_the_limits_are_documented_in_help_and_docs() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "hybridkex", "kme", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    docs = (Path(__file__).resolve().parents[2] / "docs" / "qkd.md").read_text(encoding="utf-8")
    for option in ("--idle-timeout", "--max-connections"):
        assert option in out and f"| `{option} " in docs


def test_a_body_that_arrived_while_the_kme_stalled_past_the_deadline_is_served(
        quick: SimulatedKMEPair, pki: DemoPKI) -> None:
    """After the KME's event loop stalled past the body deadline, the timer and the arrived body are
    seen in the same turn: the request is served, not refused (seen in CI under load)."""
    body = b'{"number": 1}'
    with tls(quick.url_a, pki) as sock:
        sock.sendall(b"POST /api/v1/keys/sae-b/enc_keys HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:3])
        time.sleep(0.2)  # the handler waits for the body now, its 0.5 s deadline running
        quick._loop.call_soon_threadsafe(time.sleep, 1.0)  # the KME's loop stalls past the deadline
        time.sleep(0.1)
        sock.sendall(body[3:])  # arrives during the stall
        sock.settimeout(GUARD)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert quick.store.stats().keys_issued == 1
