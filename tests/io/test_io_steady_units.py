"""The steady state's pieces without sockets: identities, the server's checks in order, the
anti-replay window, announced keys and their expiry, the client's reserve."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import pytest
from steadyparts import Clock, parent_info

from hybridkex import KeyBudget, Policy, get_suite
from hybridkex.combiner import CombinedSecret
from hybridkex.exceptions import PolicyViolation, RemoteProtocolError
from hybridkex.io import QKDKeyManager
from hybridkex.io.config import SteadyPolicy
from hybridkex.qkd import MemoryKeyLink
from hybridkex.steady import SteadyRegistry, SteadyTicket, derive, first_psk_identity
from hybridkex.steady.registry import WINDOW

SUITE = get_suite("x25519-mlkem768-qkd-hkdfsha256")
CIPHER = SUITE.tls_cipher





class Pair:
    """A client ticket and a server registry for one parent secret, over one in-memory QKD link."""

    def __init__(self, *, policy: SteadyPolicy | None = None, qkd: Policy | None = None,
                 clock: Clock | None = None) -> None:
        self.link = MemoryKeyLink(("kme-client", "kme-server"))
        self.clock = clock or Clock()
        self.policy = policy or SteadyPolicy(announce=2)
        self.qkd = qkd or Policy()
        budget = self.qkd.key_budget
        self.client_keys = QKDKeyManager(self.link.source("sae-client", 0), budget)
        self.server_keys = QKDKeyManager(self.link.source("sae-server", 1), budget)
        raw = os.urandom(32)
        self.ticket = SteadyTicket(CombinedSecret(SUITE, raw), parent_info("initiator", SUITE.name),
                                   self.policy, self.qkd,
                                   self.client_keys, clock=self.clock)
        self.registry = SteadyRegistry(self.policy, self.qkd, self.server_keys, clock=self.clock)
        self.handle = self.registry.register(CombinedSecret(SUITE, raw), parent_info("responder", SUITE.name))

    def attempt(self) -> Any:
        a = self.ticket.take()
        assert a is not None
        if a.request is not None:
            a.provide(self.client_keys.answer(a.request))
        return a

    def accept(self, identity: bytes) -> tuple[Any, bytes]:
        claim = self.registry.claim(identity, CIPHER)
        assert claim is not None
        keys = claim.keys if claim.keys is not None else claim.wait(5.0)
        return claim, claim.psk(keys)


def wait_held(registry: SteadyRegistry, n: int) -> None:
    done = threading.Event()
    for _ in range(200):
        if registry.held_keys() >= n:
            return
        done.wait(0.01)
    raise AssertionError(f"the server never held {n} pre-fetched keys")


def wait_reserved(ticket: SteadyTicket, n: int) -> None:
    """Until the ticket's background refill has reserved ``n`` keys (a hang guard, not a timing test)."""
    ticket.refill()
    for _ in range(500):
        if len(ticket._reserved) >= n:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the ticket never reserved {n} keys")


def test_both_ends_derive_the_same_psk_and_announced_keys_are_prefetched() -> None:
    p = Pair()
    wait_reserved(p.ticket, 2)
    first = p.attempt()
    identity, psk = first.credentials()
    assert identity.startswith(b"hk1-ss.") and identity.isascii() and len(identity) < 255
    claim, server_psk = p.accept(identity)
    assert server_psk == psk and len(psk) == SUITE.hash_len
    assert claim.facts.index == 1 and claim.facts.qkd_key_ids == first.facts().qkd_key_ids
    announced = len(first.announced)
    assert announced  # the reserve beyond this connection's key is announced
    claim.confirm()
    p.ticket.succeeded(first)  # (it hands the announcements to the ticket: first.announced is now empty)
    wait_held(p.registry, announced)
    second = p.attempt()
    assert second.prefetched and second.request is None
    identity2, psk2 = second.credentials()
    claim2, server_psk2 = p.accept(identity2)
    assert claim2.keys is not None  # it was here before the connection started
    assert server_psk2 == psk2 != psk


def test_every_change_to_an_identity_is_refused() -> None:
    p = Pair(policy=SteadyPolicy(announce=0))
    identity, _ = p.attempt().credentials()
    refused = 0
    for i in range(len(b"hk1-ss."), len(identity)):
        for repl in (b"A", b"-", b"_"):
            if identity[i:i + 1] == repl:
                continue
            bad = identity[:i] + repl + identity[i + 1:]
            assert p.registry.claim(bad, CIPHER) is None
            refused += 1
    assert refused > 200 and p.registry.stats.accepted == 0
    assert p.registry.claim(identity, CIPHER) is not None  # nothing was spent by the forgeries


