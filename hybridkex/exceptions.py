"""The one exception tree of hybridkex.

Every error the library raises on purpose derives from :class:`HybridKEXError`, so callers can
catch it in one place.  Errors about the peer's bytes (:class:`RemoteProtocolError`) are kept
apart from errors about how *we* were called (:class:`LocalProtocolError`, :class:`ConfigurationError`),
and authentication failures are deliberately uninformative: what went wrong is logged locally
through ``detail`` (never sent, never containing key material) while the message stays generic.
"""

from __future__ import annotations

__all__ = [
    "AlreadyFinalized",
    "AuthenticationError",
    "BootstrapExhausted",
    "ConfigurationError",
    "HandshakeTimeout",
    "HybridKEXError",
    "InvalidKeyMaterial",
    "KMEError",
    "KeyMismatchError",
    "KeyReuseError",
    "KeySourceError",
    "KeyUnavailableError",
    "LinkAbort",
    "LinkAuthenticationError",
    "LocalProtocolError",
    "PSKHashMismatch",
    "PSKMismatch",
    "PSKRejected",
    "PolicyViolation",
    "ProtocolError",
    "QBERAbort",
    "QKDKeyUnknownError",
    "RateLimited",
    "RemoteProtocolError",
    "StateError",
    "StateReadOnly",
    "StateSchemaError",
    "StateUnavailable",
    "SteadyStateRefused",
    "StoreError",
    "TLSError",
    "UnknownPSKIdentity",
    "UnsupportedAlgorithm",
    "VersionError",
]


class HybridKEXError(Exception):
    """Root of every error hybridkex raises on purpose."""

    #: Process exit status the CLI uses for this kind of error.
    exit_code: int = 1


class ConfigurationError(HybridKEXError, ValueError):
    """A configuration value is missing, malformed or inconsistent (names the field)."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class UnsupportedAlgorithm(HybridKEXError):
    """An algorithm or backend is not available in this installation (says what to install)."""

    exit_code = 3


class InvalidKeyMaterial(HybridKEXError, ValueError):
    """A key, ciphertext or secret has the wrong length or is otherwise unusable."""


class AlreadyFinalized(HybridKEXError):
    """A single-use object (KDF context, key pair, handshake) was used a second time."""


class ProtocolError(HybridKEXError):
    """The handshake cannot continue. Never raised directly: see the two subclasses."""

    exit_code = 4

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow (API misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol (malformed, oversized, out of order)."""


class VersionError(RemoteProtocolError):
    """The peer speaks a protocol version we do not support."""


class AuthenticationError(HybridKEXError):
    """The peer could not be authenticated.

    The message is always the same generic text so that it can be shown to, or reach, the peer
    without telling an attacker which check failed.  ``detail`` carries a precise local reason
    (e.g. ``"unknown identity"``) for logs; it never contains key material.
    """

    exit_code = 5
    GENERIC = "authentication failed"

    def __init__(self, detail: str = "") -> None:
        super().__init__(self.GENERIC)
        self.detail = detail


