"""The label tree. Every key hybridkex derives has its own label, rooted in the protocol name and
the suite name, so no two purposes (or suites) ever share an output.

``derive(secret, suite, PURPOSE, context)`` uses HKDF-Expand with
``info = lp(PROTOCOL) || lp(suite name) || lp(PURPOSE) || lp(context)``.
"""

from __future__ import annotations

__all__ = [
    "AUTH_LABELS",
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
#: The public 16-byte ID of the next authentication key (both sides derive the same; docs/recycle.md).
NEXT_AUTH_KEY_ID = b"next authentication key id"
EXPORTER = b"exporter"
CONFIRM_INITIATOR = b"key confirmation initiator"
CONFIRM_RESPONDER = b"key confirmation responder"
RECONNECT_PSK = b"reconnect psk"
RECONNECT_IDENTITY = b"reconnect psk identity"
#: Names a parent session in its reconnect PSK identities, so a server finds it without a search.
RECONNECT_HANDLE = b"reconnect session handle"
#: Steady state (docs/spec.md, "Steady state"): the parent's handle, its authentication key, and
#: the tag that authenticates a steady-state identity before the server spends anything for it.
STEADY_HANDLE = b"steady state handle"
STEADY_AUTH_KEY = b"steady state authentication key"
STEADY_IDENTITY_TAG = b"steady state identity tag"
#: ETSI CatKDF ``context`` of a steady-state TLS PSK (hashed with MA, MB into the HKDF info).
STEADY_PSK_CONTEXT = b"hybridkex/v1 steady state psk"

# --- TLS PSK identities (docs/spec.md 4.3). They travel in clear in the ClientHello and are sent as
# printable ASCII text: stacks that treat identities as C strings or UTF-8 (OpenSSL's legacy PSK
# callbacks, Python's ssl, the openssl tool) cannot carry raw derived bytes.  The two prefixes differ
# before either ends, so a server tells a full handshake's identity from a reconnect's by its first
# bytes, and "hk1" names this identity format's version.

#: Identity of a full handshake: this prefix, then base64url (no padding) of 16 derived bytes.
TLS_IDENTITY_PREFIX = b"hk1-psk."
#: Identity of a reconnect: this prefix, then base64url of handle (16) || u32(counter) || tag (16).
RECONNECT_IDENTITY_PREFIX = b"hk1-rc."

#: Identity of a steady-state connection: this prefix, then base64url of handle (16) || u32(counter)
#: || flags || the key IDs it uses || the key IDs it announces || tag (16).
STEADY_IDENTITY_PREFIX = b"hk1-ss."


def steady_label(suite_name: bytes) -> bytes:
    """ETSI CatKDF ``label`` (the HKDF salt) of a steady-state TLS PSK."""
    return PROTOCOL + b" CatKDF steady " + suite_name


#: Every purpose label, for tests that check they are distinct.
PURPOSES: tuple[bytes, ...] = (
    TLS_PSK,
    TLS_PSK_IDENTITY,
    NEXT_AUTH_KEY,
    NEXT_AUTH_KEY_ID,
    EXPORTER,
    CONFIRM_INITIATOR,
    CONFIRM_RESPONDER,
    RECONNECT_PSK,
    RECONNECT_IDENTITY,
    RECONNECT_HANDLE,
    STEADY_HANDLE,
    STEADY_AUTH_KEY,
    STEADY_IDENTITY_TAG,
)

# --- Handshake authentication (docs/spec.md, "Handshake"). These keys come from a bootstrap
# pre-shared key, not from the combined secret, so they are outside PURPOSES.

#: HKDF salt for the MAC keys derived from a bootstrap authentication PSK.
PSK_AUTH_SALT = b"hybridkex/v1 psk authentication"
#: Purposes of the two role-separated MAC keys derived from one bootstrap PSK.
PSK_AUTH_INITIATOR = b"psk auth initiator"
PSK_AUTH_RESPONDER = b"psk auth responder"
#: HKDF salt and role-separated purposes of the MAC keys derived from a recycled key (mode 5): the
#: same construction as PSK mode under its own labels, with the key's public ID as context.
RECYCLED_AUTH_SALT = b"hybridkex/v1 recycled authentication"
RECYCLED_AUTH_INITIATOR = b"recycled auth initiator"
RECYCLED_AUTH_RESPONDER = b"recycled auth responder"
#: Prefixes of the data signed in a Finished message (like TLS 1.3 CertificateVerify contexts).
SIGNATURE_INITIATOR = b"hybridkex/v1 initiator finished signature"
SIGNATURE_RESPONDER = b"hybridkex/v1 responder finished signature"

#: Every handshake-authentication label, for tests that check they are distinct.
AUTH_LABELS: tuple[bytes, ...] = (
    PSK_AUTH_SALT,
    PSK_AUTH_INITIATOR,
    PSK_AUTH_RESPONDER,
    RECYCLED_AUTH_SALT,
    RECYCLED_AUTH_INITIATOR,
    RECYCLED_AUTH_RESPONDER,
    SIGNATURE_INITIATOR,
    SIGNATURE_RESPONDER,
)
