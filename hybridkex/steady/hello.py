"""Read the first PSK identity of a TLS 1.3 ClientHello (RFC 8446 section 4.2.11) before OpenSSL does.

A steady-state server must know the connection's QKD key before TLS starts (OpenSSL's PSK callback
cannot wait for a KME), so it reads the identity from the ClientHello itself.  Hand-written because
no maintained Python library parses a ClientHello without running a handshake; strict, bounded.
"""

from __future__ import annotations

from typing import Final

from ..exceptions import RemoteProtocolError
from ..hazmat.encoding import Reader

__all__ = ["first_psk_identity"]

#: TLS 1.3 ClientHello bounds (RFC 8446 section 4.1.2).
_MAX_SUITES: Final = 65534

_PRE_SHARED_KEY: Final = 41


def first_psk_identity(record_body: bytes) -> tuple[bytes, bytes | None]:
    """The ClientHello's ``cipher_suites`` and the first identity in its ``pre_shared_key``
    extension (None without one), read in one pass.

    ``record_body`` is the body of the first TLS record, holding the whole ClientHello.  Raises
    :class:`RemoteProtocolError` for a malformed ClientHello.
    """
    r = Reader(record_body, "TLS ClientHello")
    if r.u8("msg_type") != 1:
        raise RemoteProtocolError("the first TLS handshake message is not a ClientHello")
    length = int.from_bytes(r.fixed(3, "length"), "big")
    body = Reader(r.fixed(length, "ClientHello body"), "TLS ClientHello")
    body.u16("legacy_version")
    body.fixed(32, "random")
    body.fixed(body.u8("legacy_session_id"), "legacy_session_id")
    suites = body.vec16("cipher_suites", min_len=2, max_len=_MAX_SUITES)
    body.fixed(body.u8("legacy_compression_methods"), "legacy_compression_methods")
    exts = Reader(body.fixed(body.u16("extensions"), "extensions"), "TLS ClientHello extensions")
    body.end()
    found: bytes | None = None
    while exts.remaining:
        kind = exts.u16("extension type")
        data = exts.fixed(exts.u16("extension length"), "extension")
        if kind == _PRE_SHARED_KEY:
            if exts.remaining:
                raise RemoteProtocolError("TLS ClientHello: pre_shared_key is not the last extension")
            psk = Reader(data, "TLS pre_shared_key")
            identities = Reader(psk.fixed(psk.u16("identities"), "identities"), "TLS PSK identities")
            found = identities.fixed(identities.u16("identity"), "identity")
            if not found:
                raise RemoteProtocolError("TLS ClientHello: an empty PSK identity")
    return suites, found
