"""The tunnel and its KME, over the REAL secure channel with real `hybridkex kme` processes.

What an operator sees when the KME is misconfigured, slow or gone: structured log lines only,
one clear error for a peer SAE the KME does not know, KME errors counted by kind, a current pool
gauge, and /healthz turning degraded/unhealthy with the reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kmehelpers import SECURE_ENV, KMEProcess, make_psk, secure_toml, start_secure
from tunnelhelpers import (
    PY,
    WAIT,
    EchoService,
    TunnelProcess,
    Tunnels,
    echo_exchange,
    expected_echo,
    http_get,
    metric,
    refused_or_closed_without_data,
    scrape,
    stop_all,
    wait_until,
)

from hybridkex.steady.ticket import MAX_WINDOW

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def procs() -> Iterator[list[TunnelProcess]]:
    started: list[TunnelProcess] = []
    yield started
    stop_all(started)


def test_every_line_is_structured_including_the_key_pool_and_kme_client(
        tmp_path: Path, pki: Path, kme: KMEProcess, procs: list[TunnelProcess]) -> None:
    # A peer SAE the KME does not know: the server's key pool fails to fill and says so, repeatedly.
    psk = make_psk(tmp_path / "a.psk")
    server = start_secure("server", tmp_path / "server.toml", secure_toml(
        listen="127.0.0.1:0", target="127.0.0.1:9", identity="server", peer="client-z", peer_sae="sae-zzz",
        psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki), procs)
    pool = server.wait_for(lambda r: r.get("logger") == "hybridkex.qkd.pool" and r["level"] == "warning",
                           "the key pool's fetch failure")
    assert "fetch for slave sae-zzz failed" in pool["msg"] and pool["event"] == "log", pool
    server.stop()
    records = server.records()  # raises if any line of stderr is not JSON
    assert records and all({"ts", "level", "event", "msg"} <= r.keys() for r in records), records


# --- helpers -------------------------------------------------------------------------------------------

HEALTH = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n\n[health]\nenabled = true\n'


def healthz(proc: TunnelProcess) -> tuple[int, list[str]]:
    assert proc.metrics_port is not None
    status, _, body = http_get(proc.metrics_port, "/healthz")
    return status, body.splitlines()


def kme_errors(proc: TunnelProcess, kind: str) -> float:
    assert proc.metrics_port is not None
    return metric(scrape(proc.metrics_port), "hybridkex_kme_errors_total", kind=kind)


def pair(tmp_path: Path, pki: Path, kme: KMEProcess, echo_port: int, procs: list[TunnelProcess],
         *, extra: str = HEALTH, steady: bool = True) -> tuple[TunnelProcess, TunnelProcess]:
    """A tunnel pair; ``steady=False`` makes every connection a full handshake (the server's pool
    and the client's fetch by ID on every connection, which the health tests count on)."""
    if not steady:
        extra += "\n[policy]\nsteady = false\n"
    psk = make_psk(tmp_path / "a.psk")
    server = start_secure("server", tmp_path / "server.toml", secure_toml(
        listen="127.0.0.1:0", target=f"127.0.0.1:{echo_port}", identity="server", peer="client-a",
        peer_sae="sae-a", psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki, extra=extra), procs)
    client = start_secure("client", tmp_path / "client.toml", secure_toml(
        listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}", identity="client-a", peer="server",
        peer_sae="sae-b", psk=psk, kme_url=kme.url_a, sae="sae-a", pki=pki, extra=extra), procs)
    return server, client


def failed_attempt(port: int) -> bool:
    """One connection through the tunnel client that the tunnel closes without a byte of the service."""
    return refused_or_closed_without_data(port)


# --- a peer SAE the KME does not know --------------------------------------------------------------------


