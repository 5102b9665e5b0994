"""The steady registry spends counters and QKD key IDs in the shared state too (both backends)."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import urllib.parse
from typing import Any

import pytest
from iohelpers import CLIENT_SAE, SERVER_SAE, WAIT, echo_once, make_setup, recording_handler, running_server
from statehelpers import PG, SEAL_KEY
from steadyparts import parent_info

from hybridkex import Policy, get_suite
from hybridkex.api import HybridClient
from hybridkex.combiner import CombinedSecret
from hybridkex.exceptions import ConfigurationError
from hybridkex.io import QKDKeyManager
from hybridkex.io.config import ServerConfig, SteadyPolicy
from hybridkex.qkd import MemoryKeyLink
from hybridkex.state import SharedState, open_state
from hybridkex.steady import SteadyRegistry, SteadyTicket

SUITE = get_suite("x25519-mlkem768-qkd-hkdfsha256")
CIPHER = SUITE.tls_cipher




class Replicas:
    """One client ticket; two server registries (two server processes) that know the same parent
    (as shared tickets will make it) and share one state."""

    def __init__(self, state_a: SharedState | None, state_b: SharedState | None) -> None:
        link = MemoryKeyLink(("kme-client", "kme-server"))
        policy, qkd = SteadyPolicy(announce=0), Policy()
        self.client_keys = QKDKeyManager(link.source("sae-client", 0), qkd.key_budget)
        server_keys = QKDKeyManager(link.source("sae-server", 1), qkd.key_budget)
        raw = os.urandom(32)
        self.ticket = SteadyTicket(CombinedSecret(SUITE, raw), parent_info("initiator", SUITE.name),
                                   policy, qkd, self.client_keys)
        self.servers = [SteadyRegistry(policy, qkd, server_keys, state=s) for s in (state_a, state_b)]
        for r in self.servers:
            r.register(CombinedSecret(SUITE, raw), parent_info("responder", SUITE.name))

    def identity(self) -> bytes:
        a = self.ticket.take()
        assert a is not None
        if a.request is not None:
            a.provide(self.client_keys.answer(a.request))
        return a.credentials()[0]


def test_what_one_server_accepted_every_other_refuses(state: SharedState, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hybridkex.steady")
    r = Replicas(state, state)
    one, two = r.identity(), r.identity()
    assert r.servers[0].claim(one, CIPHER) is not None
    assert r.servers[1].claim(one, CIPHER) is None  # the same ClientHello replayed to another server
    assert r.servers[1].stats.replayed == 1 and r.servers[1].stats.accepted == 0
    assert r.servers[1].claim(two, CIPHER) is not None
    assert r.servers[0].claim(two, CIPHER) is None
    assert any("shared state" in rec.getMessage() for rec in caplog.records)


def test_without_a_shared_state_the_replay_is_accepted_elsewhere() -> None:
    """What the shared state is for (this test fails if the replicas shared anything else)."""
    r = Replicas(None, None)
    one = r.identity()
    assert r.servers[0].claim(one, CIPHER) is not None
    assert r.servers[1].claim(one, CIPHER) is not None


def test_a_key_id_used_by_one_server_is_refused_by_another(state: SharedState) -> None:
    r = Replicas(state, state)
    identity = r.identity()
    claim = r.servers[0].claim(identity, CIPHER)
    assert claim is not None and claim.content.used
    assert state.is_spent(f"qkd:{claim.peers.client_sae_id}:{claim.peers.server_sae_id}", claim.content.used[0])


def test_an_unreachable_state_fails_closed(pg: PG, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hybridkex.steady")
    url = pg.new_url()
    state = open_state(url)
    try:
        r = Replicas(state, None)
        name = urllib.parse.urlsplit(url).path.lstrip("/")
        pg.admin(pg.server.get_uri(), f"DROP DATABASE {name} WITH (FORCE)")  # the database is gone
        identity = r.identity()
        assert r.servers[0].claim(identity, CIPHER) is None
        assert r.servers[0].stats.accepted == 0
        lines = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
        assert any("unreachable" in ln and "fail closed" in ln for ln in lines), lines
        assert r.servers[1].claim(identity, CIPHER) is not None  # the same connection, no shared state
    finally:
        state.close()


def test_server_config_takes_a_state(state: SharedState) -> None:
    setup = make_setup()
    assert dataclasses.replace(setup.server, state=state).state is state
    with pytest.raises(ConfigurationError, match="state"):
        dataclasses.replace(setup.server, state="postgresql://x/y")  # type: ignore[arg-type]
    assert " state=" not in repr(dataclasses.replace(setup.server, state=state)).split("steady=")[1]


def test_steady_connections_over_real_sockets_spend_their_keys_in_the_state(state: SharedState) -> None:
    setup = make_setup()
    setup = dataclasses.replace(setup, server=dataclasses.replace(setup.server, state=state))
    assert isinstance(setup.server, ServerConfig)
    log: queue.Queue[Any] = queue.Queue()
    with running_server(setup, recording_handler(log)) as srv:
        client = HybridClient(setup.client, key_source=setup.client_keys)
        used: list[str] = []
        for i in range(6):
            with client.connect(srv.server_address) as sock:
                assert echo_once(sock, b"n%d" % i) == b"n%d" % i
                session = log.get(timeout=WAIT)
                if session.steady is not None:
                    used += session.qkd_key_ids
        assert (client.full_handshakes, client.steady_connections) == (1, 5)
    assert len(used) == 5
    assert all(state.is_spent(f"qkd:{CLIENT_SAE}:{SERVER_SAE}", k.lower()) for k in used)
    assert not state.spend(f"qkd:{CLIENT_SAE}:{SERVER_SAE}", [used[0].lower()])


def test_the_state_needs_no_key_for_anti_replay(url: str) -> None:
    with open_state(url) as s:
        assert s.spend("s", ["x"]) and s.spend_counter("c", 1) is None
    with open_state(url, seal_key=SEAL_KEY) as s:
        assert not s.spend("s", ["x"])
