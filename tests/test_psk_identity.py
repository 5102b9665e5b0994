"""The TLS PSK identities hybridkex derives are printable ASCII text (docs/spec.md 4.3), and the
server's reconnect lookup parses them strictly: anything malformed is "unknown", never an exception.

Under 0.1.0 the identities were raw derived bytes: 6.1 % of full-handshake identities contained 0x00
and every reconnect identity did (its big-endian counter), which C-string and UTF-8 based TLS stacks
(Python's ssl, the openssl tool, OpenSSL's legacy PSK callbacks) cannot carry.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkex import CombinedSecret, RemoteProtocolError, get_suite
from hybridkex.api import ReconnectPolicy, ReconnectRegistry
from hybridkex.hazmat.encoding import b64url, b64url_decode
from hybridkex.io.reconnect import IDENTITY_LEN, reconnect_identity, reconnect_psk

SUITES = [get_suite("x25519-mlkem768-qkd-hkdfsha256"), get_suite("x25519-mlkem1024-qkd-hkdfsha384")]
CIPHER = "TLS_AES_128_GCM_SHA256"
PRINTABLE = frozenset(range(0x21, 0x7F))  # printable ASCII without space
#: Under 0.1.0 the identity derived from this seed was a10b6b0e52576fd680003205d1c847ec (0x00 inside).
NUL_SEED = b"hybridkex issue 12 seed 45"


def _spec_derive(suite: Any, secret: bytes, purpose: bytes, length: int, context: bytes = b"") -> bytes:
    """docs/spec.md 4.3, written out with cryptography's HKDF-Expand (not hybridkex's)."""
    def lp(x: bytes) -> bytes:
        return struct.pack(">I", len(x)) + x

    algorithm = hashes.SHA256() if suite.hash == "sha256" else hashes.SHA384()
    info = lp(b"hybridkex/v1") + lp(suite.name.encode()) + lp(purpose) + lp(context)
    return HKDFExpand(algorithm, length, info).derive(secret)


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def test_two_thousand_derived_identities_are_printable_ascii() -> None:
    """1,000 full-handshake and 1,000 reconnect identities from independent combined secrets."""
    seen: set[bytes] = set()
    for n in range(1000):
        suite = SUITES[n % 2]
        secret = CombinedSecret(suite, os.urandom(suite.hash_len))
        index = (1, 2, 255, 256, 2**32 - 1)[n % 5]
        for identity in (secret.tls_identity(), reconnect_identity(secret, index)):
            assert isinstance(identity, bytes) and set(identity) <= PRINTABLE, identity
            identity.decode("ascii")  # and hence UTF-8, as Python's ssl needs
            seen.add(identity)
    assert len(seen) == 2000


def test_identity_of_a_seed_whose_raw_identity_contained_nul() -> None:
    suite = SUITES[0]
    raw_secret = hashlib.sha256(NUL_SEED).digest()
    secret = CombinedSecret(suite, raw_secret)
    derived = _spec_derive(suite, raw_secret, b"tls13 external psk identity", 16)
    assert 0 in derived  # the 16 derived bytes still contain 0x00 ...
    identity = secret.tls_identity()
    assert identity == b"hk1-psk." + _b64url(derived)  # ... but the identity is their text form
    assert 0 not in identity and len(identity) == 30


def test_reconnect_identity_is_the_spec_text_form() -> None:
    suite = SUITES[1]
    raw_secret = os.urandom(48)
    secret = CombinedSecret(suite, raw_secret)
    handle = _spec_derive(suite, raw_secret, b"reconnect session handle", 16)
    tag = _spec_derive(suite, raw_secret, b"reconnect psk identity", 16, struct.pack(">I", 7))
    identity = reconnect_identity(secret, 7)
    assert identity == b"hk1-rc." + _b64url(handle + struct.pack(">I", 7) + tag)
    assert len(identity) == IDENTITY_LEN == 55
    assert reconnect_psk(secret, 7) == _spec_derive(suite, raw_secret, b"reconnect psk", 48, struct.pack(">I", 7))
    # The two kinds cannot be confused: neither prefix is a prefix of the other.
    assert not identity.startswith(b"hk1-psk.") and not secret.tls_identity().startswith(b"hk1-rc.")


class _Info:
    peer_identity = "client.example"


def _registry_with(secret: CombinedSecret) -> ReconnectRegistry:
    registry = ReconnectRegistry(ReconnectPolicy(enabled=True, max_uses=8))
    registry.register(secret, _Info())  # type: ignore[arg-type]
    return registry


def _malformed(good: bytes, secret: CombinedSecret) -> dict[str, bytes]:
    body = good[len(b"hk1-rc."):]
    raw = base64.urlsafe_b64decode(body)
    forged_tag = raw[:-1] + bytes([raw[-1] ^ 1])
    return {
        "empty": b"",
        "prefix only": b"hk1-rc.",
        "raw 0.1.0 form": raw,  # handle || u32 || tag as bytes, what 0.1.0 sent
        "full-handshake identity": secret.tls_identity(),
        "other version": b"hk2-rc." + body,
        "upper-case prefix": b"HK1-RC." + body,
        "padding": good + b"=",
        "standard base64 alphabet": b"hk1-rc." + base64.b64encode(raw),
        "a character outside the alphabet": good[:-1] + b"!",
        "non-ASCII byte": good[:-1] + b"\xff",
        "NUL": good[:-1] + b"\x00",
        "truncated": good[:-1],
        "one character more": good + b"A",
        "whitespace": good[:20] + b" " + good[21:],
        "newline at the end": good + b"\n",
        "forged tag": b"hk1-rc." + _b64url(forged_tag),
        "counter 0": b"hk1-rc." + _b64url(raw[:16] + bytes(4) + raw[20:]),
        "huge": b"hk1-rc." + b"A" * 100_000,
    }


def test_reconnect_lookup_refuses_every_malformed_identity_as_unknown() -> None:
    while True:  # an identity whose standard-base64 form differs from its base64url form
        secret = CombinedSecret(SUITES[0], os.urandom(32))
        good = reconnect_identity(secret, 1)
        if b"-" in good[7:] or b"_" in good[7:]:
            break
    registry = _registry_with(secret)
    cases = _malformed(good, secret)
    for name, identity in cases.items():
        assert registry.lookup(identity, CIPHER) is None, name
    assert registry.stats.unknown == len(cases) and registry.stats.accepted == 0
    match = registry.lookup(good, CIPHER)  # nothing above spent the counter
    assert match is not None and match.index == 1 and match.psk == reconnect_psk(secret, 1)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=120), st.binary(max_size=60).map(lambda b: b"hk1-rc." + b),
                 st.text(alphabet="ABCabc019-_=+/.", max_size=60).map(lambda t: b"hk1-rc." + t.encode())))
def test_reconnect_lookup_never_raises(identity: bytes) -> None:
    registry = _registry_with(CombinedSecret(SUITES[0], bytes(32)))
    assert registry.lookup(identity, CIPHER) is None


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.hash)
def test_lookup_of_good_identities_still_works_for_both_hashes(suite: Any) -> None:
    secret = CombinedSecret(suite, os.urandom(suite.hash_len))
    ids = [reconnect_identity(secret, i) for i in range(1, 9)]
    registry = _registry_with(secret)
    for i, identity in reversed(list(enumerate(ids, start=1))):
        match = registry.lookup(identity, suite.tls_cipher)
        assert match is not None and match.index == i


def test_b64url_decode_accepts_only_the_canonical_form() -> None:
    data = bytes(range(16))
    text = b64url(data)
    assert text == base64.urlsafe_b64encode(data).rstrip(b"=") and b64url_decode(text, 16) == data
    # 16 bytes leave 4 unused bits in the last character: "...Dw" and "...Dx" decode to the same bytes.
    sibling = bytes([text[-1] + 1])
    assert text.endswith(b"Dw") and base64.urlsafe_b64decode(text[:-1] + sibling + b"==") == data
    for bad in (text[:-1] + sibling, text + b"==", text[:-1], text + b"A", text.replace(b"A", b"+"), b""):
        with pytest.raises(RemoteProtocolError):
            b64url_decode(bad, 16)