def test_the_servers_checks(caplog: pytest.LogCaptureFixture) -> None:
    p = Pair(policy=SteadyPolicy(announce=0, max_uses=WINDOW * 4))
    a = p.attempt()
    identity, _ = a.credentials()
    assert p.registry.claim(identity, "TLS_AES_256_GCM_SHA384") is None  # another cipher than the suite's
    assert p.registry.claim(identity, CIPHER) is not None
    assert p.registry.claim(identity, CIPHER) is None and p.registry.stats.replayed == 1
    # The same key ID again under a new counter: the key is spent.
    forged = derive.SteadyIdentity(p.ticket.handle, 2, False, a.facts().qkd_key_ids, ())
    key = bytes(p.registry._parents[p.handle].key)
    assert p.registry.claim(forged.encode(key, SUITE), CIPHER) is None
    assert any("was used before" in r.getMessage() for r in caplog.records)
    # No QKD key while the policy requires one.
    bare = derive.SteadyIdentity(p.ticket.handle, 3, False, (), ())
    assert p.registry.claim(bare.encode(key, SUITE), CIPHER) is None
    # An epoch key while the server's budget is fresh.
    epoch = derive.SteadyIdentity(p.ticket.handle, 4, True, ("11111111-1111-4111-8111-111111111111",), ())
    assert p.registry.claim(epoch.encode(key, SUITE), CIPHER) is None
    # Beyond max_uses.
    over = derive.SteadyIdentity(p.ticket.handle, WINDOW * 4 + 1, False, (), ())
    assert p.registry.claim(over.encode(key, SUITE), CIPHER) is None
    # An unknown parent (the server restarted).
    other = Pair(policy=SteadyPolicy(announce=0))
    assert other.registry.claim(p.attempt().credentials()[0], CIPHER) is None


def test_the_replay_window_accepts_out_of_order_counters_once() -> None:
    p = Pair(policy=SteadyPolicy(announce=0, max_uses=WINDOW * 4))
    key = bytes(p.registry._parents[p.handle].key)

    def claim(i: int) -> bool:
        ident = derive.SteadyIdentity(p.ticket.handle, i, False, (), ())
        return p.registry.claim(ident.encode(key, SUITE), CIPHER) is not None

    p.registry._qkd = Policy(qkd="optional")
    assert claim(5) and claim(3) and claim(4) and not claim(4) and not claim(5)
    assert claim(WINDOW + 10)
    assert not claim(10) and not claim(9)  # 10 behind the highest by WINDOW: too old
    assert claim(11)  # still inside the window, never seen


def test_parents_and_announced_keys_expire() -> None:
    clock = Clock()
    p = Pair(policy=SteadyPolicy(announce=0, lifetime=60.0, key_lifetime=10.0), clock=clock)
    identity, _ = p.attempt().credentials()
    clock.now += 61
    assert p.registry.claim(identity, CIPHER) is None and len(p.registry) == 0
    assert not p.ticket.usable and p.ticket.take() is None


def test_a_failed_connection_spends_its_key_and_returns_its_announcements() -> None:
    p = Pair(policy=SteadyPolicy(announce=2))
    wait_reserved(p.ticket, 4)
    a = p.attempt()
    used, announced = a.facts().qkd_key_ids, [k.key_id for k in a.announced]
    assert used and announced
    p.ticket.failed(a)
    b = p.attempt()
    assert not set(b.facts().qkd_key_ids) & set(used)  # never handed out again
    # The announcements were never used: the next connection uses the first of them, announces the rest.
    again = list(b.facts().qkd_key_ids) + [k.key_id for k in b.announced]
    assert again[:len(announced)] == announced


def test_required_qkd_without_a_key_refuses_to_build_credentials() -> None:
    p = Pair(policy=SteadyPolicy(announce=0))
    a = p.ticket.take()
    assert a is not None and a.request is not None
    a.unavailable(RuntimeError("KME down"))
    with pytest.raises(PolicyViolation, match="KME down"):
        a.credentials()


def test_an_epoch_budget_sends_the_epoch_flag() -> None:
    qkd = Policy(key_budget=KeyBudget(mode="epoch"))
    p = Pair(policy=SteadyPolicy(announce=2), qkd=qkd)
    a, b = p.attempt(), p.attempt()
    assert a.epoch and b.epoch and a.facts().qkd_key_ids == b.facts().qkd_key_ids and not a.announced
    for att in (a, b):
        identity, psk = att.credentials()
        assert p.accept(identity)[1] == psk


