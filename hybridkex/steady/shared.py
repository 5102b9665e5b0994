"""Steady-state parents and announced QKD keys in a shared state (:mod:`hybridkex.state`).

A parent registered by one server process is stored there as a ticket (kind ``"steady"``, named by
its public handle): the authentication key and the parent's public facts, together sealed under the
host's state key, so another process or host sharing the state accepts the parent's steady-state
connections.  Its counters and fresh key IDs are spent in the same state (``spend_claim``), so
whichever process a connection reaches, each is accepted once.

Announced QKD keys pre-fetched by one process are stored as tickets too (kind ``"qkd:<master SAE>"``,
named by the key ID, the key sealed): the KME delivers a key once, so the process a connection
reaches takes it from there (``take_ticket``: one DELETE ... RETURNING, exactly one taker).
"""

from __future__ import annotations

import json
from typing import Any, Final

from ..exceptions import HybridKEXError, StateError
from ..protocol import Component, SessionInfo
from ..suites import Suite, get_suite

__all__ = ["KIND", "decode_facts", "decode_parent", "encode_parent", "key_kind"]

#: Ticket kind of a steady-state parent.
KIND: Final = "steady"
_TUPLES: Final = ("offered_suites", "qkd_key_ids", "offered_auth_modes")


def key_kind(master_sae_id: str) -> str:
    """Ticket kind of the announced keys a master SAE shares with this server."""
    return f"qkd:{master_sae_id}"


def encode_parent(key: bytes, suite: Suite, info: SessionInfo) -> bytes:
    """The sealed part of a parent's ticket: its authentication key, then its facts (JSON)."""
    facts = json.dumps({"suite": suite.name, "info": info.as_dict()}, separators=(",", ":")).encode()
    return len(key).to_bytes(2, "big") + bytes(key) + facts


def decode_parent(blob: bytes) -> tuple[bytes, Suite, SessionInfo]:
    """The parent a ticket names: (authentication key, suite, facts).  StateError if malformed."""
    n = int.from_bytes(blob[:2], "big")
    key = blob[2:2 + n]
    if len(key) != n:
        raise StateError("a steady-state parent in the shared state is malformed (truncated)")
    suite, info = decode_facts(blob[2 + n:])
    return bytes(key), suite, info


def decode_facts(text: bytes) -> tuple[Suite, SessionInfo]:
    """A parent's suite and facts, as :func:`encode_parent` (and reconnect parents) store them."""
    try:
        facts = json.loads(text)
        if not isinstance(facts, dict):
            raise ValueError("not an object")
        d: dict[str, Any] = dict(facts["info"])
        d["components"] = tuple(Component(**c) for c in d["components"])
        for name in _TUPLES:
            d[name] = tuple(d.get(name, ()))
        return get_suite(str(facts["suite"])), SessionInfo(**d)
    except (ValueError, TypeError, KeyError) as exc:
        raise StateError(f"a steady-state parent in the shared state is malformed ({exc})") from None
    except HybridKEXError as exc:  # an unknown or retired suite name
        raise StateError(f"a steady-state parent in the shared state names what this server does not know "
                         f"({exc})") from None