def test_an_unknown_peer_sae_is_said_once_clearly_and_reported_in_health(
        tmp_path: Path, pki: Path, kme: KMEProcess, procs: list[TunnelProcess]) -> None:
    psk = make_psk(tmp_path / "a.psk")
    server = start_secure("server", tmp_path / "server.toml", secure_toml(
        listen="127.0.0.1:0", target="127.0.0.1:9", identity="server", peer="client-z", peer_sae="sae-zzz",
        psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki, extra=HEALTH), procs)
    events = [r["event"] for r in server.records()]
    assert "kme_peer_refused" in events and events.index("kme_peer_refused") < events.index("listening"), events
    # The pool keeps retrying (the KME may be fixed): still exactly one error line.
    wait_until(lambda: len([r for r in server.records() if r.get("logger") == "hybridkex.qkd.pool"
                            and r["level"] == "warning"]) >= 2, "two refill attempts")
    refused = server.events("kme_peer_refused")
    assert len(refused) == 1, refused
    rec = refused[0]
    assert (rec["level"], rec["peer"], rec["sae_id"], rec["field"]) == ("error", "client-z", "sae-zzz",
                                                                       "peers[0].sae_id"), rec
    assert "not known to this KME network" in rec["msg"] and "peers[0].sae_id" in rec["msg"], rec
    status, body = healthz(server)
    assert status == 503 and body[0] == "unhealthy", body
    assert body[1].startswith("kme: the KME refuses peer SAE 'sae-zzz' (peers[0].sae_id, peer 'client-z'): "), body
    assert "not known to this KME network" in body[1]
    assert kme_errors(server, "bad_request") >= 2


# --- the KME goes away ---------------------------------------------------------------------------------


def test_a_killed_kme_is_counted_and_turns_health_degraded_then_unhealthy(
        tmp_path: Path, pki: Path, kme: KMEProcess, echo: EchoService, procs: list[TunnelProcess]) -> None:
    server, client = pair(tmp_path, pki, kme, echo.port, procs, steady=False)
    assert server.metrics_port is not None
    # The pool gauge is read when scraped: it shows the filled pool before any connection was made.
    wait_until(lambda: metric(scrape(server.metrics_port), "hybridkex_qkd_pool_keys", peer="sae-a") >= 16,
               "the pool gauge to show the filling pool")
    for i in range(3):
        assert echo_exchange(client.port, b"%d" % i) == expected_echo(b"%d" % i)
    assert healthz(server) == (200, ["ok"]) and healthz(client) == (200, ["ok"])
    for proc in (server, client):
        assert all(kme_errors(proc, kind) == 0 for kind in ("connection", "timeout"))

    kme.kill()
    # The client fetches every key from its KME: it cannot serve the next connection.
    assert failed_attempt(client.port)
    wait_until(lambda: healthz(client)[0] == 503, "the client's health to turn unhealthy")
    status, body = healthz(client)
    assert body[0] == "unhealthy" and body[1].startswith(f"kme: KME {kme.url_a} unreachable for "), body
    assert body[1].endswith("; every handshake needs it"), body
    assert kme_errors(client, "connection") >= 1
    # The server notices too (its idle probe), while its pool still covers the next handshake.
    wait_until(lambda: healthz(server)[1][0] == "degraded", "the server's health to turn degraded")
    status, body = healthz(server)
    assert status == 200 and "the key pool still covers the next handshake" in body[1], body
    # Each failed attempt took one pooled key on the server; once the pool is empty, it is unhealthy.
    # 64 at a time: each attempt waits out the client's KME retries, so a round costs the same
    # seconds whatever its size, and one round about empties the pool (its high watermark, 64).
    with ThreadPoolExecutor(max_workers=64) as pool:
        attempts = 0
        while healthz(server)[0] == 200:
            assert attempts < 200, "the pool never ran dry"
            assert all(pool.map(failed_attempt, [client.port] * 64))
            attempts += 64
    status, body = healthz(server)
    assert body[0] == "unhealthy" and "no pooled QKD key for 'client-a' (SAE 'sae-a')" in body[1], body
    assert metric(scrape(server.metrics_port), "hybridkex_qkd_pool_keys", peer="sae-a") == 0
    assert kme_errors(server, "connection") >= 1


def test_a_stopped_kme_times_out_is_counted_and_health_recovers(
        tmp_path: Path, pki: Path, kme: KMEProcess, echo: EchoService, procs: list[TunnelProcess]) -> None:
    server, client = pair(tmp_path, pki, kme, echo.port, procs, extra=HEALTH + "\n[timeouts]\nhandshake = 2\n",
                          steady=False)
    assert echo_exchange(client.port, b"before") == expected_echo(b"before")
    kme.pause()
    try:
        assert failed_attempt(client.port)
        wait_until(lambda: kme_errors(client, "timeout") >= 1, "a KME timeout to be counted")
        status, body = healthz(client)
        assert status == 503 and "unreachable" in body[1] and "KMETimeoutError" in body[1], body
    finally:
        kme.resume()
    assert echo_exchange(client.port, b"after") == expected_echo(b"after")
    wait_until(lambda: healthz(client) == (200, ["ok"]), "the client's health to recover")
    assert healthz(server)[0] == 200


