"""Authenticators: how each side proves who it is over the whole handshake transcript.

Every handshake is authenticated in both directions.  The responder's Finished proves its
identity over the transcript up to that point; the initiator's Finished over the transcript
including the responder's Finished.  The data proved is always ``TH || confirm``: the transcript
hash and the key-confirmation MAC (which is keyed from the combined secret), so a valid proof also
vouches for the confirmation value, and a confirmation mismatch behind a valid proof can only mean
that the two sides derived different keys (:class:`~hybridkex.exceptions.KeyMismatchError`).

Modes (the ``mode`` byte on the wire):

=====  ================  ========================================================================
id     name              proof
=====  ================  ========================================================================
1      ``psk``           HMAC with a role-separated key derived from a per-peer bootstrap key
2      ``pki-ed25519``   Ed25519 signature; X.509 chain to a configured trust anchor
3      ``pki-mldsa65``   ML-DSA-65 signature; X.509 chain (ML-DSA-signed) to a trust anchor
4      ``pki-hybrid``    both signatures, two chains each signed end to end with its own algorithm
5      ``recycled``      HMAC with a key recycled from an earlier handshake's ``next_auth_key``
                         (:class:`hybridkex.recycle.RecycledAuthenticator`; docs/recycle.md)
=====  ================  ========================================================================

Per-handshake negotiation hooks (defaults keep modes 1-4 as they are): an initiator asks each
authenticator for an :class:`AuthOffer` (:meth:`Authenticator.offer`), a responder lets the first
common mode :meth:`~Authenticator.accept` the Hello's key IDs, every configured authenticator may
veto a mode for a peer (:meth:`~Authenticator.permits`: a retired bootstrap), and drivers call
:meth:`~Authenticator.after_handshake` once a handshake succeeded (key rotation).

Failures raise :class:`~hybridkex.exceptions.AuthenticationError` whose message is always
"authentication failed"; the precise reason (unknown identity, wrong PSK, untrusted or expired
certificate, identity mismatch) is in ``.detail`` for local logs only.

Certificates: ``cryptography`` (>= 49) builds and verifies X.509 certificates signed with ML-DSA,
so ML-DSA-65 keys live in ordinary ML-DSA-signed certificates.  Its WebPKI verifier
(``cryptography.x509.verification``) refuses Ed25519 keys, so chains are checked here, by a small
path validation written for this protocol (see :func:`verify_chain`); for ML-DSA chains, which that
verifier does accept, the tests check that both reach the same verdicts.  In hybrid mode each
algorithm has its *own* chain, and a chain's every signature and its leaf key must use that one
algorithm: an Ed25519-signed certificate that carried an ML-DSA key would fall with Ed25519.
"""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, SignatureAlgorithmOID

from ..exceptions import AuthenticationError, ConfigurationError
from ..hazmat import labels
from ..hazmat.encoding import lp_join
from ..hazmat.kdf import hkdf, hmac_digest
from ..suites import Suite
from ._wire import CertificateChain, CertificateMsg, SignatureAlgorithm

if TYPE_CHECKING:
    from ._session import Session

__all__ = [
    "AuthContext",
    "AuthMode",
    "AuthOffer",
    "Authenticator",
    "MACAuthenticator",
    "PKIAuthenticator",
    "PSKAuthenticator",
    "SigningCredential",
    "verify_chain",
]

Role = Literal["initiator", "responder"]

#: Shortest bootstrap PSK accepted (bytes).
MIN_PSK_LEN = 32
#: Longest certificate chain accepted (leaf + intermediates, the anchor not counted).
MAX_CHAIN_LEN = 4


class AuthMode(IntEnum):
    """Authentication modes and their wire ids."""

    PSK = 1
    PKI_ED25519 = 2
    PKI_MLDSA65 = 3
    PKI_HYBRID = 4
    #: Keys recycled from earlier handshakes (:mod:`hybridkex.recycle`).
    RECYCLED = 5

    @property
    def label(self) -> str:
        """The mode's name as :class:`SessionInfo` reports it."""
        return _MODE_LABELS[self]


_MODE_LABELS = {
    AuthMode.PSK: "psk",
    AuthMode.PKI_ED25519: "pki-ed25519",
    AuthMode.PKI_MLDSA65: "pki-mldsa65",
    AuthMode.PKI_HYBRID: "pki-hybrid",
    AuthMode.RECYCLED: "recycled",
}


