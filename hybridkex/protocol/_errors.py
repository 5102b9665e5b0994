"""Abort codes and the exceptions they stand for, both ways (docs/spec.md, section 9)."""

from __future__ import annotations

from collections.abc import Callable

from ..exceptions import (
    AuthenticationError,
    HandshakeTimeout,
    HybridKEXError,
    KeyMismatchError,
    KeySourceError,
    KeyUnavailableError,
    PolicyViolation,
    QKDKeyUnknownError,
    RateLimited,
    RemoteProtocolError,
    VersionError,
)
from . import _wire as w

__all__ = ["_UnexpectedMessage", "abort_code", "peer_abort_error"]


class _UnexpectedMessage(RemoteProtocolError):
    """A well-formed frame that the current state does not allow."""


#: The Abort code for a local failure: the first class that matches, in this order (subclasses before
#: their bases); anything else is GENERIC.
_CODE_FOR: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], w.AbortCode], ...] = (
    (VersionError, w.AbortCode.UNSUPPORTED_VERSION),
    (_UnexpectedMessage, w.AbortCode.UNEXPECTED_MESSAGE),
    (RemoteProtocolError, w.AbortCode.DECODE_ERROR),
    ((AuthenticationError, KeyMismatchError), w.AbortCode.AUTHENTICATION_FAILED),
    (PolicyViolation, w.AbortCode.POLICY),
    (QKDKeyUnknownError, w.AbortCode.QKD_KEY_UNKNOWN),
    (KeySourceError, w.AbortCode.QKD_UNAVAILABLE),
    (HandshakeTimeout, w.AbortCode.TIMEOUT),
    (RateLimited, w.AbortCode.RATE_LIMITED),
)


def abort_code(exc: BaseException) -> w.AbortCode:
    """The coarse code the peer is told for ``exc`` (docs/spec.md, section 9)."""
    return next((code for kinds, code in _CODE_FOR if isinstance(exc, kinds)), w.AbortCode.GENERIC)


_PREFIX = "the peer aborted the handshake"

#: What each Abort code received from the peer means locally.
_ERROR_FOR: dict[int, Callable[[], HybridKEXError]] = {
    w.AbortCode.UNSUPPORTED_VERSION: lambda: VersionError(f"{_PREFIX}: it does not support this protocol version"),
    w.AbortCode.AUTHENTICATION_FAILED: lambda: AuthenticationError(
        "the peer reported that authentication or key confirmation failed"),
    w.AbortCode.POLICY: lambda: PolicyViolation(
        f"{_PREFIX}: no suite, authentication mode, QKD role or key budget is acceptable to it", ("peer policy",)),
    w.AbortCode.QKD_UNAVAILABLE: lambda: KeyUnavailableError(
        f"{_PREFIX}: it could not obtain QKD keys and its policy requires them"),
    w.AbortCode.QKD_KEY_UNKNOWN: lambda: QKDKeyUnknownError(
        f"{_PREFIX}: its KME does not know the QKD key ID(s) of this handshake (stale keys, e.g. after a KME "
        "restart); a new handshake takes a fresh key", reported_by_peer=True),
    w.AbortCode.TIMEOUT: lambda: HandshakeTimeout(f"{_PREFIX}: a deadline passed on its side"),
    w.AbortCode.DECODE_ERROR: lambda: RemoteProtocolError(f"{_PREFIX}: it could not parse a message from this side"),
    w.AbortCode.UNEXPECTED_MESSAGE: lambda: RemoteProtocolError(f"{_PREFIX}: it received a message out of order"),
    w.AbortCode.RATE_LIMITED: lambda: RateLimited(
        f"{_PREFIX}: rate limited (its connection limits refused this connection); retry later"),
}


def peer_abort_error(code: int) -> HybridKEXError:
    """The local exception for an Abort the peer sent (unknown codes count as GENERIC)."""
    make = _ERROR_FOR.get(code)
    return make() if make is not None else RemoteProtocolError(_PREFIX)
