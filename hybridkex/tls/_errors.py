"""OpenSSL's handshake failures, translated into the typed errors of :mod:`hybridkex.exceptions`.

OpenSSL reports PSK problems through side effects: a server that finds no usable PSK falls back to
the certificate path and, having no certificate, fails with "no suitable signature algorithm"; the
client only sees a ``handshake_failure`` alert.  This module maps those symptoms (reason strings of
pyOpenSSL's ``SSL.Error`` or the stdlib's ``ssl.SSLError``) to what actually went wrong.  Standard
library only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from ..exceptions import (
    PSKHashMismatch,
    PSKMismatch,
    PSKRejected,
    TLSError,
    UnknownPSKIdentity,
)

__all__ = ["PSKObservation", "translate"]

Role = Literal["client", "server"]


class PSKObservation:
    """What our own PSK callbacks saw during one handshake (server: identities offered, whether one
    was known).  Lets :func:`translate` tell an unknown identity from a hash mismatch."""

    __slots__ = ("identity_found", "identity_offered", "used_identity")

    def __init__(self) -> None:
        self.identity_offered = False
        self.identity_found = False
        self.used_identity: bytes | None = None


def _normalize(reasons: Iterable[str]) -> str:
    # stdlib gives "BINDER_DOES_NOT_VERIFY"-style codes, pyOpenSSL "binder does not verify".
    return " | ".join(r.replace("_", " ").lower() for r in reasons if r)


def translate(
    reasons: Iterable[str],
    *,
    role: Role,
    seen: PSKObservation | None = None,
    groups: tuple[str, ...] = (),
    cipher: str | None = None,
) -> TLSError:
    """The typed error for a failed handshake whose OpenSSL reasons are ``reasons``.

    ``seen`` is what our PSK callback observed (server side), ``groups``/``cipher`` our
    configuration, used only to word the message.  The result never contains key material.
    """
    text = _normalize(reasons)
    bound = f" (ours is bound to {cipher})" if cipher else ""

    if "binder does not verify" in text:
        return PSKMismatch(
            "PSK mismatch: the client's PSK binder does not verify, so the client holds a different key "
            "for this identity"
        )
    if "alert decrypt error" in text:
        return PSKMismatch(
            "PSK mismatch: the peer could not verify our PSK binder or Finished message; the two ends "
            "hold different keys for this identity"
        )
    if role == "client" and "alert illegal parameter" in text:
        # OpenSSL 3.0 servers answer a bad binder with illegal_parameter rather than decrypt_error.
        return PSKMismatch(
            "PSK mismatch: the server rejected our PSK binder (illegal_parameter, as OpenSSL 3.0 servers "
            "report a wrong key); the two ends hold different keys for this identity"
        )
    if "no suitable key share" in text or "no shared groups" in text or "no shared group" in text:
        want = ", ".join(groups) if groups else "the configured groups"
        return TLSError(
            f"no common key-exchange group: {'we' if role == 'server' else 'the peer'} require one of "
            f"{want} and the peer offered none of them"
        )
    if role == "server":
        if "no shared cipher" in text:
            return PSKHashMismatch(
                f"PSK hash mismatch: the client offered no TLS 1.3 cipher suite matching our PSK{bound}; "
                "both ends must bind the PSK to the same hash (SHA-256 or SHA-384)"
            )
        if "bad extension" in text and seen is not None and seen.identity_found:
            return PSKHashMismatch(
                f"PSK hash mismatch: the client's PSK uses a different hash than ours{bound} "
                "(a SHA-256-only client against a SHA-384 PSK)"
            )
        if "no suitable signature algorithm" in text:
            # The server found no usable PSK and fell back to the certificate path, which it lacks.
            if seen is not None and seen.identity_found:
                return PSKHashMismatch(
                    f"PSK hash mismatch: the client's identity is known but its PSK is bound to a "
                    f"different cipher suite{bound}"
                )
            if seen is not None and not seen.identity_offered:
                return UnknownPSKIdentity(
                    "the client offered no external PSK (a certificate-only or misconfigured client)"
                )
            return UnknownPSKIdentity("unknown PSK identity: no key is configured for the identity the client sent")
    else:
        if "alert handshake failure" in text:
            return PSKRejected(
                "the server rejected the handshake (handshake_failure): it does not know our PSK identity, "
                f"or binds the PSK to a different hash{bound}, or shares no key-exchange group with us"
            )
        if "alert decode error" in text:
            return PSKHashMismatch(
                f"PSK hash mismatch: the server could not parse our PSK offer (decode_error), which is what a "
                f"SHA-384-bound PSK looks like to a SHA-256-only peer{bound}"
            )
        if "alert internal error" in text:
            return TLSError(
                "the server aborted the handshake with internal_error (for a hybridkex server: its PSK lookup "
                "failed; see the server's log)"
            )
        if "certificate verify failed" in text or "certificate required" in text:
            return TLSError(
                "the server ignored the external PSK and presented a certificate; refusing a certificate "
                "handshake"
            )
    if "wrong version number" in text or "unsupported protocol" in text or "protocol version" in text:
        return TLSError("the peer does not speak TLS 1.3 (only TLS 1.3 is allowed)")
    if "unexpected eof" in text or "eof occurred" in text or text == "eof":
        return TLSError("the peer closed the connection during the TLS handshake")
    if "connection reset" in text:
        return TLSError(f"the peer closed the connection during the TLS handshake ({text})")
    detail = text or "no reason given"
    return TLSError(f"TLS 1.3 handshake failed: {detail}")