@dataclass(frozen=True, slots=True)
class AuthContext:
    """What a proof is about: who proves to whom, under which suite, at what time."""

    suite: Suite
    #: Role of the party that produces (or produced) the proof.
    prover_role: Role
    prover_identity: str
    verifier_identity: str
    #: Current time (from the connection's injected clock), for certificate validity.
    now: datetime


class Authenticator(ABC):
    """One authentication mode with this side's credentials.

    Implementations must be stateless across handshakes (a config holds them), raise only
    :class:`AuthenticationError` from :meth:`verify` and :meth:`check_peer`, and compare secrets
    in constant time.
    """

    @property
    @abstractmethod
    def mode(self) -> AuthMode:
        """The mode id sent on the wire."""

    @property
    def sends_certificate(self) -> bool:
        """Whether this mode sends a Certificate message before Finished."""
        return False

    def check_peer(self, peer_identity: str) -> None:
        """Early check on the peer's claimed identity, before any QKD key is spent.

        Raise AuthenticationError if this authenticator can never accept ``peer_identity``.
        """
        return None

    def certificate(self) -> CertificateMsg | None:
        """This side's Certificate message, or None for modes that send none."""
        return None

    @abstractmethod
    def prove(self, ctx: AuthContext, data: bytes) -> bytes:
        """The proof over ``data`` (= ``TH || confirm``) that goes into our Finished."""

    @abstractmethod
    def verify(self, ctx: AuthContext, data: bytes, proof: bytes, certificate: CertificateMsg | None) -> None:
        """Check the peer's proof over ``data``; raise AuthenticationError(detail) if it fails."""

    # --- per-handshake negotiation (defaults: a mode with one fixed credential) -------------------

    @property
    def key_id(self) -> bytes | None:
        """The public ID of the one key this authenticator is bound to (keyed modes), else None."""
        return None

    def offer(self, local_identity: str, peer_identity: str | None) -> AuthOffer | None:
        """Initiator, before its Hello: what this mode offers ``peer_identity`` in one handshake.

        None leaves the mode out of this Hello.  The default offers the mode as it is.  Called once
        per handshake, from the Initiator's constructor (before any QKD key is taken).
        """
        return AuthOffer(self)

    def accept(self, local_identity: str, peer_identity: str, key_ids: tuple[bytes, ...]) -> Authenticator | None:
        """Responder, on a Hello offering this mode: the authenticator to run it with, or None.

        ``key_ids`` are the key IDs the Hello lists for this mode (recycled mode only).  None means
        this side cannot serve the mode for this peer (e.g. it holds none of the keys); the next
        common mode is tried.  The default accepts with ``self``.
        """
        return self

    def permits(self, mode: AuthMode, local_identity: str, peer_identity: str | None) -> bool:
        """Whether this side lets ``mode`` authenticate a handshake with ``peer_identity``.

        Asked of every configured authenticator before a mode is offered (initiator) or accepted
        (responder); one refusal excludes the mode.  The recycling authenticator refuses a retired
        bootstrap here.  Default: no objection.
        """
        return True

    def after_handshake(self, session: Session) -> None:
        """Called by a driver after a handshake succeeded: by the initiator once its Finished was
        sent, by the responder once it verified the initiator's.  May do blocking I/O (the
        recycling authenticator records a key rotation); not called by the sans-IO core."""
        return None


class AuthOffer:
    """One authentication mode as an initiator offers it in one Hello.

    A plain mode offers its authenticator.  A keyed mode (recycled) passes ``keys``: the key IDs
    it lists, newest first, each mapped to the authenticator bound to that key; the responder
    must then name one of them.  ``repr`` shows the mode and key IDs only.
    """

    __slots__ = ("_authenticator", "_keys")

    def __init__(self, authenticator: Authenticator,
                 keys: Sequence[tuple[bytes, Authenticator]] | None = None) -> None:
        self._authenticator = authenticator
        self._keys = None if keys is None else dict(keys)
        if self._keys is not None and len(self._keys) != len(keys or ()):
            raise ValueError("an offer lists a key ID twice")

    def __repr__(self) -> str:
        ids = "" if self._keys is None else f", key_ids={[k.hex() for k in self._keys]}"
        return f"AuthOffer(mode={self.mode.label!r}{ids})"

    @property
    def mode(self) -> AuthMode:
        return self._authenticator.mode

    @property
    def key_ids(self) -> tuple[bytes, ...]:
        """The key IDs listed in the Hello for this mode (empty for plain modes)."""
        return () if self._keys is None else tuple(self._keys)

    @property
    def usable(self) -> bool:
        """Whether the responder can choose this offer (a keyed offer without keys only signals support)."""
        return self._keys is None or bool(self._keys)

    def choose(self, key_id: bytes | None) -> Authenticator | None:
        """The authenticator for the responder's choice; None if it named a key that was not offered."""
        if self._keys is None:
            return self._authenticator if key_id is None else None
        return None if key_id is None else self._keys.get(key_id)