def test_client_hello_parsing_is_strict() -> None:
    with pytest.raises(RemoteProtocolError):
        first_psk_identity(b"\x01\x00\x00")
    with pytest.raises(RemoteProtocolError):
        first_psk_identity(b"\x02" + bytes(40))
    assert derive.parse_identity(b"hk1-ss.") is None and derive.parse_identity(b"hk1-rc.AAAA") is None
    with pytest.raises(Exception, match="UUID"):
        derive.SteadyIdentity(bytes(16), 1, False, ("not-a-uuid",), ()).body()
    with pytest.raises(Exception, match="at most"):
        derive.SteadyIdentity(bytes(16), 1, False, (), ("11111111-1111-4111-8111-111111111111",) * 9)


def test_announced_keys_are_erased_after_key_lifetime_on_both_ends() -> None:
    clock = Clock()
    p = Pair(policy=SteadyPolicy(announce=2, key_lifetime=10.0), clock=clock)
    wait_reserved(p.ticket, 3)
    first = p.attempt()
    announced = {k.key_id for k in first.announced}
    identity, _ = first.credentials()
    claim, _ = p.accept(identity)
    claim.confirm()
    p.ticket.succeeded(first)
    wait_held(p.registry, len(announced))
    assert p.ticket.announced_keys == len(announced) > 0
    clock.now += 11
    late = p.attempt()  # the client drops what it held too long and takes a new key
    assert not set(late.facts().qkd_key_ids) & announced
    assert p.ticket.announced_keys == 0
    identity, psk = late.credentials()
    _, server_psk = p.accept(identity)
    assert server_psk == psk and p.registry.held_keys() == 0  # the server erased its unused ones


def test_only_the_announced_keys_held_too_long_expire() -> None:
    """Two batches of announced keys, fetched 6 s apart: past the first batch's key_lifetime only it
    is erased; the later batch is still held and serves the next connection."""
    clock = Clock()
    p = Pair(policy=SteadyPolicy(announce=2, key_lifetime=10.0), clock=clock)

    def connect() -> set[str]:
        a = p.attempt()
        announced = {k.key_id for k in a.announced}
        claim, _ = p.accept(a.credentials()[0])
        claim.confirm()
        p.ticket.succeeded(a)
        return announced

    wait_reserved(p.ticket, 2)
    first = connect()
    wait_held(p.registry, len(first))
    clock.now += 6
    assert not connect()  # uses one of the first batch; its reserve is refilled meanwhile
    wait_reserved(p.ticket, 2)
    second = connect()  # uses another of the first, announces the second batch
    assert len(first) > 2 and second and not first & second
    wait_held(p.registry, len(first) - 2 + len(second))
    clock.now += 5  # 11 s after the first batch arrived, 5 s after the second
    later = p.attempt()  # the client drops what is left of the first batch too
    assert set(later.facts().qkd_key_ids) <= second
    identity, psk = later.credentials()
    claim, server_psk = p.accept(identity)
    assert server_psk == psk and claim.facts.prefetched
    assert p.registry.held_keys() == len(second) - 1


def test_announcements_made_while_a_fetch_is_in_flight_share_the_next_kme_request() -> None:
    """The server fetches announced keys one request at a time per parent: what connections
    announce meanwhile goes in one request after it, and a connection whose key is in that batch
    waits for it and gets its key."""
    p = Pair(policy=SteadyPolicy(announce=8))
    gate = threading.Event()
    fetch = p.server_keys.fetch

    def slow_fetch(request: Any) -> Any:  # a slow KME: answers once the test opens the gate
        gate.wait(10)
        return fetch(request)

    p.server_keys.fetch = slow_fetch  # type: ignore[method-assign]
    wait_reserved(p.ticket, 16)
    batches: list[list[str]] = []
    for _ in range(2):  # the first announces 8 keys (fetched, held up), the second the other 7
        a = p.attempt()
        batches.append([k.key_id for k in a.announced])
        claim = p.registry.claim(a.credentials()[0], CIPHER)
        assert claim is not None
        claim.confirm()
        p.ticket.succeeded(a)
    assert len(batches[0]) == 8 and len(batches[1]) == 7
    assert p.registry.stats.prefetch_requests == 1  # the second batch waits for the first request
    claims = []
    while True:  # connections using the first batch's keys, then the first of the second batch's
        a = p.attempt()
        identity, psk = a.credentials()
        claim = p.registry.claim(identity, CIPHER)
        assert claim is not None and claim.keys is None and claim.fetch is not None
        claims.append((claim, psk))
        if set(a.facts().qkd_key_ids) & set(batches[1]):
            break
    assert len(claims) == 8 and not claim.fetch.done.is_set()
    gate.set()
    for claim, psk in claims:  # each waits for the request its key is in
        assert claim.psk(claim.wait(5.0)) == psk
    assert p.registry.stats.prefetch_requests == 2 and p.server_keys.kme_fetches == 2
    assert p.registry.stats.on_demand == 0 and p.registry.stats.prefetch_failures == 0


