"""The hybridkex-v1 combiner: ML-KEM + X25519 + QKD key → one combined secret → labelled keys.

The recipe is ETSI TS 103 744 V1.2.1 CatKDF with HKDF (section 8.2), instantiated as
``docs/spec.md`` ("Combiner") specifies:

* ``label`` (HKDF salt) = ``"hybridkex/v1 CatKDF " || suite name``;
* ``context`` = ``"hybridkex/v1 combined secret"``;
* ``MA`` / ``MB`` = :func:`encode_party` of the initiator's / responder's public values: suite,
  role, identity, nonce, X25519 public key, ML-KEM encapsulation key (initiator) or ciphertext
  (responder), and the QKD binding (key IDs, master and slave SAE IDs, both KME IDs);
* secrets: ``psk = k_qkd``, ``k1 = ss_X25519``, ``k2 = ss_ML-KEM`` (suite ordering "etsi"), or
  ``ss_ML-KEM || ss_X25519 || k_qkd`` (ordering "sp800-56c");
* output: HashLen bytes, the *combined secret*.  It is never used directly: every consumer takes
  its own output through :meth:`CombinedSecret.derive` under its own label.

The combined secret is pseudorandom as long as any one of the three component secrets is, and
binding every public value plus the QKD key IDs defeats key-substitution attacks.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from .exceptions import AlreadyFinalized, ConfigurationError, InvalidKeyMaterial
from .hazmat import labels
from .hazmat.encoding import b64url, lp_join, u16
from .hazmat.kdf import cat_kdf, hkdf_expand
from .suites import Suite, get_suite

__all__ = [
    "CombinedSecret",
    "PartyView",
    "QKDBinding",
    "combine",
    "combine_raw",
    "encode_party",
]

Role = Literal["initiator", "responder"]

#: Identities are 1..255 bytes, as the handshake's configuration and wire format allow (docs/spec.md
#: 4.2, 6.2): one limit everywhere, so MA/MB can always be sent.
_MAX_ID = 255
#: Derived bytes behind a full handshake's TLS PSK identity (before its text encoding).
TLS_IDENTITY_BYTES = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class QKDBinding:
    """Who the QKD keys of an exchange belong to: bound into MA and MB so no ID can be swapped.

    Keyword-only: four strings in a row are too easy to pass in the wrong order."""

    key_ids: tuple[str, ...]
    master_sae_id: str
    slave_sae_id: str
    master_kme_id: str
    slave_kme_id: str

    def encode(self) -> bytes:
        return lp_join(
            lp_join(*(k.encode("ascii") for k in self.key_ids)),
            self.master_sae_id.encode("utf-8"),
            self.slave_sae_id.encode("utf-8"),
            self.master_kme_id.encode("utf-8"),
            self.slave_kme_id.encode("utf-8"),
        )


@dataclass(frozen=True, slots=True)
class PartyView:
    """The public values one party contributes to an exchange."""

    role: Role
    identity: bytes
    nonce: bytes
    x25519_public: bytes
    #: The initiator's ML-KEM encapsulation key, or the responder's ML-KEM ciphertext.
    kem_message: bytes


def encode_party(suite: Suite | str, party: PartyView, qkd: QKDBinding | None) -> bytes:
    """``MA`` (initiator) or ``MB`` (responder): an injective encoding of the party's public values.

    ``u16(suite code) || lp(role tag) || lp(suite name) || lp(identity) || lp(nonce) ||
    lp(X25519 public) || lp(KEM message) || lp(QKD binding or empty)``.
    """
    s = get_suite(suite)
    if party.role not in ("initiator", "responder"):
        raise ConfigurationError(f"role must be 'initiator' or 'responder', not {party.role!r}")
    if not 1 <= len(party.identity) <= _MAX_ID:
        raise ConfigurationError(f"identity must be 1..{_MAX_ID} bytes, got {len(party.identity)}")
    return u16(s.code) + lp_join(
        labels.PROTOCOL + b" " + party.role.encode("ascii"),
        s.label,
        party.identity,
        party.nonce,
        party.x25519_public,
        party.kem_message,
        qkd.encode() if qkd is not None else b"",
    )


@lru_cache(maxsize=32)
def _derive_prefix(suite_label: bytes) -> bytes:
    """``lp(PROTOCOL) || lp(suite label)``, the public start of every derive() info, made once."""
    return lp_join(labels.PROTOCOL, suite_label)


def _require_len(value: bytes, expected: int, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) != expected:
        raise InvalidKeyMaterial(f"{what} must be {expected} bytes, got {len(value)}")
    return bytes(value)


class CombinedSecret:
    """The combined secret of one exchange. Opaque: its bytes never appear in ``repr``.

    Derive what you need with :meth:`derive` (or the named helpers); call :meth:`erase` when done.
    Python cannot guarantee that no copy of a secret survives in memory; ``erase`` drops this
    object's reference and overwrites the buffer it owns.
    """

    __slots__ = ("_secret", "suite")

    def __init__(self, suite: Suite, secret: bytes) -> None:
        self.suite = suite
        self._secret: bytearray | None = bytearray(secret)

    def __repr__(self) -> str:
        state = "erased" if self._secret is None else "<redacted>"
        return f"CombinedSecret(suite={self.suite.name!r}, secret={state})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("CombinedSecret cannot be pickled")

    def derive(self, purpose: bytes, length: int, context: bytes = b"") -> bytes:
        """HKDF-Expand(secret, lp(PROTOCOL) || lp(suite) || lp(purpose) || lp(context), length)."""
        if self._secret is None:
            raise AlreadyFinalized("this combined secret was erased")
        info = _derive_prefix(self.suite.label) + lp_join(purpose, context)
        return hkdf_expand(self.suite.hash, bytes(self._secret), info, length)

    def tls_psk(self) -> bytes:
        """The TLS 1.3 external PSK (HashLen bytes of the suite's hash)."""
        return self.derive(labels.TLS_PSK, self.suite.hash_len)

    def tls_identity(self) -> bytes:
        """The TLS PSK identity, derived so both ends agree without sending it first.

        Printable ASCII (30 bytes): ``"hk1-psk." || base64url(derive("tls13 external psk identity",
        16))`` without padding (docs/spec.md 4.3); public, it travels in clear in the ClientHello.
        """
        return labels.TLS_IDENTITY_PREFIX + b64url(self.derive(labels.TLS_PSK_IDENTITY, TLS_IDENTITY_BYTES))

    def next_auth_key(self) -> bytes:
        """The authentication key for the next handshake of this peer pair (recycled mode)."""
        return self.derive(labels.NEXT_AUTH_KEY, 32)

    def exporter(self, label: bytes, length: int, context: bytes = b"") -> bytes:
        """Application keys: ``label`` names the use, as in the TLS exporter."""
        return self.derive(labels.EXPORTER, length, lp_join(label, context))

    def erase(self) -> None:
        if self._secret is not None:
            for i in range(len(self._secret)):
                self._secret[i] = 0
            self._secret = None

    def equals(self, other: CombinedSecret) -> bool:
        """Constant-time comparison (tests and key confirmation)."""
        if self._secret is None or other._secret is None:
            raise AlreadyFinalized("cannot compare an erased secret")
        return hmac.compare_digest(bytes(self._secret), bytes(other._secret))


def combine_raw(
    suite: Suite | str,
    *,
    qkd_key: bytes,
    x25519_secret: bytes,
    pq_secret: bytes,
    ma: bytes,
    mb: bytes,
) -> bytes:
    """The hybridkex-v1 CatKDF output as bytes (for vectors and independent implementations)."""
    s = get_suite(suite)
    x = _require_len(x25519_secret, 32, "X25519 shared secret")
    pq = _require_len(pq_secret, s.pq_secret_bytes, f"{s.pq_kem} shared secret")
    if x == bytes(32):
        raise InvalidKeyMaterial("X25519 shared secret is all zero (RFC 7748 section 6.1)")
    if s.qkd:
        q = _require_len(qkd_key, s.qkd_key_bits // 8, "QKD key")
    elif qkd_key:
        raise InvalidKeyMaterial(f"suite {s.name} has no QKD component; pass qkd_key=b''")
    else:
        q = b""
    secrets: Sequence[bytes]
    if s.ordering == "etsi":
        psk, secrets = q, (x, pq)
    else:
        psk, secrets = b"", (pq, x, q) if q else (pq, x)
    return cat_kdf(
        secrets,
        psk=psk,
        ma=ma,
        mb=mb,
        context=labels.COMBINER_CONTEXT,
        label=labels.combiner_label(s.label),
        length=s.hash_len,
        kdf=s.kdf,
    )


def combine(
    suite: Suite | str,
    *,
    qkd_key: bytes,
    x25519_secret: bytes,
    pq_secret: bytes,
    ma: bytes,
    mb: bytes,
) -> CombinedSecret:
    """Combine the three component secrets of one exchange into a :class:`CombinedSecret`.

    Args:
        suite: the suite name or object; fixes algorithms, hash and input order.
        qkd_key: the QKD key (``suite.qkd_key_bits`` long), or ``b""`` for a suite without QKD.
        x25519_secret: the 32-byte X25519 shared secret (all-zero is rejected).
        pq_secret: the post-quantum KEM's shared secret (``suite.pq_secret_bytes``: 32 for ML-KEM).
        ma: the initiator's public message, :func:`encode_party` of its :class:`PartyView`.
        mb: the responder's public message.

    Raises:
        InvalidKeyMaterial: a secret has the wrong length or is degenerate.
        ConfigurationError: unknown suite.
    """
    s = get_suite(suite)
    return CombinedSecret(s, combine_raw(s, qkd_key=qkd_key, x25519_secret=x25519_secret, pq_secret=pq_secret,
                                         ma=ma, mb=mb))