# --- MAC modes -------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _mac_info(suite_label: bytes, purpose: bytes) -> bytes:
    """The HKDF info of a MAC key: public labels only, so made once per suite and role."""
    return lp_join(labels.PROTOCOL, suite_label, purpose)


class MACAuthenticator(Authenticator):
    """HMAC over ``TH || confirm`` with a key that depends on the peer pair.

    The base of :class:`PSKAuthenticator` and of the recycled mode: a subclass supplies the pair's
    32+ byte key through :meth:`pair_key`.  The MAC key is role-separated:
    ``HKDF(salt = "hybridkex/v1 psk authentication", IKM = pair key,
    info = lp("hybridkex/v1") || lp(suite) || lp("psk auth initiator" or "psk auth responder"))``.
    """

    @abstractmethod
    def pair_key(self, peer_identity: str) -> bytes:
        """The key shared with ``peer_identity``; AuthenticationError if there is none."""

    def _mac_key(self, ctx: AuthContext, peer: str) -> bytes:
        """The role-separated MAC key (a keyed subclass may use other labels)."""
        purpose = labels.PSK_AUTH_INITIATOR if ctx.prover_role == "initiator" else labels.PSK_AUTH_RESPONDER
        s = ctx.suite
        return hkdf(s.hash, salt=labels.PSK_AUTH_SALT, ikm=self.pair_key(peer),
                    info=_mac_info(s.label, purpose), length=s.hash_len)

    def _mac(self, ctx: AuthContext, peer: str, data: bytes) -> bytes:
        return hmac_digest(ctx.suite.hash, self._mac_key(ctx, peer), data)

    def check_peer(self, peer_identity: str) -> None:
        self.pair_key(peer_identity)

    def prove(self, ctx: AuthContext, data: bytes) -> bytes:
        return self._mac(ctx, ctx.verifier_identity, data)

    def verify(self, ctx: AuthContext, data: bytes, proof: bytes, certificate: CertificateMsg | None) -> None:
        if certificate is not None:
            raise AuthenticationError("the peer sent certificates in a MAC-authenticated handshake")
        expected = self._mac(ctx, ctx.prover_identity, data)
        if not hmac.compare_digest(expected, proof):
            raise AuthenticationError(
                f"{self.mode.label} MAC from {ctx.prover_identity!r} does not verify: the peer holds a "
                "different key for this pair, or the transcript was altered in transit")


class PSKAuthenticator(MACAuthenticator):
    """Bootstrap pre-shared keys, one per peer identity (each at least 32 random bytes).

    The same key must be configured on both sides of a pair, each side indexing it by the *other*
    side's identity.  ``repr`` names the identities, never the keys.
    """

    @property
    def mode(self) -> AuthMode:
        return AuthMode.PSK

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        checked: dict[str, bytes] = {}
        for identity, key in keys.items():
            if not isinstance(identity, str) or not identity or len(identity.encode("utf-8")) > 255:
                raise ConfigurationError("PSK peer identities must be non-empty strings of at most 255 bytes",
                                         field="psk")
            if not isinstance(key, bytes | bytearray) or len(key) < MIN_PSK_LEN:
                raise ConfigurationError(f"the PSK for {identity!r} must be at least {MIN_PSK_LEN} bytes",
                                         field="psk")
            checked[identity] = bytes(key)
        if not checked:
            raise ConfigurationError("a PSK authenticator needs at least one peer key", field="psk")
        self._keys: Mapping[str, bytes] = MappingProxyType(checked)

    def __repr__(self) -> str:
        return f"PSKAuthenticator(peers={sorted(self._keys)!r}, keys=<redacted>)"

    @property
    def peers(self) -> frozenset[str]:
        """The identities this authenticator has a key for."""
        return frozenset(self._keys)

    def pair_key(self, peer_identity: str) -> bytes:
        try:
            return self._keys[peer_identity]
        except KeyError:
            raise AuthenticationError(f"unknown identity {peer_identity!r}: no PSK configured for it") from None


