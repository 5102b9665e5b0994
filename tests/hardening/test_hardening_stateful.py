"""Stateful property tests of the handshake state machines (hypothesis RuleBasedStateMachine).

An honest Initiator and Responder talk through a hostile network and a hostile key source that
hypothesis controls: honest delivery in arbitrary chunks, flipped bytes, injected garbage, frames
replayed from another session, dropped frames, early EOF, QKD keys that are right, wrong (same key
IDs, other bytes) or unavailable, and API calls in the wrong state.  After every step:

* every call returned a defined event or raised a typed HybridKEXError (anything else fails);
* a HybridKEXError from the network path leaves the side FAILED (its state never advances on bad
  input), and every later call is a LocalProtocolError;
* API misuse (answering a QKD request that is not outstanding) is a LocalProtocolError that leaves
  the state unchanged;
* a side completes only if every byte both sides received up to then was the honest peer's and
  the QKD keys were right: no key ever comes out of a tampered or failed handshake;
* when both complete, they agree on the transcript hash and the TLS PSK.
"""

from __future__ import annotations

from typing import Any

import pytest
from hardeninghelpers import fuzz_targets as ft
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hybridkex.exceptions import HybridKEXError, LocalProtocolError
from hybridkex.protocol import (
    NEED_DATA,
    PAUSED,
    HandshakeComplete,
    Initiator,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
    State,
)
from hybridkex.qkd.base import QKDKey

SIDES = ("ini", "res")
OTHER = {"ini": "res", "res": "ini"}
#: Frames of other sessions (seed 1/2 honest runs), for replay.
REPLAY = [f for p in range(len(ft._PROFILES)) for s in ft.honest_flights(p) for f in ft._split_frames(s)]
STATS = {"runs": 0, "steps": 0, "completed_both": 0, "failed_typed": 0, "misuse": 0}