class PolicyViolation(HybridKEXError):
    """The negotiated result does not satisfy the configured policy (e.g. QKD required but absent).

    ``violations`` lists each unmet requirement as a short string.
    """

    exit_code = 6

    def __init__(self, message: str, violations: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.violations = violations


class KeySourceError(HybridKEXError):
    """A QKD key source (KME or other) could not deliver keys."""

    exit_code = 7


class KeyUnavailableError(KeySourceError):
    """The key source has no key to give right now (exhausted pool, 503, unknown key ID)."""


class QKDKeyUnknownError(KeyUnavailableError):
    """A KME does not know a QKD key ID the master handed out (it lost its keys, e.g. restarted without
    persistence, or already delivered that key).

    The key cannot be used, so this handshake fails; the master discards the keys it pooled for that
    peer, and a new handshake (with a fresh key) can succeed, which is why the initiator retries it
    once.  ``key_ids`` names the keys involved when known; ``reported_by_peer`` is True when the peer
    said so in its Abort (the slave's KME), False when this side's own KME said so.
    """

    def __init__(self, message: str, *, key_ids: tuple[str, ...] = (), reported_by_peer: bool = False) -> None:
        super().__init__(message)
        self.key_ids = tuple(key_ids)
        self.reported_by_peer = reported_by_peer


class KMEError(KeySourceError):
    """A KME answered with an error or with a response that violates ETSI GS QKD 014.

    ``status`` is the HTTP status when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KeyReuseError(KeySourceError):
    """A QKD key ID was offered a second time; a QKD key is used at most once, ever."""


class KeyMismatchError(HybridKEXError):
    """Both sides completed the exchange but derived different keys (key confirmation failed)."""

    exit_code = 5


class TLSError(HybridKEXError):
    """The TLS 1.3 handshake or record layer failed (reason translated from OpenSSL)."""

    exit_code = 8


class PSKRejected(TLSError):
    """The TLS 1.3 handshake failed because the external PSK was not accepted.

    A client usually cannot tell why (the server answers every PSK problem with one alert); the
    server raises the precise subclass.
    """


class SteadyStateRefused(PSKRejected):
    """A steady-state connection was refused (the server restarted, forgot the session, or has the
    steady state off); retry once with a full handshake, which makes a new ticket."""


class UnknownPSKIdentity(PSKRejected):
    """The server has no PSK for the identity the client offered (or the client offered none)."""


class PSKMismatch(PSKRejected):
    """Both ends know the identity but hold different keys (the PSK binder does not verify)."""


class PSKHashMismatch(PSKRejected):
    """The two ends bound the PSK to different hashes / cipher suites (SHA-256 vs SHA-384)."""


class StoreError(HybridKEXError):
    """A durable store (recycled authentication keys) cannot be read or written."""

    exit_code = 10


class StateError(StoreError):
    """The shared state (``hybridkex.state``: anti-replay, tickets, recycled keys) cannot be used.

    Derives from :class:`StoreError`, so code that handles a failing key store handles it too.  The
    message is one line naming the database (never its password) and what to do.
    """


class StateUnavailable(StateError):
    """The state database cannot be reached (down, restarting, refused the connection); retry later.

    What depends on it fails closed meanwhile: nothing is accepted that could not be marked used."""


class StateReadOnly(StateError):
    """The state database accepts no writes (a read-only replica, ``default_transaction_read_only``)."""


class StateSchemaError(StateError):
    """The state database's schema is of another version than this hybridkex uses (or not ours)."""


class RateLimited(HybridKEXError):
    """A connection was refused under the responder's connection limits (rate or count); retry later.

    The responder raises it from its admission check (``ResponderConfig.admit``) and tells the
    initiator with Abort "rate limited", where it is raised again.  ``peer_identity`` is the
    identity the initiator claimed, on the responder's side only.
    """

    def __init__(self, message: str, *, peer_identity: str | None = None) -> None:
        super().__init__(message)
        self.peer_identity = peer_identity


class HandshakeTimeout(HybridKEXError, TimeoutError):
    """A handshake stage (peer, KME) did not finish within its deadline."""

    exit_code = 9


class LinkAbort(KeySourceError):
    """A QKD link block was discarded and gave no key (``reason`` says why, e.g. verification failed)."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class QBERAbort(LinkAbort):
    """A QKD link block aborted: the sampled QBER is above the threshold (noise or an eavesdropper)."""

    def __init__(self, *, qber: float, threshold: float, sample_size: int) -> None:
        super().__init__(f"QBER {qber:.2%} above the {threshold:.2%} threshold ({sample_size} bits sampled): "
                         "block discarded", reason="qber")
        self.qber = qber
        self.threshold = threshold
        self.sample_size = sample_size


class LinkAuthenticationError(AuthenticationError):
    """A classical message of the QKD link failed its Wegman-Carter MAC: the block is discarded."""


class BootstrapExhausted(KeySourceError):
    """The QKD link has no authentication key left: the bootstrap secret ran out before a block
    completed (or the reserved key of earlier blocks did); provide a longer bootstrap secret."""