# --- PKI modes -------------------------------------------------------------------------------------

PrivateKey = ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey

_SIG_OID = {
    SignatureAlgorithm.ED25519: SignatureAlgorithmOID.ED25519,
    SignatureAlgorithm.MLDSA65: SignatureAlgorithmOID.ML_DSA_65,
}
_PUB_TYPE: dict[SignatureAlgorithm, type] = {
    SignatureAlgorithm.ED25519: ed25519.Ed25519PublicKey,
    SignatureAlgorithm.MLDSA65: mldsa.MLDSA65PublicKey,
}
_SIG_LEN = {SignatureAlgorithm.ED25519: 64, SignatureAlgorithm.MLDSA65: 3309}
_KNOWN_CRITICAL = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
}


def _algorithm_of(key: object) -> SignatureAlgorithm:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return SignatureAlgorithm.ED25519
    if isinstance(key, mldsa.MLDSA65PrivateKey | mldsa.MLDSA65PublicKey):
        return SignatureAlgorithm.MLDSA65
    raise ConfigurationError("signing keys must be Ed25519 or ML-DSA-65", field="pki")


@dataclass(frozen=True, slots=True, repr=False)
class SigningCredential:
    """A certificate chain (leaf first, intermediates after; the trust anchor need not be included)
    and the leaf's private key."""

    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey

    def __post_init__(self) -> None:
        object.__setattr__(self, "chain", tuple(self.chain))
        if not 1 <= len(self.chain) <= MAX_CHAIN_LEN:
            raise ConfigurationError(f"a certificate chain has 1..{MAX_CHAIN_LEN} certificates", field="pki.chain")
        alg = _algorithm_of(self.private_key)
        leaf_key = self.chain[0].public_key()
        if _algorithm_of(leaf_key) is not alg or leaf_key != self.private_key.public_key():
            raise ConfigurationError("the private key does not match the leaf certificate", field="pki.chain")

    @property
    def algorithm(self) -> SignatureAlgorithm:
        return _algorithm_of(self.private_key)

    def __repr__(self) -> str:
        return f"SigningCredential(algorithm={self.algorithm.name}, leaf={self.chain[0].subject.rfc4514_string()!r})"


