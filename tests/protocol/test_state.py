"""The transition tables are the truth: complete, exercised, and drawn in the docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridkex.exceptions import KeyUnavailableError, KMEError, LocalProtocolError
from hybridkex.protocol import Initiator, State
from hybridkex.protocol import _base as conn
from hybridkex.protocol._state import INITIATOR, RESPONDER, TABLES, Input, allowed, expected_frames, render
from hybridkex.protocol._wire import FrameType

from .helpers import QKDPair, configs, run_pair

DOCS = Path(__file__).resolve().parents[2] / "docs" / "state-diagram.md"
TERMINAL = {State.COMPLETE, State.FAILED}


@pytest.mark.parametrize("role", ["initiator", "responder"])
def test_table_shape(role):
    table = TABLES[role]
    start = State.START if role == "initiator" else State.WAIT_HELLO
    reachable, frontier = {start}, [start]
    while frontier:
        for targets in table[frontier.pop()].values():
            for t in targets - reachable:
                reachable.add(t)
                frontier.append(t)
    assert State.COMPLETE in reachable and State.FAILED in reachable
    for state, row in table.items():
        if state in TERMINAL:
            assert not row, f"{state} is terminal"
            assert expected_frames(table, state) == frozenset()
        else:
            assert row[Input.RECV_ABORT] == {State.FAILED} and row[Input.ERROR] == {State.FAILED}
            assert FrameType.ABORT in expected_frames(table, state)


def test_expected_frames():
    assert expected_frames(RESPONDER, State.WAIT_HELLO) == {FrameType.HELLO, FrameType.ABORT}
    assert expected_frames(INITIATOR, State.WAIT_RESPONSE) == {FrameType.RESPONSE, FrameType.ABORT}
    assert expected_frames(INITIATOR, State.WAIT_SLAVE_KEYS) == {FrameType.ABORT}


def test_a_transition_outside_the_table_is_refused():
    ini = Initiator(configs()[0])
    assert not allowed(INITIATOR, State.WAIT_RESPONSE, Input.RECV_FINISHED)
    with pytest.raises(LocalProtocolError, match="internal error"):
        ini._move(Input.RECV_FINISHED, State.COMPLETE)


def test_every_transition_is_exercised(monkeypatch):
    """Run a set of scenarios and record every transition taken: together they cover the tables."""
    seen: set[tuple[str, State, Input, State]] = set()
    original = conn.Connection._move

    def spy(self, inp, target):
        seen.add((self._role, self._state, inp, target))
        original(self, inp, target)

    monkeypatch.setattr(conn.Connection, "_move", spy)

    def unavailable(request):
        raise KeyUnavailableError("empty")

    q = QKDPair.create()
    for auth in ("psk", "pki-ed25519"):
        assert run_pair(*configs(auth=auth), q).ok
        assert run_pair(*configs(auth=auth, master="initiator"), q).ok
        assert run_pair(*configs(auth=auth, qkd="optional"), q, res_keys=unavailable).ok
        assert run_pair(*configs(auth=auth, qkd="disabled"), None).ok
    assert run_pair(*configs(master="initiator", qkd="optional"), q, ini_keys=unavailable).ok
    failed = run_pair(*configs(), q, res_keys=lambda r: (_ for _ in ()).throw(KMEError("x", status=503)))
    assert failed.res_error is not None

    expected = {(role, s, i, t) for role, table in TABLES.items() for s, row in table.items()
                for i, targets in row.items() for t in targets if i not in (Input.RECV_ABORT, Input.ERROR)}
    missing = expected - seen
    assert not missing, sorted((r, s.value, i.value, t.value) for r, s, i, t in missing)
    assert ("initiator", State.WAIT_RESPONSE, Input.RECV_ABORT, State.FAILED) in seen


def test_docs_diagram_is_generated_from_the_tables():
    assert DOCS.read_text(encoding="utf-8") == render(), (
        "docs/state-diagram.md is stale; regenerate it as its header says")
