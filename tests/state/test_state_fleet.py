"""A fleet: two real server processes (a HybridServer and an asyncio server) sharing one state (an
SQLite file; PostgreSQL) and a real simulated KME pair.  A client's full handshake on A, its steady
connections on B: accepted there (the parent came from the state), replays refused by both."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from iohelpers import WAIT, RecordingProxy, echo_once
from statefleet import CLIENT_SAE, Fleet, Spec, configs, key_source
from statehelpers import PG, state_url

from hybridkex.api import HybridClient, SteadyPolicy
from hybridkex.qkd.kme import SimulatedKMEPair


@pytest.fixture(scope="module")
def kme() -> Iterator[SimulatedKMEPair]:
    with SimulatedKMEPair.start(rate_bps=10**9) as pair:
        yield pair


def _refused(address: tuple[str, int], client_hello: bytes) -> bool:
    """Whether a replayed ClientHello is refused: an alert or the end of the stream, never a ServerHello."""
    with socket.create_connection(address, timeout=WAIT) as raw:
        raw.sendall(client_hello)
        raw.settimeout(WAIT)
        try:
            first = raw.recv(1)
        except OSError:
            return True
        return first != b"\x16"  # 0x16: a handshake record (the ServerHello of an accepted PSK)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_steady_connection_on_another_process_than_the_full_handshake(
        backend: str, kme: SimulatedKMEPair, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    pg: PG | None = request.getfixturevalue("pg") if backend == "postgresql" else None
    url, psk = state_url(backend, tmp_path, pg), os.urandom(32)
    pki_dir, kme_b = str(kme.pki.directory), kme.url_for("sae-b")
    fleet = Fleet(["blocking", "asyncio"], Spec(url, pki_dir, kme_b, psk, announce=0))
    try:
        a, b = (("127.0.0.1", p) for p in fleet.ports)
        client_cfg, _ = configs(pki_dir, psk, SteadyPolicy(announce=0))
        # One address for the fleet (a balancer: the proxy, whose target the test switches), as a client sees it.
        with key_source(pki_dir, kme.url_for(CLIENT_SAE), CLIENT_SAE) as keys, RecordingProxy(a) as balancer:
            client = HybridClient(client_cfg, key_source=keys)
            with client.connect(balancer.address) as sock:  # the full handshake, on A
                assert echo_once(sock, b"full") == b"full" and sock.session.steady is None
            balancer.target = b
            for i in range(3):  # steady-state connections (TLS only: one round trip), on B
                with client.connect(balancer.address) as sock:
                    assert echo_once(sock, b"s%d" % i) == b"s%d" % i
                    assert sock.session.steady is not None
            replay = balancer.client_flights[-1]
            balancer.target = a
            with client.connect(balancer.address) as sock:  # and back on A: the counters are one shared window
                assert sock.session.steady is not None and echo_once(sock) == b"ping"
            assert (client.full_handshakes, client.steady_connections) == (1, 4)
            assert replay[0] == 0x16
            assert _refused(b, replay) and _refused(a, replay)  # to the server that accepted it, and the other
            balancer.target = b
            with client.connect(balancer.address) as sock:  # the genuine client goes on in the steady state
                assert sock.session.steady is not None and echo_once(sock) == b"ping"
    finally:
        stats = fleet.stats()
    sa, sb = stats
    assert sb["loaded"] == 1 and sa["loaded"] == 0  # B read the parent from the state, once
    assert (sa["accepted"], sb["accepted"]) == (1, 4)  # the replays accepted by neither
    assert sa["replayed"] + sb["replayed"] + sa["refused"] + sb["refused"] >= 2


def test_announced_keys_prefetched_by_one_process_are_taken_by_another(kme: SimulatedKMEPair, pg: PG) -> None:
    """With pre-fetching on, each steady connection announces the next one's key; whichever server
    accepts it fetches that key from the KME (which delivers it once) and shares it sealed: the next
    connection, on the other server, takes it from PostgreSQL.  Every connection stays steady."""
    url, psk = pg.new_url(), os.urandom(32)
    pki_dir = str(kme.pki.directory)
    fleet = Fleet(["asyncio", "blocking"], Spec(url, pki_dir, kme.url_for("sae-b"), psk, announce=1))
    used: list[str] = []
    try:
        a, b = (("127.0.0.1", p) for p in fleet.ports)
        client_cfg, _ = configs(pki_dir, psk, SteadyPolicy(announce=1))
        with key_source(pki_dir, kme.url_for(CLIENT_SAE), CLIENT_SAE) as keys, RecordingProxy(a) as balancer:
            client = HybridClient(client_cfg, key_source=keys)
            for i in range(9):
                balancer.target = (a, b)[i % 2]
                with client.connect(balancer.address) as sock:
                    assert echo_once(sock, b"n%d" % i) == b"n%d" % i
                    if i:
                        assert sock.session.steady is not None, i
                        used += sock.session.steady.qkd_key_ids
                time.sleep(0.2)  # the accepting server's background fetch of the announced key
            assert (client.full_handshakes, client.steady_connections) == (1, 8)
    finally:
        stats = fleet.stats()
    assert len(set(used)) == len(used) == 8  # every connection its own key, none used twice
    assert sum(s["shared_keys"] for s in stats) >= 6  # taken from the state, not fetched again


def test_reconnect_on_another_process_than_the_full_handshake(kme: SimulatedKMEPair, pg: PG) -> None:
    """Reconnect tickets (the steady state off): the parent's per-reconnect tags and PSKs are shared
    sealed, every counter is spent in PostgreSQL: a reconnect on B is accepted, its replay refused."""
    url, psk = pg.new_url(), os.urandom(32)
    pki_dir = str(kme.pki.directory)
    fleet = Fleet(["blocking", "asyncio"], Spec(url, pki_dir, kme.url_for("sae-b"), psk, reconnect=True))
    try:
        a, b = (("127.0.0.1", p) for p in fleet.ports)
        client_cfg, _ = configs(pki_dir, psk, SteadyPolicy(), reconnect=True)
        with key_source(pki_dir, kme.url_for(CLIENT_SAE), CLIENT_SAE) as keys, RecordingProxy(a) as balancer:
            client = HybridClient(client_cfg, key_source=keys)
            with client.connect(balancer.address) as sock:  # the full handshake, on A
                assert echo_once(sock, b"full") == b"full" and not sock.session.reconnect
            for i, target in enumerate((b, b, a)):
                balancer.target = target
                with client.connect(balancer.address) as sock:
                    assert sock.session.reconnect, i
                    assert echo_once(sock, b"r%d" % i) == b"r%d" % i
            replay = balancer.client_flights[2]  # B's second reconnect
            assert replay[0] == 0x16
            assert _refused(b, replay) and _refused(a, replay)
            assert (client.full_handshakes, client.reconnects) == (1, 3)
    finally:
        stats = fleet.stats()
    assert (stats[0]["accepted"], stats[1]["accepted"]) == (1, 2)  # the replays accepted by neither
