"""The handshake state machines, as data.

Rules (after h11's ``_state.py``): everything that decides which input may come next lives in the
two tables below, and the connection code only *asks* them.  A transition not in a table is a
protocol violation: :class:`~hybridkex.exceptions.RemoteProtocolError` when the input came from the
peer, :class:`~hybridkex.exceptions.LocalProtocolError` when it came from our caller.  Every
non-terminal state also accepts ``RECV_ABORT`` and ``ERROR``, both leading to ``FAILED``; they are
added by :func:`_with_failure` rather than written out on every row.

Where a row lists several next states, the connection picks one from what the message says (e.g.
whether the authentication mode sends certificates, or who is the QKD master); the table still
checks that the choice is one of the allowed ones.  ``docs/state-diagram.md`` is generated from
these tables by :func:`render`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from ._wire import FrameType

__all__ = ["INITIATOR", "RESPONDER", "Input", "State", "expected_frames", "mermaid", "render"]


class State(Enum):
    """Where a handshake is."""

    #: Initiator, before its Hello is built.
    START = "START"
    #: Responder, waiting for the Hello.
    WAIT_HELLO = "WAIT_HELLO"
    #: We are the ETSI 014 master: waiting for the driver to deliver fresh QKD keys.
    WAIT_MASTER_KEYS = "WAIT_MASTER_KEYS"
    #: We are the ETSI 014 slave: waiting for the driver to fetch the keys by ID.
    WAIT_SLAVE_KEYS = "WAIT_SLAVE_KEYS"
    #: Initiator, Hello sent, waiting for the Response.
    WAIT_RESPONSE = "WAIT_RESPONSE"
    #: Waiting for the peer's Certificate (certificate-based authentication modes only).
    WAIT_CERTIFICATE = "WAIT_CERTIFICATE"
    #: Waiting for the peer's Finished.
    WAIT_FINISHED = "WAIT_FINISHED"
    #: Done: the session is available.
    COMPLETE = "COMPLETE"
    #: Failed: nothing more happens on this connection.
    FAILED = "FAILED"


class Input(Enum):
    """What moves a state machine."""

    BEGIN = "begin"
    RECV_HELLO = "recv Hello"
    RECV_RESPONSE = "recv Response"
    RECV_CERTIFICATE = "recv Certificate"
    RECV_FINISHED = "recv Finished"
    RECV_ABORT = "recv Abort"
    QKD_KEYS = "QKD keys provided"
    QKD_UNAVAILABLE = "QKD unavailable"
    ERROR = "error"


#: Which input a received frame is.
FRAME_INPUT: Mapping[FrameType, Input] = MappingProxyType({
    FrameType.HELLO: Input.RECV_HELLO,
    FrameType.RESPONSE: Input.RECV_RESPONSE,
    FrameType.CERTIFICATE: Input.RECV_CERTIFICATE,
    FrameType.FINISHED: Input.RECV_FINISHED,
    FrameType.ABORT: Input.RECV_ABORT,
})

S = State
I = Input  # noqa: E741 - short alias keeps the tables readable

Table = Mapping[State, Mapping[Input, frozenset[State]]]


def _with_failure(rows: dict[State, dict[Input, frozenset[State]]]) -> Table:
    out: dict[State, Mapping[Input, frozenset[State]]] = {}
    for state, row in rows.items():
        full = dict(row)
        full[I.RECV_ABORT] = frozenset({S.FAILED})
        full[I.ERROR] = frozenset({S.FAILED})
        out[state] = MappingProxyType(full)
    out[S.COMPLETE] = MappingProxyType({})
    out[S.FAILED] = MappingProxyType({})
    return MappingProxyType(out)


def _f(*states: State) -> frozenset[State]:
    return frozenset(states)


#: The initiator: Hello → (Response, [Certificate], Finished) → [Certificate], Finished.
INITIATOR: Table = _with_failure({
    # The initiator is ETSI master: it needs keys before it can say which IDs it uses.
    S.START: {I.BEGIN: _f(S.WAIT_MASTER_KEYS, S.WAIT_RESPONSE)},
    S.WAIT_MASTER_KEYS: {I.QKD_KEYS: _f(S.WAIT_RESPONSE), I.QKD_UNAVAILABLE: _f(S.WAIT_RESPONSE)},
    S.WAIT_RESPONSE: {I.RECV_RESPONSE: _f(S.WAIT_CERTIFICATE, S.WAIT_FINISHED)},
    S.WAIT_CERTIFICATE: {I.RECV_CERTIFICATE: _f(S.WAIT_FINISHED)},
    # The responder is authenticated first; only then does a slave initiator spend KME requests.
    S.WAIT_FINISHED: {I.RECV_FINISHED: _f(S.WAIT_SLAVE_KEYS, S.COMPLETE)},
    S.WAIT_SLAVE_KEYS: {I.QKD_KEYS: _f(S.COMPLETE)},
})

#: The responder: Hello → keys → Response, [Certificate], Finished → [Certificate], Finished.
RESPONDER: Table = _with_failure({
    S.WAIT_HELLO: {I.RECV_HELLO: _f(S.WAIT_MASTER_KEYS, S.WAIT_SLAVE_KEYS, S.WAIT_CERTIFICATE, S.WAIT_FINISHED)},
    S.WAIT_MASTER_KEYS: {
        I.QKD_KEYS: _f(S.WAIT_CERTIFICATE, S.WAIT_FINISHED),
        # Only when the policy allows running the no-QKD sibling suite; otherwise ERROR.
        I.QKD_UNAVAILABLE: _f(S.WAIT_CERTIFICATE, S.WAIT_FINISHED),
    },
    S.WAIT_SLAVE_KEYS: {I.QKD_KEYS: _f(S.WAIT_CERTIFICATE, S.WAIT_FINISHED)},
    S.WAIT_CERTIFICATE: {I.RECV_CERTIFICATE: _f(S.WAIT_FINISHED)},
    S.WAIT_FINISHED: {I.RECV_FINISHED: _f(S.COMPLETE)},
})

TABLES: Mapping[str, Table] = MappingProxyType({"initiator": INITIATOR, "responder": RESPONDER})


def allowed(table: Table, state: State, inp: Input) -> frozenset[State]:
    """The states ``inp`` may lead to from ``state`` (empty: not allowed)."""
    return table.get(state, {}).get(inp, frozenset())


def _expected(table: Table, state: State) -> frozenset[FrameType]:
    row = table.get(state, {})
    return frozenset(ft for ft, inp in FRAME_INPUT.items() if inp in row)


# Per table and state, made once: this is asked for every frame header.
_EXPECTED: dict[int, tuple[Table, dict[State, frozenset[FrameType]]]] = {
    id(t): (t, {st: _expected(t, st) for st in State}) for t in (INITIATOR, RESPONDER)
}


def expected_frames(table: Table, state: State) -> frozenset[FrameType]:
    """Frame types that may arrive in ``state`` (checked on the header, before the body is read)."""
    known = _EXPECTED.get(id(table))
    if known is not None and known[0] is table:
        return known[1][state]
    return _expected(table, state)


def mermaid(role: str) -> str:
    """A Mermaid ``stateDiagram-v2`` of one role's table (failure edges drawn once, as a note)."""
    table = TABLES[role]
    lines = ["stateDiagram-v2"]
    start = S.START if role == "initiator" else S.WAIT_HELLO
    lines.append(f"    [*] --> {start.value}")
    for state, row in table.items():
        for inp, targets in row.items():
            if inp in (I.RECV_ABORT, I.ERROR):
                continue
            for target in sorted(targets, key=lambda s: s.value):
                lines.append(f"    {state.value} --> {target.value}: {inp.value}")
    lines.append(f"    {S.COMPLETE.value} --> [*]")
    lines.append(f"    {S.FAILED.value} --> [*]")
    lines.append(f"    note right of {S.FAILED.value}: every other state goes here on recv Abort or error")
    return "\n".join(lines)


def render() -> str:
    """The text of ``docs/state-diagram.md`` (a test checks the file is up to date)."""
    out = ["# Handshake state diagrams", "",
           "Generated from the transition tables in `hybridkex/protocol/_state.py`; do not edit by hand.",
           "Regenerate with:", "",
           # Excerpt markers: tests/test_docs.py runs every unmarked block of docs/*.md.
           "<!-- excerpt: writes into a checkout; tests/protocol/test_state.py checks this file is its output -->",
           "```sh",
           "python -c 'from hybridkex.protocol._state import render; print(render(), end=\"\")' \\",
           "    > docs/state-diagram.md",
           "```", ""]
    for role in TABLES:
        out += [f"## {role.capitalize()}", "", "<!-- excerpt: generated from the transition tables -->",
                "```mermaid", mermaid(role), "```", ""]
    return "\n".join(out)