def test_a_fetch_older_than_the_kme_timeout_does_not_hold_up_later_announcements() -> None:
    clock = Clock()
    p = Pair(policy=SteadyPolicy(announce=8), clock=clock)
    gate = threading.Event()
    fetch = p.server_keys.fetch

    def hung_fetch(request: Any) -> Any:  # a hung KME: requests answer once the test ends it
        gate.wait(10)
        return fetch(request)

    p.server_keys.fetch = hung_fetch  # type: ignore[method-assign]
    wait_reserved(p.ticket, 16)
    try:
        for step in range(2):
            a = p.attempt()
            claim = p.registry.claim(a.credentials()[0], CIPHER)
            assert claim is not None and a.announced
            claim.confirm()
            p.ticket.succeeded(a)
            if step == 0:
                clock.now += p.qkd.timeouts.kme + 1  # the first request is now older than the KME timeout
        # The second connection's keys went in a request of their own, not behind the hung one.
        assert p.registry.stats.prefetch_requests == 2
    finally:
        gate.set()
    wait_held(p.registry, 8 + 7 - 1)  # both batches arrive; the second connection used one of the first


def test_client_hello_reading_survives_every_truncation_and_byte_flip() -> None:
    """A real steady-state ClientHello, cut at every length and with every byte flipped: the
    reader returns or raises RemoteProtocolError, nothing else; intact, it finds the identity."""
    from hybridkex.tls import MemoryTLS
    from hybridkex.tls.pyopenssl import bind_psk, client_context

    p = Pair(policy=SteadyPolicy(announce=0))
    identity, psk = p.attempt().credentials()
    tls = MemoryTLS(client_context(suite=CIPHER, groups="X25519MLKEM768", require_pq=True), server_side=False)
    bind_psk(tls.connection, identity, psk)
    tls.do_handshake()
    record = tls.data_to_send()
    body = record[5:5 + int.from_bytes(record[3:5], "big")]
    suites, found = first_psk_identity(body)
    assert found == identity and len(suites) % 2 == 0
    for n in range(len(body)):
        with pytest.raises(RemoteProtocolError):
            first_psk_identity(body[:n])
    for i in range(0, len(body), 3):
        flipped = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        with contextlib.suppress(RemoteProtocolError):  # anything else fails the test
            first_psk_identity(flipped)


def test_the_per_parent_psk_context_gives_the_specified_psk() -> None:
    """PskContext (MA, MB and the binding's constant part encoded once) equals derive.steady_psk,
    the function the known-answer vectors check, with and without a QKD key."""
    from hybridkex.combiner import QKDBinding

    ids = ("sae-c", "sae-s", "kme-c", "kme-s")
    ctx = derive.PskContext(SUITE, client_identity="client", server_identity="server", qkd_ids=ids)
    body = derive.SteadyIdentity(os.urandom(16), 7, False, ("11111111-1111-4111-8111-111111111111",), ()).body()
    key, qkd = os.urandom(32), os.urandom(32)
    binding = QKDBinding(key_ids=("11111111-1111-4111-8111-111111111111",), master_sae_id=ids[0],
                         slave_sae_id=ids[1], master_kme_id=ids[2], slave_kme_id=ids[3])
    expected = derive.steady_psk(SUITE, key=key, qkd_key=qkd, body=body, binding=binding,
                                 client_identity="client", server_identity="server")
    assert ctx.psk(key=key, qkd_key=qkd, body=body, key_ids=binding.key_ids) == expected
    bare = derive.steady_psk(SUITE, key=key, qkd_key=b"", body=body, binding=None, client_identity="client",
                             server_identity="server")
    assert ctx.psk(key=key, qkd_key=b"", body=body, key_ids=()) == bare != expected
