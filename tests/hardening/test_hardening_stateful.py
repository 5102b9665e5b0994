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

import os
from typing import Any

import pytest
from hardeninghelpers import fuzz_targets as ft
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

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
    """Bytes in flight are segments tagged "tainted" when their sender had consumed tampered input
    (or used wrong QKD keys) when it produced them; each side records the offset of the first
    tampered byte it received.  A side may complete only if everything it consumed (its input
    minus the trailing bytes left for the next layer) is untainted."""

    def __init__(self) -> None:
        super().__init__()
        self.conn: dict[str, Initiator | Responder] = {}
        self.pending: dict[str, list[tuple[bytes, bool]]] = {"ini": [], "res": []}
        self.received = {"ini": 0, "res": 0}
        self.first_tamper: dict[str, int | None] = {"ini": None, "res": None}
        self.wrong_keys = {"ini": False, "res": False}
        self.drop_next = {"ini": False, "res": False}
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

    # --- bookkeeping ---------------------------------------------------------------------------

    def _consumed(self, side: str) -> int:
        conn = self.conn[side]
        left = len(conn.trailing_data) if conn.state is State.COMPLETE else len(conn._inbuf)
        return self.received[side] - left

    def _tainted_output(self, side: str) -> bool:
        first = self.first_tamper[side]
        return self.wrong_keys[side] or (first is not None and first < self._consumed(side))

    def _mark(self, side: str, offset: int) -> None:
        first = self.first_tamper[side]
        self.first_tamper[side] = offset if first is None else min(first, offset)

    def _take(self, side: str, n: int) -> tuple[bytes, int | None]:
        """Up to ``n`` bytes from the front of what is in flight to ``side``, and the offset of its
        first tainted byte (None: all honest)."""
        out, taint = bytearray(), None
        segs = self.pending[side]
        while segs and len(out) < n:
            data, tainted = segs[0]
            part = data[: n - len(out)]
            if tainted and taint is None:
                taint = len(out)
            out += part
            if len(part) == len(data):
                segs.pop(0)
            else:
                segs[0] = (data[len(part):], tainted)
        return bytes(out), taint

    # --- driving one side ----------------------------------------------------------------------

    def _collect(self, side: str) -> None:
        data = self.conn[side].data_to_send()
        if data:
            self.pending[OTHER[side]].append((data, self._tainted_output(side)))

    def _on_error(self, side: str, exc: HybridKEXError) -> None:
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
                self._collect(side)  # output produced so far is tagged before more input is consumed
                event = conn.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
                if isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
                    self.request[side] = event
                    break
                assert isinstance(event, HandshakeComplete), f"undefined event {event!r}"
                assert conn.state is State.COMPLETE
                first = self.first_tamper[side]
                assert not self.wrong_keys[side], f"{side} completed with wrong QKD keys"
                assert first is None or first >= self._consumed(side), f"{side} completed a tampered handshake"
                self.sessions[side] = event.session
                break
        except HybridKEXError as exc:
            self._on_error(side, exc)
        self._collect(side)

    def _receive(self, side: str, data: bytes, tamper_at: int | None = None) -> None:
        conn = self.conn[side]
        if self.failed[side]:
            with pytest.raises(LocalProtocolError):
                conn.receive_data(data)
            return
        if data and self.drop_next[side]:  # the stream continues after a gap
            self.drop_next[side] = False
            tamper_at = 0
        if tamper_at is not None:
            self._mark(side, self.received[side] + tamper_at)
        self.received[side] += len(data)
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
        """What the peer sent, in a chunk of any size (tainted if the peer had been misled)."""
        chunk, taint = self._take(side, n)
        if chunk:
            self._receive(side, chunk, taint)

    @rule()
    def honest_round(self) -> None:
        """Everything in flight delivered whole and every QKD request answered right, both ways."""
        for side in ("res", "ini"):
            if self.request[side] is not None:
                self.answer_qkd(side, "right")
            self.deliver(side, 1 << 20)

    @precondition(lambda self: any(self.pending[s] for s in SIDES))
    @rule(side=st.sampled_from(SIDES), pos=st.integers(0, 1 << 16), xor=st.integers(1, 255))
    def deliver_flipped(self, side: str, pos: int, xor: int) -> None:
        """Everything in flight with one byte changed."""
        data, taint = self._take(side, 1 << 30)
        if not data:
            return
        at = pos % len(data)
        flipped = bytearray(data)
        flipped[at] ^= xor
        self._receive(side, bytes(flipped), at if taint is None else min(at, taint))

    @rule(side=st.sampled_from(SIDES), data=st.binary(min_size=1, max_size=64))
    def inject(self, side: str, data: bytes) -> None:
        self._receive(side, data, 0)

    @rule(side=st.sampled_from(SIDES), index=st.integers(0, len(REPLAY) - 1))
    def replay(self, side: str, index: int) -> None:
        self._receive(side, REPLAY[index], 0)

    @precondition(lambda self: any(sum(len(d) for d, _ in self.pending[s]) >= 8 for s in SIDES))
    @rule(side=st.sampled_from(SIDES))
    def drop_frame(self, side: str) -> None:
        head, _ = self._take(side, 8)
        if len(head) < 8:
            return
        self._take(side, int.from_bytes(head[4:8], "big"))
        self.drop_next[side] = True

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
            flip = 0x5A if side == "ini" else 0xA5  # two wrong answers must not agree with each other
            keys = [QKDKey(k.key_id, bytes(b ^ flip for b in k.key)) for k in keys]
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
            self.wrong_keys[side] = True
        try:
            if how == "unavailable":
                conn.qkd_unavailable("the KME is down (test)")
            else:
                conn.provide_qkd_keys(keys)
            self._collect(side)
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


#: Runs of the machine in the default test run (raise it for a longer search).
EXAMPLES = int(os.environ.get("HYBRIDKEX_STATEFUL_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


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


def test_the_state_machine_runs_and_explores_both_outcomes() -> None:
    """The state-machine search itself (bounded by EXAMPLES), then what it covered: some runs
    completed on both sides, many failed with typed errors, and misuse was tried (the numbers go to
    docs/security.md)."""
    before = dict(STATS)
    run_state_machine_as_test(Handshake, settings=SETTINGS)
    seen = {k: STATS[k] - before[k] for k in STATS}
    print("stateful:", seen)
    assert seen["runs"] >= min(EXAMPLES, 100), seen
    assert seen["completed_both"] > 0 and seen["failed_typed"] > 0 and seen["misuse"] > 0, seen
