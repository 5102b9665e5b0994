"""Abort codes and the exceptions they stand for, both ways (docs/spec.md, section 9)."""

from __future__ import annotations

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


def abort_code(exc: BaseException) -> w.AbortCode:
    if isinstance(exc, VersionError):
        return w.AbortCode.UNSUPPORTED_VERSION
    if isinstance(exc, _UnexpectedMessage):
        return w.AbortCode.UNEXPECTED_MESSAGE
    if isinstance(exc, RemoteProtocolError):
        return w.AbortCode.DECODE_ERROR
    if isinstance(exc, AuthenticationError | KeyMismatchError):
        return w.AbortCode.AUTHENTICATION_FAILED
    if isinstance(exc, PolicyViolation):
        return w.AbortCode.POLICY
    if isinstance(exc, QKDKeyUnknownError):
        return w.AbortCode.QKD_KEY_UNKNOWN
    if isinstance(exc, KeySourceError):
        return w.AbortCode.QKD_UNAVAILABLE
    if isinstance(exc, HandshakeTimeout):
        return w.AbortCode.TIMEOUT
    if isinstance(exc, RateLimited):
        return w.AbortCode.RATE_LIMITED
    return w.AbortCode.GENERIC


def peer_abort_error(code: int) -> HybridKEXError:
    """The local exception for an Abort the peer sent (unknown codes count as GENERIC)."""
    prefix = "the peer aborted the handshake"
    if code == w.AbortCode.UNSUPPORTED_VERSION:
        return VersionError(f"{prefix}: it does not support this protocol version")
    if code == w.AbortCode.AUTHENTICATION_FAILED:
        return AuthenticationError("the peer reported that authentication or key confirmation failed")
    if code == w.AbortCode.POLICY:
        return PolicyViolation(f"{prefix}: no suite, authentication mode, QKD role or key budget is acceptable "
                               "to it", ("peer policy",))
    if code == w.AbortCode.QKD_UNAVAILABLE:
        return KeyUnavailableError(f"{prefix}: it could not obtain QKD keys and its policy requires them")
    if code == w.AbortCode.QKD_KEY_UNKNOWN:
        return QKDKeyUnknownError(f"{prefix}: its KME does not know the QKD key ID(s) of this handshake (stale "
                                  "keys, e.g. after a KME restart); a new handshake takes a fresh key",
                                  reported_by_peer=True)
    if code == w.AbortCode.TIMEOUT:
        return HandshakeTimeout(f"{prefix}: a deadline passed on its side")
    if code == w.AbortCode.DECODE_ERROR:
        return RemoteProtocolError(f"{prefix}: it could not parse a message from this side")
    if code == w.AbortCode.UNEXPECTED_MESSAGE:
        return RemoteProtocolError(f"{prefix}: it received a message out of order")
    if code == w.AbortCode.RATE_LIMITED:
        return RateLimited(f"{prefix}: rate limited (its connection limits refused this connection); retry later")
    return RemoteProtocolError(prefix)
