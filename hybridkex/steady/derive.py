"""The steady state's derivations (docs/spec.md, "Steady state"): pure functions, no state.

A parent session (one full, authenticated hybrid handshake with combined secret ``S``) gives both
ends::

    handle = derive(S, "steady state handle", 16)                  # public: names the parent
    A      = derive(S, "steady state authentication key", HashLen)  # secret: recycled from QKD-mixed output

Steady-state connection number ``i`` (1, 2, ...) is one TLS 1.3 handshake whose PSK identity is::

    body     = handle || u32(i) || u8(flags) || u8(n) || n key IDs || u8(m) || m announced key IDs
    tag      = HKDF-Expand(A, lp("hybridkex/v1") || lp(suite) || lp("steady state identity tag") || lp(body), 16)
    identity = "hk1-ss." || base64url(body || tag)                 # printable ASCII, in clear

(a key ID is the 16 bytes of its UUID; ``flags`` bit 0 says the key is the pair's epoch key) and
whose PSK is the ETSI TS 103 744 CatKDF of the connection's QKD key and ``A``::

    psk = CatKDF(psk = k_qkd, k1 = A,
                 MA = lp("hybridkex/v1 initiator") || lp(client identity),
                 MB = lp("hybridkex/v1 responder") || lp(server identity),
                 context = lp("hybridkex/v1 steady state psk") || lp(body) || lp(QKD binding or empty),
                 label = "hybridkex/v1 CatKDF steady " || suite, length = HashLen)

The QKD binding names the key IDs used and the ETSI roles of the steady state (the client is the
master), with both SAE and KME IDs.  TLS then runs psk_dhe_ke over X25519MLKEM768, so the traffic
keys depend on this PSK *and* a fresh ML-KEM and X25519 secret.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

from ..combiner import CombinedSecret, QKDBinding
from ..exceptions import ConfigurationError, RemoteProtocolError
from ..hazmat import labels
from ..hazmat.encoding import b64url, b64url_decode, lp_join, u8, u32
from ..hazmat.kdf import CatKDF, cat_kdf, hkdf_expand
from ..suites import Suite

__all__ = [
    "HANDLE_LEN",
    "MAX_ANNOUNCED",
    "MAX_USED",
    "PskContext",
    "SteadyIdentity",
    "auth_key",
    "identity_tag",
    "parse_identity",
    "steady_handle",
    "steady_psk",
]

HANDLE_LEN: Final = 16
TAG_LEN: Final = 16
#: QKD keys one steady-state connection may use, and key IDs it may announce (bounded identities).
MAX_USED: Final = 4
MAX_ANNOUNCED: Final = 8
FLAG_EPOCH: Final = 0x01
_FLAGS: Final = FLAG_EPOCH
#: The shortest body: handle, counter, flags, two empty key-ID lists.
_MIN_BODY: Final = HANDLE_LEN + 4 + 1 + 1 + 1
_MAX_RAW: Final = _MIN_BODY + 16 * (MAX_USED + MAX_ANNOUNCED) + TAG_LEN
_ROLE_I: Final = labels.PROTOCOL + b" initiator"
_ROLE_R: Final = labels.PROTOCOL + b" responder"


def steady_handle(secret: CombinedSecret) -> bytes:
    """The public 16-byte handle that names a parent session in its steady-state identities."""
    return secret.derive(labels.STEADY_HANDLE, HANDLE_LEN)


def auth_key(secret: CombinedSecret) -> bytes:
    """The parent's steady-state authentication key ``A`` (HashLen bytes; secret)."""
    return secret.derive(labels.STEADY_AUTH_KEY, secret.suite.hash_len)


def _id_bytes(key_id: str) -> bytes:
    # QKDKey already insists on the canonical UUID text; a hex decode is what is left to do, and
    # several times cheaper than uuid.UUID on this per-connection path.
    try:
        if len(key_id) == 36 and key_id[8] == key_id[13] == key_id[18] == key_id[23] == "-":
            return bytes.fromhex(key_id.replace("-", ""))
    except (ValueError, TypeError):
        pass
    raise ConfigurationError(f"QKD key ID {key_id!r} is not a UUID; the steady state announces UUIDs only",
                             field="key_id")


def _ids_text(body: bytes, at: int, n: int) -> tuple[str, ...]:
    """The ``n`` 16-byte key IDs at ``at`` as UUID text: one hex() for all (up to nine per connection)."""
    if not n:
        return ()
    h = body[at:at + 16 * n].hex()
    # List comprehensions, not generators, on this path: a generator costs more than the one or two IDs.
    return tuple([f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
                  for i in range(0, 32 * n, 32)])


@dataclass(frozen=True, slots=True)
class SteadyIdentity:
    """The public content of a steady-state PSK identity."""

    handle: bytes
    index: int
    epoch: bool
    #: The QKD key IDs this connection's PSK uses (canonical UUID text); empty: no QKD key.
    used: tuple[str, ...]
    #: Key IDs the client (ETSI master) reserved for later connections: the server fetches them
    #: by ID in the background once this connection is authenticated.
    announced: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.handle) != HANDLE_LEN or not 1 <= self.index < 2**32:
            raise ConfigurationError("a steady-state identity needs a 16-byte handle and a counter 1..2^32-1")
        if len(self.used) > MAX_USED or len(self.announced) > MAX_ANNOUNCED:
            raise ConfigurationError(f"a steady-state identity carries at most {MAX_USED} used and "
                                     f"{MAX_ANNOUNCED} announced key IDs")

    def body(self) -> bytes:
        """The bytes the tag authenticates and the PSK binds (everything but the tag)."""
        return b"".join((
            self.handle, u32(self.index), u8(FLAG_EPOCH if self.epoch else 0),
            u8(len(self.used)), *[_id_bytes(k) for k in self.used],
            u8(len(self.announced)), *[_id_bytes(k) for k in self.announced],
        ))

    def encode(self, key: bytes, suite: Suite, body: bytes | None = None) -> bytes:
        """The TLS PSK identity (printable ASCII), tagged under the parent's key ``A`` (``body``:
        :meth:`body`, when the caller has it already)."""
        body = self.body() if body is None else body
        return labels.STEADY_IDENTITY_PREFIX + b64url(body + identity_tag(key, suite, body))


