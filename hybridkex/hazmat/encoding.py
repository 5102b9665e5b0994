"""Injective byte encodings shared by the combiner and the wire format.

``lp(x) = u32(len(x)) || x`` is the length prefix of ETSI TS 103 744 section 7.2; a sequence of
``lp`` fields is injective, which is what lets distinct exchanges never collide as KDF inputs.
:class:`Reader` is the strict counterpart used on bytes received from the network: every
truncation, overrun or trailing byte becomes a :class:`~hybridkex.exceptions.RemoteProtocolError`.
"""

from __future__ import annotations

import binascii
import struct
from typing import Final

from ..exceptions import RemoteProtocolError

__all__ = ["Reader", "b64url", "b64url_decode", "lp", "lp_join", "u8", "u16", "u32"]

_B64URL_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_FROM_URL: Final = bytes.maketrans(b"-_", b"+/")
_TO_URL: Final = bytes.maketrans(b"+/", b"-_")

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_pack_u32 = _U32.pack


def u8(value: int) -> bytes:
    return bytes((value,))


def u16(value: int) -> bytes:
    return _U16.pack(value)


def u32(value: int) -> bytes:
    return _U32.pack(value)


def lp(data: bytes) -> bytes:
    """``u32(len(data)) || data``."""
    return _U32.pack(len(data)) + data


def lp_join(*fields: bytes) -> bytes:
    """The concatenation of ``lp(field)`` for every field."""
    out: list[bytes] = []
    add = out.append  # a plain loop: the generator form cost more than the joining itself
    for f in fields:
        add(_pack_u32(len(f)))
        add(f)
    return b"".join(out)


def b64url(data: bytes) -> bytes:
    """RFC 4648 section 5 base64url of ``data`` without ``=`` padding (ASCII bytes)."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL).rstrip(b"=")


def b64url_decode(text: bytes, length: int) -> bytes:
    """Strict inverse of :func:`b64url` for exactly ``length`` decoded bytes.

    Only the canonical encoding is accepted: no padding, no other alphabet, no whitespace, no
    non-zero unused bits.  Anything else raises :class:`RemoteProtocolError`.
    """
    # translate() deletes the alphabet in C: what is left is foreign (a set test cost ~8x more, per connection).
    text = bytes(text)
    if len(text) != (4 * length + 2) // 3 or text.translate(None, _B64URL_ALPHABET):
        raise RemoteProtocolError(f"not the base64url encoding of {length} bytes")
    # binascii directly, as base64.urlsafe_b64decode/-encode do underneath (they run once per connection).
    try:
        data = binascii.a2b_base64(text.translate(_FROM_URL) + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - excluded by the checks above
        raise RemoteProtocolError(f"not the base64url encoding of {length} bytes") from None
    # Re-encoded differently: unused low bits were set, so it was not the canonical encoding.
    if len(data) != length or b64url(data) != text:
        raise RemoteProtocolError(f"not the canonical base64url encoding of {length} bytes")
    return data


class Reader:
    """Consume a received byte string field by field; any malformation raises RemoteProtocolError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        # Slicing bytes copies only the slice, as memoryview.tobytes() did, at a third of its cost.
        self._data = data if type(data) is bytes else bytes(data)
        self._pos = 0
        self._what = what

    def _take(self, n: int, field: str) -> bytes:
        pos = self._pos
        end = pos + n
        if n < 0 or end > len(self._data):
            raise RemoteProtocolError(f"{self._what}: truncated in field {field!r}")
        self._pos = end
        return self._data[pos:end]

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = _U16.unpack(self._take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = _U32.unpack(self._take(4, field))[0]
        return value

    def fixed(self, n: int, field: str) -> bytes:
        return self._take(n, field)

    def vec16(self, field: str, *, max_len: int, min_len: int = 0) -> bytes:
        """A field prefixed by a 16-bit length, bounded before anything is copied."""
        n = self.u16(field)
        if not min_len <= n <= max_len:
            raise RemoteProtocolError(f"{self._what}: field {field!r} length {n} outside {min_len}..{max_len}")
        return self._take(n, field)

    def vec32(self, field: str, *, max_len: int, min_len: int = 0) -> bytes:
        """A field prefixed by a 32-bit length, bounded before anything is copied."""
        n = self.u32(field)
        if not min_len <= n <= max_len:
            raise RemoteProtocolError(f"{self._what}: field {field!r} length {n} outside {min_len}..{max_len}")
        return self._take(n, field)

    def text16(self, field: str, *, max_len: int, min_len: int = 0) -> str:
        raw = self.vec16(field, max_len=max_len, min_len=min_len)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"{self._what}: field {field!r} is not valid UTF-8") from exc

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def end(self) -> None:
        """Require that every byte was consumed."""
        if self._pos != len(self._data):
            raise RemoteProtocolError(f"{self._what}: {len(self._data) - self._pos} unexpected trailing bytes")