# --- the health endpoint under idle connections ----------------------------------------------------------


def test_thirty_idle_connections_do_not_make_healthz_fail(echo: EchoService, tunnels: Tunnels) -> None:
    server, _ = tunnels.pair(echo.port, server_extra=HEALTH)
    assert server.metrics_port is not None
    idle: list[socket.socket] = []
    try:
        for count in (30, 200):  # 200: beyond the endpoint's connection cap, the oldest idle ones give way
            while len(idle) < count:
                idle.append(socket.create_connection(("127.0.0.1", server.metrics_port), timeout=WAIT))
            assert http_get(server.metrics_port, "/healthz")[::2] == (200, "ok\n")
            assert metric(scrape(server.metrics_port), "hybridkex_tunnel_info", role="server") == 1
    finally:
        for s in idle:
            s.close()


def test_a_busy_listen_port_is_one_line_with_no_key_pool_noise(tmp_path: Path, pki: Path, kme: KMEProcess) -> None:
    # Startup fails while the key pool is filling: the pool must stop before the KME client it uses is
    # closed, or a refill in progress fails with "ETSI014Client ... is closed". It is a race: before the
    # fix this test failed in some runs only (2 of 9 here), so it guards the symptom, not every time.
    psk = make_psk(tmp_path / "a.psk")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        (tmp_path / "server.toml").write_text(secure_toml(
            listen=f"127.0.0.1:{port}", target="127.0.0.1:9", identity="server", peer="client-a", peer_sae="sae-a",
            psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki))
        env = {**os.environ, **SECURE_ENV}
        proc = subprocess.run([PY, "-m", "hybridkex", "tunnel", "server", "--config", "server.toml"],
                              capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path, check=False)
    *logged, last = proc.stderr.splitlines()
    assert (proc.returncode, last) == (2, f"hybridkex: error: listen: cannot listen on 127.0.0.1:{port}: address "
                                          "already in use")
    # Before the error line at most info records (e.g. "key pool closed: 64 unused key(s) dropped").
    assert all(json.loads(line)["level"] == "info" for line in logged), logged
    assert "AlreadyFinalized" not in proc.stderr and "is closed" not in proc.stderr, logged


def test_with_the_kme_gone_the_steady_state_uses_the_keys_both_ends_hold_then_fails_closed(
        tmp_path: Path, pki: Path, kme: KMEProcess, echo: EchoService, procs: list[TunnelProcess]) -> None:
    """The client reserved and announced keys before the KME died and the server fetched them:
    those connections go on (one TLS round trip each), then the client fails closed (QKD required),
    without taking the server's pooled keys."""
    server, client = pair(tmp_path, pki, kme, echo.port, procs)
    for i in range(6):
        assert echo_exchange(client.port, b"%d" % i) == expected_echo(b"%d" % i)
    wait_until(lambda: len(server.events("handshake_ok")) == 6, "six handshakes on the server")
    pool_before = metric(scrape(server.metrics_port), "hybridkex_qkd_pool_keys", peer="sae-a")
    kme.kill()
    served = 0
    # The client holds at most twice its window of keys; the window starts at `announce` (4) and
    # doubles on a connection that found no announced key (a loaded machine: seen in CI, 9 served),
    # up to MAX_WINDOW. Beyond that, a connection without a KME would have used a key it never had.
    while not failed_attempt(client.port):
        served += 1
        assert served <= 2 * MAX_WINDOW, "connections went on without a KME beyond the keys held before it died"
    assert served >= 1  # the announced keys carried at least the next connection
    assert failed_attempt(client.port)  # and then policy applies, every time
    ok = server.events("handshake_ok")
    assert all(r["session"]["steady"] is not None for r in ok[-served:]), ok[-served:]
    ids = [i for r in ok for i in r["session"]["qkd_key_ids"]]
    assert len(ids) == len(set(ids))
    assert metric(scrape(server.metrics_port), "hybridkex_qkd_pool_keys", peer="sae-a") == pool_before