_TAG_PREFIX: dict[str, bytes] = {}


def identity_tag(key: bytes, suite: Suite, body: bytes) -> bytes:
    """The 16-byte tag of an identity body under the parent's authentication key."""
    prefix = _TAG_PREFIX.get(suite.name)
    if prefix is None:  # lp(protocol) || lp(suite) || lp(tag label): the same for every identity of a suite
        prefix = _TAG_PREFIX[suite.name] = lp_join(labels.PROTOCOL, suite.label, labels.STEADY_IDENTITY_TAG)
    return hkdf_expand(suite.hash, key, prefix + u32(len(body)) + body, TAG_LEN)


def check_tag(key: bytes, suite: Suite, body: bytes, tag: bytes) -> bool:
    """Whether ``tag`` is the body's tag (constant time)."""
    return hmac.compare_digest(tag, identity_tag(key, suite, body))


def _decoded_len(n: int) -> int | None:
    if n % 4 == 1:
        return None
    return n * 3 // 4


def parse_identity(identity: bytes) -> tuple[SteadyIdentity, bytes, bytes] | None:
    """``(content, body, tag)`` of a well-formed steady-state identity, else None (never raises).

    Strict: the exact prefix, the canonical base64url of a body whose lengths add up exactly, and
    no unknown flag.
    """
    prefix = labels.STEADY_IDENTITY_PREFIX
    if not isinstance(identity, bytes) or not identity.startswith(prefix):
        return None
    text = identity[len(prefix):]
    length = _decoded_len(len(text))
    if length is None or not _MIN_BODY + TAG_LEN <= length <= _MAX_RAW:
        return None
    try:
        raw = b64url_decode(text, length)
    except RemoteProtocolError:
        return None
    body, tag = raw[:-TAG_LEN], raw[-TAG_LEN:]
    # Plain offsets (this runs once per connection): handle, counter, flags, then two counted lists.
    n_used = body[HANDLE_LEN + 5]
    at = HANDLE_LEN + 6 + 16 * n_used
    if at >= len(body):
        return None
    n_ann = body[at]
    if at + 1 + 16 * n_ann != len(body) or n_used > MAX_USED or n_ann > MAX_ANNOUNCED:
        return None
    flags = body[HANDLE_LEN + 4]
    index = int.from_bytes(body[HANDLE_LEN:HANDLE_LEN + 4], "big")
    if flags & ~_FLAGS or index == 0:
        return None
    used = _ids_text(body, HANDLE_LEN + 6, n_used)
    announced = _ids_text(body, at + 1, n_ann)
    content = SteadyIdentity(body[:HANDLE_LEN], index, bool(flags & FLAG_EPOCH), used, announced)
    return content, body, tag


def steady_psk(suite: Suite, *, key: bytes, qkd_key: bytes, body: bytes, binding: QKDBinding | None,
               client_identity: str, server_identity: str) -> bytes:
    """The TLS PSK of one steady-state connection (HashLen bytes)."""
    return cat_kdf(
        (key,),
        psk=qkd_key,
        ma=lp_join(_ROLE_I, client_identity.encode("utf-8")),
        mb=lp_join(_ROLE_R, server_identity.encode("utf-8")),
        context=lp_join(labels.STEADY_PSK_CONTEXT, body, binding.encode() if binding is not None else b""),
        label=labels.steady_label(suite.label),
        length=suite.hash_len,
        kdf=suite.kdf,
    )


class PskContext:
    """What every steady-state PSK of one parent shares, encoded once: MA, MB, the CatKDF label and
    the QKD binding's SAE/KME part (the same bytes :func:`steady_psk` builds per call), and the
    CatKDF prepared with them (:class:`~hybridkex.hazmat.kdf.CatKDF`)."""

    __slots__ = ("_cat", "_tail", "label", "ma", "mb")

    def __init__(self, suite: Suite, *, client_identity: str, server_identity: str,
                 qkd_ids: tuple[str, str, str, str] | None) -> None:
        """``qkd_ids``: (master SAE, slave SAE, master KME, slave KME) of the steady state, or None."""
        self.ma = lp_join(_ROLE_I, client_identity.encode("utf-8"))
        self.mb = lp_join(_ROLE_R, server_identity.encode("utf-8"))
        self.label = labels.steady_label(suite.label)
        self._tail = lp_join(*(x.encode("utf-8") for x in qkd_ids)) if qkd_ids is not None else None
        self._cat = CatKDF(ma=self.ma, mb=self.mb, label=self.label, length=suite.hash_len, kdf=suite.kdf)

    def psk(self, *, key: bytes, qkd_key: bytes, body: bytes, key_ids: tuple[str, ...]) -> bytes:
        """The PSK of the connection whose identity body is ``body`` and whose QKD keys are ``key_ids``."""
        binding = b""
        if key_ids and self._tail is not None:  # QKDBinding.encode(), with its constant part made once
            binding = lp_join(lp_join(*[k.encode("ascii") for k in key_ids])) + self._tail
        return self._cat.derive(qkd_key + key, lp_join(labels.STEADY_PSK_CONTEXT, body, binding))
