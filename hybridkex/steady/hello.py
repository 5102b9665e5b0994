"""Read the first PSK identity of a TLS 1.3 ClientHello (RFC 8446 section 4.2.11) before OpenSSL does.

A steady-state server must know the connection's QKD key before TLS starts (OpenSSL's PSK callback
cannot wait for a KME), so it reads the identity from the ClientHello itself.  Hand-written because
no maintained Python library parses a ClientHello without running a handshake; strict and bounded,
and with plain offsets rather than a field reader: it runs once per connection.
"""

from __future__ import annotations

import struct
from typing import Final

from ..exceptions import RemoteProtocolError

__all__ = ["first_psk_identity"]

_PRE_SHARED_KEY: Final = 41
_TYPE_LEN: Final = struct.Struct(">HH").unpack_from  # an extension's type and length


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"TLS ClientHello: {what}")


def _vec(data: bytes, pos: int, width: int, end: int, what: str) -> tuple[int, int]:
    """The (start, stop) of a length-prefixed field at ``pos`` that must end by ``end``."""
    if pos + width > end:
        raise _bad(f"truncated in {what}")
    n = int.from_bytes(data[pos:pos + width], "big")
    start = pos + width
    if start + n > end:
        raise _bad(f"truncated in {what}")
    return start, start + n


def first_psk_identity(record_body: bytes) -> tuple[bytes, bytes | None]:
    """The ClientHello's ``cipher_suites`` and the first identity in its ``pre_shared_key``
    extension (None without one), read in one pass.

    ``record_body`` is the body of the first TLS record, holding the whole ClientHello.  Raises
    :class:`RemoteProtocolError` for a malformed ClientHello.
    """
    data = bytes(record_body)
    if len(data) < 4 or data[0] != 1:
        raise _bad("the first TLS handshake message is not a ClientHello")
    end = 4 + int.from_bytes(data[1:4], "big")
    if end > len(data):
        raise _bad("truncated in ClientHello body")
    pos = 4 + 2 + 32  # legacy_version, random
    _, pos = _vec(data, pos, 1, end, "legacy_session_id")
    s0, pos = _vec(data, pos, 2, end, "cipher_suites")
    if pos - s0 < 2:
        raise _bad("no cipher suite")
    suites = data[s0:pos]
    _, pos = _vec(data, pos, 1, end, "legacy_compression_methods")
    e0, e1 = _vec(data, pos, 2, end, "extensions")
    if e1 != end:
        raise _bad(f"{end - e1} unexpected trailing bytes")
    found: bytes | None = None
    pos = e0
    while pos < e1:  # the extension headers inline (a ClientHello has a dozen): type, length
        if pos + 4 > e1:
            raise _bad("truncated in extension header")
        kind, n = _TYPE_LEN(data, pos)
        x0 = pos + 4
        x1 = x0 + n
        if x1 > e1:
            raise _bad("truncated in extension")
        if kind == _PRE_SHARED_KEY:
            if x1 != e1:
                raise _bad("pre_shared_key is not the last extension")
            i0, i1 = _vec(data, x0, 2, x1, "PSK identities")
            p0, p1 = _vec(data, i0, 2, i1, "PSK identity")
            if p0 == p1:
                raise _bad("an empty PSK identity")
            found = data[p0:p1]
        pos = x1
    return suites, found
