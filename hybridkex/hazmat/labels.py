"""The label tree. Every key hybridkex derives has its own label, rooted in the protocol name and
the suite name, so no two purposes (or suites) ever share an output.

``derive(secret, suite, PURPOSE, context)`` uses HKDF-Expand with
``info = lp(PROTOCOL) || lp(suite name) || lp(PURPOSE) || lp(context)``.
"""

from __future__ import annotations

__all__ = [
    "COMBINER_CONTEXT",
    "PROTOCOL",
    "PURPOSES",
    "combiner_label",
]

#: Protocol name and version: the root of the tree.
PROTOCOL = b"hybridkex/v1"

#: ETSI CatKDF ``context`` (hashed with MA and MB into the HKDF info).
COMBINER_CONTEXT = b"hybridkex/v1 combined secret"


def combiner_label(suite_name: bytes) -> bytes:
    """ETSI CatKDF ``label`` (the HKDF salt): protocol, combiner and suite."""
    return PROTOCOL + b" CatKDF " + suite_name


# Purposes of keys derived from the combined secret (one label each).
TLS_PSK = b"tls13 external psk"
TLS_PSK_IDENTITY = b"tls13 external psk identity"
NEXT_AUTH_KEY = b"next authentication key"
EXPORTER = b"exporter"
CONFIRM_INITIATOR = b"key confirmation initiator"
CONFIRM_RESPONDER = b"key confirmation responder"
RECONNECT_PSK = b"reconnect psk"
RECONNECT_IDENTITY = b"reconnect psk identity"

#: Every purpose label, for tests that check they are distinct.
PURPOSES: tuple[bytes, ...] = (
    TLS_PSK,
    TLS_PSK_IDENTITY,
    NEXT_AUTH_KEY,
    EXPORTER,
    CONFIRM_INITIATOR,
    CONFIRM_RESPONDER,
    RECONNECT_PSK,
    RECONNECT_IDENTITY,
)
