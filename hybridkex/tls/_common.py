"""Pieces both TLS adapters share; standard library only (the 3.13 stdlib adapter imports this
without pyOpenSSL or cryptography installed)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ..exceptions import ConfigurationError, InvalidKeyMaterial
from ..suites import Suite, get_suite

__all__ = [
    "CIPHER_HASH",
    "DEFAULT_CLIENT_GROUPS",
    "DEFAULT_SERVER_GROUPS",
    "EXPORTER_LABEL",
    "EXPORTER_LENGTH",
    "MAX_IDENTITY_LEN",
    "MAX_PSK_LEN",
    "MIN_PSK_LEN",
    "PQ_GROUP",
    "TLSInfo",
    "check_identity",
    "check_psk",
    "group_names",
    "normalize_group",
    "psk_session_pem",
    "resolve_cipher",
]

#: RFC 9266 ``tls-exporter`` channel binding: label, no context, 32 bytes.
EXPORTER_LABEL: Final = b"EXPORTER-Channel-Binding"
EXPORTER_LENGTH: Final = 32

#: The hybrid group a policy may require.
PQ_GROUP: Final = "X25519MLKEM768"
#: Clients send both key shares (OpenSSL >= 3.5 ``*`` syntax) so that a classical-only server
#: answers at once instead of costing a HelloRetryRequest.
DEFAULT_CLIENT_GROUPS: Final = "*X25519MLKEM768:*X25519"
#: Servers prefer the hybrid group and still accept a lone X25519 share.
DEFAULT_SERVER_GROUPS: Final = "X25519MLKEM768:X25519"

#: TLS 1.3 cipher suites an external PSK may be bound to, with their hash.
CIPHER_HASH: Final[dict[str, Literal["sha256", "sha384"]]] = {
    "TLS_AES_128_GCM_SHA256": "sha256",
    "TLS_AES_256_GCM_SHA384": "sha384",
}
#: Two-byte code points (RFC 8446 appendix B.4).
CIPHER_ID: Final[dict[str, bytes]] = {
    "TLS_AES_128_GCM_SHA256": b"\x13\x01",
    "TLS_AES_256_GCM_SHA384": b"\x13\x02",
}

#: RFC 9257 asks for at least 128 bits of entropy in an external PSK; OpenSSL stores at most 512.
MIN_PSK_LEN: Final = 16
MAX_PSK_LEN: Final = 512
#: RFC 8446 allows 2^16-1; a kilobyte is plenty and keeps ClientHellos sane.
MAX_IDENTITY_LEN: Final = 1024

# OpenSSL accepts several spellings for the same group; get_group_name() reports one of them.
_ALIASES: Final = {
    "p-256": "secp256r1",
    "prime256v1": "secp256r1",
    "p-384": "secp384r1",
    "p-521": "secp521r1",
}


def resolve_cipher(suite: Suite | str) -> str:
    """The TLS 1.3 cipher name for ``suite``: a :class:`Suite`, a suite name or a cipher name."""
    if isinstance(suite, str) and suite in CIPHER_HASH:
        return suite
    if isinstance(suite, str) and suite.startswith("TLS_"):
        raise ConfigurationError(
            f"{suite} cannot carry an external PSK here; use one of {', '.join(CIPHER_HASH)}", field="suite"
        )
    cipher = get_suite(suite).tls_cipher
    if cipher not in CIPHER_HASH:  # pragma: no cover - every registered suite uses one of the two
        raise ConfigurationError(f"suite {suite} is bound to unsupported cipher {cipher}", field="suite")
    return cipher


def check_psk(psk: object, *, field_name: str = "psk") -> bytes:
    """``psk`` as bytes after checking its type and length (never echoes the value)."""
    if not isinstance(psk, (bytes, bytearray, memoryview)):
        raise InvalidKeyMaterial(f"{field_name} must be bytes, not {type(psk).__name__}")
    key = bytes(psk)
    if not MIN_PSK_LEN <= len(key) <= MAX_PSK_LEN:
        raise InvalidKeyMaterial(
            f"{field_name} must be {MIN_PSK_LEN}..{MAX_PSK_LEN} bytes long, got {len(key)} bytes"
        )
    return key


def check_identity(identity: object, *, max_len: int = MAX_IDENTITY_LEN) -> bytes:
    """``identity`` (bytes, or str encoded as UTF-8) after checking it is 1..max_len bytes."""
    if isinstance(identity, str):
        identity = identity.encode("utf-8")
    if not isinstance(identity, (bytes, bytearray, memoryview)):
        raise ConfigurationError(f"must be bytes or str, not {type(identity).__name__}", field="identity")
    ident = bytes(identity)
    if not 1 <= len(ident) <= max_len:
        raise ConfigurationError(f"must be 1..{max_len} bytes long, got {len(ident)}", field="identity")
    return ident


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def psk_session_pem(psk: bytes, suite: Suite | str) -> str:
    """An external PSK as an OpenSSL ``SSL SESSION PARAMETERS`` PEM, for ``openssl s_client
    -psk_session FILE`` / ``s_server -psk_session FILE``.

    The tools' ``-psk HEX`` always binds the key to SHA-256 (TLS_AES_128_GCM_SHA256); a session file
    also names the cipher suite, which is how a SHA-384 PSK reaches them.  The file holds the key:
    treat it as a secret.  Encoding: OpenSSL's SSL_SESSION ASN.1 (ssl/ssl_asn1.c) with version 1,
    TLS 1.3, the suite's 2-byte code, an empty session ID and the PSK as master key.
    """
    key = check_psk(psk)
    cipher = resolve_cipher(suite)
    body = _der(0x02, b"\x01") + _der(0x02, b"\x03\x04") + _der(0x04, CIPHER_ID[cipher]) + _der(0x04, b"") \
        + _der(0x04, key)
    text = base64.encodebytes(_der(0x30, body)).decode("ascii")
    return f"-----BEGIN SSL SESSION PARAMETERS-----\n{text}-----END SSL SESSION PARAMETERS-----\n"


def normalize_group(name: str) -> str:
    """A canonical, case-insensitive spelling of an OpenSSL group name."""
    low = name.strip().lower()
    return _ALIASES.get(low, low)


def group_names(groups: str | Sequence[str]) -> tuple[str, ...]:
    """The group names in an OpenSSL group list, without the ``*``/``?`` prefixes and tuple
    separators of OpenSSL >= 3.5 (``"*X25519MLKEM768 / *X25519"`` -> both names)."""
    text = groups if isinstance(groups, str) else ":".join(groups)
    names: list[str] = []
    for raw in text.replace("/", ":").split(":"):
        name = raw.strip().lstrip("*?-").strip()
        if name and name.upper() != "DEFAULT":
            names.append(name)
    if not names:
        raise ConfigurationError("no key-exchange group given", field="groups")
    return tuple(names)


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What a verified TLS 1.3 external-PSK handshake negotiated. Holds no secrets."""

    #: ``"client"`` or ``"server"``.
    role: Literal["client", "server"]
    #: Always ``"TLSv1.3"`` (verification rejects anything else).
    version: str
    #: The TLS 1.3 cipher suite, e.g. ``"TLS_AES_128_GCM_SHA256"``.
    cipher: str
    #: The (EC)DHE / hybrid group, e.g. ``"X25519MLKEM768"`` or ``"x25519"``; ``None`` only where the
    #: TLS library cannot report it (the stdlib adapter before Python 3.15).
    group: str | None
    #: The external PSK identity that was used (public: it travels in clear in the ClientHello).
    psk_identity: bytes | None = field(default=None)

    @property
    def post_quantum(self) -> bool:
        """Whether the (EC)DHE part itself was post-quantum hybrid (X25519MLKEM768 or ML-KEM)."""
        return self.group is not None and "mlkem" in self.group.lower()
