"""Identities for parents a server does not hold cost a bounded number of shared-state reads (both backends).

A steady-state identity's tag can only be checked once its parent is read, so each identity naming
an unknown parent used to cost one database read.  Here the reads are counted at the real state
object (a thin wrapper): a flood of well-formed identities with random parent handles reads at most
the configured burst (per process, per source address), the same unknown handle is read once per
``unknown_ttl``, a parent registered on another server moments later is found once that has passed,
and a real client over the limit is refused like an unknown identity and runs a full handshake.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from iohelpers import echo_on, echo_once, make_setup, running_server
from statehelpers import SEAL_KEY
from steadyparts import Clock, parent_info

from hybridkex import Policy, get_suite
from hybridkex.combiner import CombinedSecret
from hybridkex.exceptions import ConfigurationError, PSKRejected, SteadyStateRefused
from hybridkex.io import QKDKeyManager
from hybridkex.io.config import ReconnectPolicy, ServerConfig, StateReads, SteadyPolicy
from hybridkex.io.connection import connect
from hybridkex.io.reconnect import ReconnectRegistry, reconnect_identity
from hybridkex.qkd import MemoryKeyLink
from hybridkex.state import SharedState, open_state
from hybridkex.steady import SteadyRegistry, SteadyTicket
from hybridkex.steady.derive import SteadyIdentity
from hybridkex.steady.shared import KIND

SUITE = get_suite("x25519-mlkem768-qkd-hkdfsha256")
CIPHER = SUITE.tls_cipher


class CountingState:
    """The real state, with its parent reads (``get_ticket``) counted; everything else passes through."""

    def __init__(self, state: SharedState) -> None:
        self._state = state
        self.reads = 0

    def get_ticket(self, kind: str, handle: bytes) -> Any:
        self.reads += 1
        return self._state.get_ticket(kind, handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)





def forged(handle: bytes | None = None) -> bytes:
    """A well-formed steady-state identity for a parent nobody registered (any tag will do)."""
    return SteadyIdentity(handle or os.urandom(16), 1, False, (), ()).encode(os.urandom(32), SUITE)


class Fleet:
    """Server registries A and B sharing one state (B's reads counted), and a client of A's parents."""

    def __init__(self, state: SharedState, reads: StateReads) -> None:
        self.clock = Clock(1000.0)
        self.counted = CountingState(state)
        link = MemoryKeyLink(("kme-client", "kme-server"))
        self.policy, self.qkd = SteadyPolicy(announce=0), Policy()
        self.client_keys = QKDKeyManager(link.source("sae-client", 0), self.qkd.key_budget)
        server_keys = QKDKeyManager(link.source("sae-server", 1), self.qkd.key_budget)
        self.a = SteadyRegistry(self.policy, self.qkd, server_keys, state=state)
        self.b = SteadyRegistry(self.policy, self.qkd, server_keys, state=self.counted,  # type: ignore[arg-type]
                                clock=self.clock, reads=reads)

    def client(self, *, register: bool = True) -> tuple[SteadyTicket, CombinedSecret]:
        """A client's ticket for a new parent, registered on A (and so stored in the state) or not yet."""
        raw = os.urandom(32)
        ticket = SteadyTicket(CombinedSecret(SUITE, raw), parent_info("initiator", SUITE.name),
                                   self.policy, self.qkd, self.client_keys)
        if register:
            self.a.register(CombinedSecret(SUITE, raw), parent_info("responder", SUITE.name))
        return ticket, CombinedSecret(SUITE, raw)

    def identity(self, ticket: SteadyTicket) -> bytes:
        attempt = ticket.take()
        assert attempt is not None
        if attempt.request is not None:
            attempt.provide(self.client_keys.answer(attempt.request))
        return attempt.credentials()[0]


def test_a_flood_of_random_parents_reads_at_most_the_burst_then_the_rate(state: SharedState) -> None:
    f = Fleet(state, StateReads(rate=5.0, burst=10, address_rate=0))
    assert all(f.b.claim(forged(), CIPHER) is None for _ in range(200))
    assert f.counted.reads == 10
    assert f.b.reads is not None and (f.b.reads.reads, f.b.reads.limited) == (10, 190)
    assert f.b.stats.refused == 200 and f.b.stats.accepted == 0
    f.clock.now += 2.0  # 2 s at 5 reads/s
    assert all(f.b.claim(forged(), CIPHER) is None for _ in range(50))
    assert f.counted.reads == 20


def test_each_source_address_has_its_own_bucket(state: SharedState) -> None:
    f = Fleet(state, StateReads(rate=1000.0, burst=1000, address_rate=0.5, address_burst=3))
    for _ in range(40):
        f.b.claim(forged(), CIPHER, source="203.0.113.7")
    assert f.counted.reads == 3
    for _ in range(40):  # the same IPv6 /64, whatever the interface ID
        f.b.claim(forged(), CIPHER, source=f"2001:db8:1:2::{os.urandom(2).hex()}")
    assert f.counted.reads == 6
    assert f.b.claim(forged(), CIPHER, source="203.0.113.8") is None  # another address: read
    assert f.counted.reads == 7
    assert f.b.reads is not None and f.b.reads.limited == 74


def test_an_unknown_handle_is_read_once_per_ttl(state: SharedState) -> None:
    f = Fleet(state, StateReads(rate=1000.0, burst=1000, unknown_ttl=3.0, unknown_max=5))
    handle = os.urandom(16)
    assert all(f.b.claim(forged(handle), CIPHER) is None for _ in range(100))
    assert f.counted.reads == 1
    assert f.b.reads is not None and f.b.reads.cached == 99
    f.clock.now += 3.0
    f.b.claim(forged(handle), CIPHER)
    assert f.counted.reads == 2
    for _ in range(5):  # five other unknown handles push it out of the bounded cache
        f.b.claim(forged(), CIPHER)
    f.b.claim(forged(handle), CIPHER)
    assert f.counted.reads == 8 and len(f.b.reads) == 5


def test_a_parent_registered_elsewhere_moments_later_is_found_after_the_ttl(state: SharedState) -> None:
    f = Fleet(state, StateReads(unknown_ttl=2.0))
    ticket, secret = f.client(register=False)
    assert f.b.claim(f.identity(ticket), CIPHER) is None  # B reads before A's write landed
    f.a.register(secret, parent_info("responder", SUITE.name))  # now A has it, and so does the state
    assert f.b.claim(f.identity(ticket), CIPHER) is None  # within the TTL: refused without a read
    assert f.counted.reads == 1
    f.clock.now += 2.0
    claim = f.b.claim(f.identity(ticket), CIPHER)
    assert claim is not None and f.b.stats.loaded == 1 and f.counted.reads == 2
    assert f.b.claim(f.identity(ticket), CIPHER) is not None and f.counted.reads == 2  # in B's memory now


def test_real_parents_give_their_tokens_back(state: SharedState) -> None:
    f = Fleet(state, StateReads(rate=0.01, burst=2, address_rate=0.01, address_burst=2))
    for _ in range(6):  # more real parents than the burst: each read found one whose tag verified
        ticket, _ = f.client()
        assert f.b.claim(f.identity(ticket), CIPHER, source="198.51.100.1") is not None
    assert f.b.stats.loaded == 6
    for _ in range(10):  # a wrong tag for a real parent is charged
        ticket, _ = f.client()
        body = f.identity(ticket)
        assert f.b.claim(body[:-2] + (b"AA" if body[-2:] != b"AA" else b"BA"), CIPHER,
                         source="198.51.100.1") is None
    assert f.counted.reads == 6 + 2
    assert f.b.reads is not None and f.b.reads.limited == 8


def test_a_server_without_a_state_key_reads_no_parents(url: str) -> None:
    with open_state(url) as plain:  # no seal key: parents are not shared, so nothing is read
        f = Fleet(plain, StateReads())
        assert f.b.reads is None
        assert f.b.claim(forged(), CIPHER) is None and f.counted.reads == 0


def test_state_reads_are_validated() -> None:
    for bad in ({"rate": -1}, {"burst": 0}, {"unknown_ttl": 0}, {"unknown_max": 0}, {"address_rate": True}):
        with pytest.raises(ConfigurationError, match="state_reads"):
            StateReads(**bad)  # type: ignore[arg-type]
    setup = make_setup()
    with pytest.raises(ConfigurationError, match="state_reads"):
        dataclasses.replace(setup.server, state_reads={"rate": 1})  # type: ignore[arg-type]


def test_a_real_client_over_the_limit_is_refused_then_runs_a_full_handshake(url: str) -> None:
    """Two servers over real sockets: the client address's bucket is what refuses B's read."""
    counted = CountingState(open_state(url, seal_key=SEAL_KEY))
    setup = make_setup()
    reads = StateReads(rate=1000.0, burst=1000, address_rate=0.001, address_burst=2)
    server = dataclasses.replace(setup.server, state=counted, purge_every=0, state_reads=reads)
    assert isinstance(server, ServerConfig)
    setup = dataclasses.replace(setup, server=server)
    try:
        with running_server(setup) as a, running_server(setup) as b:
            full = connect(a.server_address, setup.client, key_source=setup.client_keys)
            ticket = full.reconnect_ticket
            full.close()
            with connect(b.server_address, setup.client, key_source=setup.client_keys, ticket=ticket) as steady:
                assert steady.session.steady is not None and echo_once(steady) == b"ping"
            assert counted.reads == 1  # B read A's parent; found, so its token went back
            gate = b.steady_registry.reads if b.steady_registry is not None else None
            assert gate is not None
            for _ in range(3):  # an attacker at the client's address: two reads, then none
                b.steady_registry.claim(forged(), CIPHER, source="127.0.0.1")
            assert counted.reads == 3 and gate.limited == 1
            full = connect(a.server_address, setup.client, key_source=setup.client_keys)
            ticket = full.reconnect_ticket
            full.close()
            with pytest.raises(SteadyStateRefused):  # over the limit: refused like an unknown identity
                connect(b.server_address, setup.client, key_source=setup.client_keys, ticket=ticket)
            assert counted.reads == 3 and gate.limited == 2
            with connect(b.server_address, setup.client, key_source=setup.client_keys) as again:
                assert again.session.steady is None and echo_once(again) == b"ping"  # the full handshake
            full = connect(a.server_address, setup.client, key_source=setup.client_keys)
            ticket = full.reconnect_ticket
            full.close()
            with connect(b.server_address, setup.client, key_source=setup.client_keys, ticket=ticket,
                         source_address=("127.0.0.2", 0)) as other:  # another address: B reads the parent
                assert other.session.steady is not None
            assert counted.reads == 4
    finally:
        counted.close()


def test_an_asyncio_server_knows_the_client_address(tmp_path: Any) -> None:
    """The asyncio server's claim (on a worker thread) is charged to the client's address too."""
    import asyncio

    from hybridkex.io.aio import ServerSide, connect_on_streams

    raw = open_state(str(tmp_path / "state.sqlite3"), seal_key=SEAL_KEY)
    counted = CountingState(raw)  # the server's reads counted; the test's own (raw) not
    setup = make_setup()
    reads = StateReads(rate=1000.0, burst=1000, address_rate=0.001, address_burst=1)
    config = dataclasses.replace(setup.server, state=counted, purge_every=0, state_reads=reads)

    async def main() -> list[bool]:
        sides = [ServerSide(config, key_source=setup.server_keys) for _ in range(2)]

        plain = [await asyncio.start_server(echo_on(s, 1), "127.0.0.1", 0) for s in sides]
        a, b = (p.sockets[0].getsockname()[1] for p in plain)
        refused = []
        try:
            for exhaust in (False, True):
                r, w = await asyncio.open_connection("127.0.0.1", a)
                hr, hw = await connect_on_streams(r, w, setup.client, key_source=setup.client_keys)
                ticket = hw.reconnect_ticket
                await hw.aclose()
                for _ in range(200):  # A writes its parent in the background
                    if await asyncio.to_thread(raw.get_ticket, KIND, ticket.handle) is not None:  # type: ignore[union-attr]
                        break
                    await asyncio.sleep(0.02)
                steady = sides[1].state.steady
                assert steady is not None
                if exhaust:
                    steady.claim(forged(), CIPHER, source="127.0.0.1")
                r, w = await asyncio.open_connection("127.0.0.1", b)
                try:
                    hr, hw = await connect_on_streams(r, w, setup.client, key_source=setup.client_keys,
                                                      ticket=ticket)
                except SteadyStateRefused:
                    refused.append(True)
                    w.close()
                else:
                    hw.write(b"x")
                    assert await hr.read() == b"x"
                    refused.append(False)
                    await hw.aclose()
        finally:
            for p in plain:
                p.close()
            for s in sides:
                s.close()
        return refused

    try:
        assert asyncio.run(main()) == [False, True]
    finally:
        counted.close()
    assert counted.reads == 2  # B read the first parent, and one forged identity; not the second parent


def test_reconnect_parents_are_read_behind_the_same_gate(state: SharedState) -> None:
    clock, counted = Clock(1000.0), CountingState(state)
    policy = ReconnectPolicy(enabled=True)
    a = ReconnectRegistry(policy, state=state)
    b = ReconnectRegistry(policy, state=counted, clock=clock,  # type: ignore[arg-type]
                          reads=StateReads(rate=5.0, burst=10, address_rate=0))
    for _ in range(20):  # more real parents (registered on A) than the burst: found, so not charged
        raw = os.urandom(32)
        a.register(CombinedSecret(SUITE, raw), parent_info("responder", SUITE.name))
        assert b.lookup(reconnect_identity(CombinedSecret(SUITE, raw), 1), CIPHER) is not None
    assert counted.reads == 20
    for _ in range(200):
        assert b.lookup(reconnect_identity(CombinedSecret(SUITE, os.urandom(32)), 1), CIPHER) is None
    assert counted.reads == 30 and b.reads is not None and b.reads.limited == 190
    handle_of = CombinedSecret(SUITE, os.urandom(32))
    clock.now += 10.0
    for i in range(1, 6):  # one unknown parent, five of its identities: read once
        assert b.lookup(reconnect_identity(handle_of, i), CIPHER) is None
    assert counted.reads == 31 and b.reads.cached == 4


def test_a_reconnect_over_the_address_limit_is_refused_before_the_read(url: str) -> None:
    """The blocking server's PSK callback charges the client's address (127.0.0.1, then 127.0.0.2)."""
    counted = CountingState(open_state(url, seal_key=SEAL_KEY))
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True))
    reads = StateReads(rate=1000.0, burst=1000, address_rate=0.001, address_burst=1)
    server = dataclasses.replace(setup.server, state=counted, purge_every=0, state_reads=reads)
    setup = dataclasses.replace(setup, server=server)
    try:
        with running_server(setup) as a, running_server(setup) as b:
            assert b.reconnect_registry is not None and b.reconnect_registry.reads is not None
            b.reconnect_registry.lookup(reconnect_identity(CombinedSecret(SUITE, os.urandom(32)), 1), CIPHER,
                                        source="127.0.0.1")  # uses up 127.0.0.1's one read
            full = connect(a.server_address, setup.client, key_source=setup.client_keys)
            ticket = full.reconnect_ticket
            full.close()
            with pytest.raises(PSKRejected):
                connect(b.server_address, setup.client, key_source=setup.client_keys, ticket=ticket)
            assert counted.reads == 1 and b.reconnect_registry.reads.limited == 1
            with connect(b.server_address, setup.client, key_source=setup.client_keys, ticket=ticket,
                         source_address=("127.0.0.2", 0)) as again:
                assert again.session.reconnect and echo_once(again) == b"ping"
            assert counted.reads == 2
    finally:
        counted.close()