class Handshake(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conn: dict[str, Initiator | Responder] = {}
        self.pending = {"ini": bytearray(), "res": bytearray()}
        self.tampered = False
        self.failed = {"ini": False, "res": False}
        self.sessions: dict[str, Any] = {}
        self.request: dict[str, QKDKeysRequired | QKDKeysByIdRequired | None] = {"ini": None, "res": None}
        self.counter = [0]

    @initialize(profile=st.integers(0, len(ft._PROFILES) - 1), seed=st.integers(0, 2**32))
    def start(self, profile: int, seed: int) -> None:
        STATS["runs"] += 1
        ini_cfg, res_cfg = ft._configs(profile)
        # Fresh randomness per run: replayed frames of the seeded sessions never match this one.
        self.conn["res"] = Responder(res_cfg, randbytes=ft._Rand(seed * 2 + 101), clock=ft._clock)
        self.conn["ini"] = Initiator(ini_cfg, randbytes=ft._Rand(seed * 2 + 100), clock=ft._clock)
        self.counter = [seed * 1000]
        self._step("ini")

    # --- driving one side ----------------------------------------------------------------------

    def _collect(self, side: str) -> None:
        data = self.conn[side].data_to_send()
        if data:
            self.pending[OTHER[side]] += data

    def _on_error(self, side: str, exc: HybridKEXError) -> None:
        assert not isinstance(exc, LocalProtocolError) or self.failed[side] or "internal" not in str(exc), exc
        assert self.conn[side].state is State.FAILED, (side, exc, self.conn[side].state)
        assert side not in self.sessions
        self.failed[side] = True
        STATS["failed_typed"] += 1

    def _step(self, side: str) -> None:
        conn = self.conn[side]
        if self.failed[side] or side in self.sessions or self.request[side] is not None:
            self._collect(side)
            return
        try:
            for _ in range(16):
                event = conn.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
                if isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
                    self.request[side] = event
                    break
                assert isinstance(event, HandshakeComplete), f"undefined event {event!r}"
                assert not self.tampered, f"{side} completed a tampered handshake"
                assert conn.state is State.COMPLETE
                self.sessions[side] = event.session
                break
        except HybridKEXError as exc:
            self._on_error(side, exc)
        self._collect(side)

    def _receive(self, side: str, data: bytes) -> None:
        conn = self.conn[side]
        if self.failed[side]:
            with pytest.raises(LocalProtocolError):
                conn.receive_data(data)
            return
        try:
            conn.receive_data(data)
        except HybridKEXError as exc:
            self._on_error(side, exc)
            self._collect(side)
            return
        self._step(side)

    # --- the network ---------------------------------------------------------------------------

    @rule(side=st.sampled_from(SIDES), n=st.integers(1, 4096))
    def deliver(self, side: str, n: int) -> None:
        """Honest bytes, in a chunk of any size."""
        chunk = bytes(self.pending[side][:n])
        del self.pending[side][:n]
        if chunk:
            self._receive(side, chunk)

    @rule()
    def honest_round(self) -> None:
        """Everything pending delivered whole and every QKD request answered right, both ways."""
        for side in ("res", "ini"):
            if self.request[side] is not None:
                self.answer_qkd(side, "right")
            self.deliver(side, 1 << 20)

    @precondition(lambda self: any(self.pending[s] for s in SIDES))
    @rule(side=st.sampled_from(SIDES), pos=st.integers(0, 1 << 16), xor=st.integers(1, 255))
    def deliver_flipped(self, side: str, pos: int, xor: int) -> None:
        """The next honest bytes with one byte changed."""
        data = bytearray(self.pending[side])
        self.pending[side].clear()
        if not data:
            return
        data[pos % len(data)] ^= xor
        self.tampered = True
        self._receive(side, bytes(data))

    @rule(side=st.sampled_from(SIDES), data=st.binary(min_size=1, max_size=64))
    def inject(self, side: str, data: bytes) -> None:
        self.tampered = True
        self._receive(side, data)

    @rule(side=st.sampled_from(SIDES), index=st.integers(0, len(REPLAY) - 1))
    def replay(self, side: str, index: int) -> None:
        self.tampered = True
        self._receive(side, REPLAY[index])

    @precondition(lambda self: any(len(self.pending[s]) >= 8 for s in SIDES))
    @rule(side=st.sampled_from(SIDES))
    def drop_frame(self, side: str) -> None:
        buf = self.pending[side]
        if len(buf) < 8:
            return
        n = 8 + int.from_bytes(buf[4:8], "big")
        del buf[:n]
        self.tampered = True

    @rule(side=st.sampled_from(SIDES))
    def eof(self, side: str) -> None:
        self.pending[side].clear()
        self._receive(side, b"")

    # --- the key source ------------------------------------------------------------------------

    def _keys(self, side: str, wrong: bool) -> list[QKDKey]:
        request = self.request[side]
        assert request is not None
        keys = ft._answer(request, self.counter)
        if wrong:
            keys = [QKDKey(k.key_id, bytes(b ^ 0x5A for b in k.key)) for k in keys]
        return keys

    @precondition(lambda self: any(self.request[s] for s in SIDES))
    @rule(side=st.sampled_from(SIDES), how=st.sampled_from(["right", "right", "wrong", "unavailable"]))
    def answer_qkd(self, side: str, how: str) -> None:
        if self.request[side] is None:
            return
        conn = self.conn[side]
        keys = self._keys(side, how == "wrong") if how != "unavailable" else []
        self.request[side] = None
        if how == "wrong":
            self.tampered = True
        try:
            if how == "unavailable":
                conn.qkd_unavailable("the KME is down (test)")
            else:
                conn.provide_qkd_keys(keys)
        except HybridKEXError as exc:
            self._on_error(side, exc)
            self._collect(side)
            return
        self._step(side)

    # --- API misuse ----------------------------------------------------------------------------

    @rule(side=st.sampled_from(SIDES), call=st.sampled_from(["provide", "unavailable", "next_event"]))
    def misuse(self, side: str, call: str) -> None:
        """Calls the current state does not allow: typed LocalProtocolError, state unchanged."""
        conn = self.conn[side]
        before = conn.state
        if call == "next_event" and before not in (State.COMPLETE, State.FAILED):
            return  # a legal call there
        if call != "next_event" and self.request[side] is not None:
            return  # there is an outstanding request: answering it is legal
        STATS["misuse"] += 1
        with pytest.raises(LocalProtocolError):
            if call == "provide":
                conn.provide_qkd_keys([QKDKey("01234567-89ab-4def-8123-456789abcdef", bytes(32))])
            elif call == "unavailable":
                conn.qkd_unavailable("misuse")
            else:
                conn.next_event()
        assert conn.state is before

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        STATS["steps"] += 1
        for side in SIDES:
            if side not in self.conn:
                return
            state = self.conn[side].state
            assert (state is State.FAILED) == self.failed[side], (side, state)
            assert (state is State.COMPLETE) == (side in self.sessions), (side, state)
        if len(self.sessions) == 2:
            a, b = self.sessions["ini"], self.sessions["res"]
            assert a.info.transcript_hash == b.info.transcript_hash
            assert a.secret.tls_psk() == b.secret.tls_psk()

    def teardown(self) -> None:
        if len(self.sessions) == 2:
            STATS["completed_both"] += 1


Handshake.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None, database=None,
                                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestHandshakeStateMachines = Handshake.TestCase


def test_honest_runs_complete_under_the_same_driver() -> None:
    """The machine's driver itself works: an honest run with right keys completes on both sides
    (so the invariants above are not vacuously true)."""
    for profile in range(len(ft._PROFILES)):
        m = Handshake()
        m.start(profile, 7)
        for _ in range(20):
            for side in SIDES:
                if m.request[side] is not None:
                    m.answer_qkd(side, "right")
                m.deliver(side, 1 << 20)
            if len(m.sessions) == 2:
                break
        m.consistent()
        assert set(m.sessions) == {"ini", "res"}, profile


def test_zz_the_machine_explored_both_outcomes() -> None:
    """After the state-machine run (same module, earlier): some runs completed on both sides, many
    failed with typed errors, and misuse was tried (the numbers go to docs/security.md)."""
    if STATS["runs"] < 100:
        pytest.skip("run together with TestHandshakeStateMachines")
    print("stateful:", STATS)
    assert STATS["completed_both"] > 0 and STATS["failed_typed"] > 0 and STATS["misuse"] > 0, STATS