def _fail(detail: str) -> AuthenticationError:
    return AuthenticationError(detail)


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise _fail(f"{what} is not valid yet (from {cert.not_valid_before_utc.isoformat()})")
    if now > cert.not_valid_after_utc:
        raise _fail(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_critical(cert: x509.Certificate, what: str) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise _fail(f"{what} has an unsupported critical extension {ext.oid.dotted_string}")


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_issuer(cert: x509.Certificate, issuer: x509.Certificate, alg: SignatureAlgorithm, depth: int,
                  what: str) -> None:
    """``issuer`` signed ``cert`` with ``alg`` and may issue certificates at this depth."""
    if cert.signature_algorithm_oid != _SIG_OID[alg]:
        raise _fail(f"{what} is signed with {cert.signature_algorithm_oid.dotted_string}, not {alg.name}")
    if _algorithm_of_public(issuer) is not alg:
        raise _fail(f"the issuer of {what} does not have an {alg.name} key")
    bc = _basic_constraints(issuer)
    if bc is None or not bc.ca:
        raise _fail(f"the issuer of {what} is not a CA certificate")
    if bc.path_length is not None and depth > bc.path_length:
        raise _fail(f"the issuer of {what} exceeds its path length constraint")
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise _fail(f"the issuer of {what} may not sign certificates (key usage)")
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise _fail(f"{what} is not signed by its issuer {issuer.subject.rfc4514_string()!r}") from None


def _algorithm_of_public(cert: x509.Certificate) -> SignatureAlgorithm | None:
    try:
        return _algorithm_of(cert.public_key())
    except (ConfigurationError, ValueError, UnsupportedAlgorithm):
        return None


def _identity_matches(cert: x509.Certificate, identity: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    for name in san.get_values_for_type(x509.DNSName):
        if name.lower() == identity.lower():
            return True
    return identity in san.get_values_for_type(x509.UniformResourceIdentifier)


def verify_chain(
    chain: CertificateChain,
    anchors: Sequence[x509.Certificate],
    *,
    now: datetime,
    identity: str,
    role: Role,
) -> ed25519.Ed25519PublicKey | mldsa.MLDSA65PublicKey:
    """Validate a received chain; returns the leaf's public key.

    Checks, in order: every certificate parses; every certificate, and the anchor reached, is
    within its validity period at ``now``; no unknown critical extension; each certificate is
    signed by the next (and the last by a configured anchor, or is itself an anchor) with the
    chain's algorithm; every issuer is a CA (basicConstraints, path length, keyCertSign); the leaf
    key is of the chain's algorithm, the leaf is not a CA, may sign (keyUsage digitalSignature),
    may act for ``role`` (extendedKeyUsage serverAuth for a responder, clientAuth for an
    initiator, if the extension is present), and names ``identity`` in its subjectAltName
    (dNSName, case-insensitive, or URI).  Raises AuthenticationError with a precise ``detail``.
    """
    alg = chain.algorithm
    certs: list[x509.Certificate] = []
    for i, der in enumerate(chain.certificates):
        try:
            cert = x509.load_der_x509_certificate(der)
        except Exception:  # ValueError in practice; fail closed on anything
            raise _fail(f"{alg.name} chain: certificate {i} is not valid DER X.509") from None
        # The signature BIT STRING is the certificate's last element and lies outside the signed
        # part: the parser tolerates a non-zero "unused bits" octet there, which would make one
        # certificate acceptable under several encodings.  DER (X.690 11.2) requires it to be 0.
        if der[len(der) - len(cert.signature) - 1] != 0:
            raise _fail(f"{alg.name} chain: certificate {i} is not canonical DER (signature bit string)")
        certs.append(cert)
    try:
        for i, cert in enumerate(certs):
            what = "the leaf certificate" if i == 0 else f"intermediate certificate {i}"
            _check_validity(cert, now, what)
            _check_critical(cert, what)
            if i + 1 < len(certs):
                _check_issuer(cert, certs[i + 1], alg, i, what)
        top = certs[-1]
        anchor_ok = any(anchor == top for anchor in anchors)  # the peer sent an anchor itself (checked above)
        near_miss: AuthenticationError | None = None
        for anchor in anchors if not anchor_ok else ():
            if anchor.subject != top.issuer:
                continue
            try:
                _check_validity(anchor, now, "the trust anchor")
                _check_issuer(top, anchor, alg, len(certs) - 1, "the top certificate of the chain")
            except AuthenticationError as exc:  # keep the precise reason; another anchor may still fit
                near_miss = near_miss or exc
                continue
            anchor_ok = True
            break
        if not anchor_ok:
            if near_miss is not None:
                raise near_miss
            raise _fail(f"{alg.name} chain for {identity!r} does not lead to a configured trust anchor (untrusted)")
        leaf = certs[0]
        if _algorithm_of_public(leaf) is not alg:
            raise _fail(f"the leaf certificate key is not {alg.name}")
        key = leaf.public_key()
        if not isinstance(key, _PUB_TYPE[alg]):
            raise _fail(f"the leaf certificate key is not {alg.name}")
        bc = _basic_constraints(leaf)
        if bc is not None and bc.ca:
            raise _fail("the leaf certificate is a CA certificate")
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.digital_signature:
                raise _fail("the leaf certificate may not make signatures (key usage)")
        except x509.ExtensionNotFound:
            pass
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            wanted = ExtendedKeyUsageOID.SERVER_AUTH if role == "responder" else ExtendedKeyUsageOID.CLIENT_AUTH
            if wanted not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
                raise _fail(f"the leaf certificate is not allowed to act as {role} (extended key usage)")
        except x509.ExtensionNotFound:
            pass
        if not _identity_matches(leaf, identity):
            raise _fail(f"identity mismatch: the {alg.name} certificate does not name {identity!r}")
    except AuthenticationError:
        raise
    except Exception as exc:  # any other failure on untrusted DER fails closed
        raise _fail(f"{alg.name} chain: malformed certificate ({type(exc).__name__})") from None
    assert isinstance(key, ed25519.Ed25519PublicKey | mldsa.MLDSA65PublicKey)
    return key


class PKIAuthenticator(Authenticator):
    """X.509 certificates and signatures over the transcript.

    Give ``ed25519``, ``mldsa65`` or both; with both the mode is ``pki-hybrid`` and the peer must
    present both chains and both signatures, so authentication survives a break of either
    algorithm.  ``trust_anchors`` verify the peer (they must include an anchor of each algorithm in
    use); ``allowed_peers`` optionally limits which certified identities are accepted.
    """

    def __init__(
        self,
        trust_anchors: Sequence[x509.Certificate],
        *,
        ed25519: SigningCredential | None = None,
        mldsa65: SigningCredential | None = None,
        allowed_peers: Collection[str] | None = None,
    ) -> None:
        creds: dict[SignatureAlgorithm, SigningCredential] = {}
        for alg, cred in ((SignatureAlgorithm.ED25519, ed25519), (SignatureAlgorithm.MLDSA65, mldsa65)):
            if cred is None:
                continue
            if cred.algorithm is not alg:
                raise ConfigurationError(f"the {alg.name.lower()} credential holds a {cred.algorithm.name} key",
                                         field="pki")
            creds[alg] = cred
        if not creds:
            raise ConfigurationError("a PKI authenticator needs an Ed25519 or ML-DSA-65 credential, or both",
                                     field="pki")
        anchors = tuple(trust_anchors)
        for alg in creds:
            if not any(_algorithm_of_public(a) is alg for a in anchors):
                raise ConfigurationError(f"no {alg.name} trust anchor configured to verify the peer's chain",
                                         field="pki.trust_anchors")
        self._creds = creds
        self._anchors = anchors
        self._allowed = frozenset(allowed_peers) if allowed_peers is not None else None
        self._mode = (AuthMode.PKI_HYBRID if len(creds) == 2
                      else AuthMode.PKI_ED25519 if SignatureAlgorithm.ED25519 in creds else AuthMode.PKI_MLDSA65)

    @property
    def mode(self) -> AuthMode:
        return self._mode

    @property
    def sends_certificate(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (f"PKIAuthenticator(mode={self._mode.label!r}, anchors={len(self._anchors)}, "
                f"credentials={list(self._creds.values())!r})")

    def check_peer(self, peer_identity: str) -> None:
        if self._allowed is not None and peer_identity not in self._allowed:
            raise AuthenticationError(f"identity {peer_identity!r} is not in the allowed peers")

    def certificate(self) -> CertificateMsg:
        return CertificateMsg(tuple(
            CertificateChain(alg, tuple(c.public_bytes(Encoding.DER) for c in cred.chain))
            for alg, cred in sorted(self._creds.items())
        ))

    @staticmethod
    def _signed_data(ctx: AuthContext, data: bytes) -> bytes:
        prefix = labels.SIGNATURE_INITIATOR if ctx.prover_role == "initiator" else labels.SIGNATURE_RESPONDER
        return prefix + b"\x00" + ctx.suite.label + b"\x00" + data

    def prove(self, ctx: AuthContext, data: bytes) -> bytes:
        message = self._signed_data(ctx, data)
        return b"".join(cred.private_key.sign(message) for _, cred in sorted(self._creds.items()))

    def verify(self, ctx: AuthContext, data: bytes, proof: bytes, certificate: CertificateMsg | None) -> None:
        self.check_peer(ctx.prover_identity)
        if certificate is None:
            raise _fail("the peer sent no certificate")
        algs = sorted(self._creds)
        got = sorted(c.algorithm for c in certificate.chains)
        if got != algs:
            raise _fail(f"the peer sent chains for {[a.name for a in got]}, mode {self._mode.label} needs "
                        f"{[a.name for a in algs]}")
        expected_len = sum(_SIG_LEN[a] for a in algs)
        if len(proof) != expected_len:
            raise _fail(f"signature block of {len(proof)} bytes, expected {expected_len}")
        message = self._signed_data(ctx, data)
        offset = 0
        by_alg = {c.algorithm: c for c in certificate.chains}
        for alg in algs:
            key = verify_chain(by_alg[alg], self._anchors, now=ctx.now, identity=ctx.prover_identity,
                               role=ctx.prover_role)
            sig = proof[offset: offset + _SIG_LEN[alg]]
            offset += _SIG_LEN[alg]
            try:
                key.verify(sig, message)
            except InvalidSignature:
                raise _fail(f"the {alg.name} signature over the transcript does not verify") from None
