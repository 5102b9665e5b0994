"""Key derivation: HKDF (RFC 5869), the SP 800-56C one-step KDF, KMAC, and the ETSI TS 103 744
V1.2.1 hybrid combiners CatKDF (section 8.2) and CasKDF (section 8.3).

Definitions follow the standard (and its informative reference code, which generates the
published vectors):

* context function ``f(context, MA, MB)``: ``H(lp(context) || lp(MA) || lp(MB))`` for the HKDF and
  HMAC variants, ``lp(context) || lp(MA) || lp(MB)`` for KMAC (``lp`` = u32 big-endian length prefix);
* ``KDF_HKDF(secret, label, ctx, L)`` = HKDF with salt = ``label``, IKM = ``secret``, info = ``ctx``;
* ``KDF_HMAC`` = SP 800-56C one-step: ``K(i) = HMAC(label, u32(i) || secret || ctx)``;
* ``KDF_KMAC`` = ``KMAC(key=label, u32(1) || secret || ctx, L, S="KDF")``;
* ``PRF(key, k, MA, MB)`` = ``HMAC(key, f(k, MA, MB))`` or ``KMAC(key, f(k, MA, MB), |chain|, S="")``;
* CatKDF: ``KDF(psk || k1 || ... || kn, label, f(context, MA, MB), L)``;
* CasKDF: ``chain_0 = psk``; per round ``r_i = PRF(chain_{i-1}, k_i, MA_i, MB_i)``,
  ``chain_i || key_i = KDF(r_i, label_i, context, |chain| + L)``; output ``key_n``.

Everything here works on bytes and returns bytes: these are building blocks with no policy.  Use
:func:`hybridkex.combine` unless you are implementing a protocol.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from ..exceptions import ConfigurationError
from . import _keccak
from .encoding import lp_join, u32

__all__ = [
    "KDF_NAMES",
    "CasRound",
    "CatKDF",
    "cas_kdf",
    "cat_kdf",
    "context_function",
    "etsi_kdf",
    "etsi_prf",
    "hkdf",
    "hkdf_expand",
    "hkdf_extract",
    "hmac_digest",
    "kmac",
    "onestep_hmac_kdf",
]

HashName = Literal["sha256", "sha384"]
KDFName = Literal["hkdf-sha256", "hkdf-sha384", "hmac-sha256", "hmac-sha384", "kmac128", "kmac256"]

#: The KDF names accepted by :func:`cat_kdf` and :func:`cas_kdf`.
KDF_NAMES: tuple[str, ...] = ("hkdf-sha256", "hkdf-sha384", "hmac-sha256", "hmac-sha384", "kmac128", "kmac256")

# SHA-1 and SHA-512 are accepted by the bare HKDF functions only (RFC 5869 vectors, other protocols);
# the combiners take SHA-256 or SHA-384.
_HASH_LEN = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
#: Chain-secret length for CasKDF: the hash length, or 32/48 bytes for KMAC128/256.
_CHAIN_LEN = {"hkdf-sha256": 32, "hkdf-sha384": 48, "hmac-sha256": 32, "hmac-sha384": 48, "kmac128": 32, "kmac256": 48}


def _hash_len(hash_name: str) -> int:
    try:
        return _HASH_LEN[hash_name]
    except KeyError:
        raise ConfigurationError(f"unsupported hash {hash_name!r}; use one of {', '.join(_HASH_LEN)}") from None


def _check_kdf(kdf: str) -> None:
    if kdf not in _CHAIN_LEN:
        raise ConfigurationError(f"unsupported KDF {kdf!r}; choose one of {', '.join(KDF_NAMES)}")


def _check_length(length: int, limit: int) -> None:
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= limit:
        raise ConfigurationError(f"output length must be an integer in 1..{limit}, got {length!r}")


# --- HKDF (RFC 5869) -------------------------------------------------------------------------------


_CONSTRUCTORS: dict[str, Callable[..., hashlib._Hash]] = {
    "sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512,
}
_BLOCK = {"sha1": 64, "sha256": 64, "sha384": 128, "sha512": 128}


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def hmac_digest(hash_name: str, key: bytes, msg: bytes) -> bytes:
    """HMAC (RFC 2104) of ``msg``, byte-identical to ``hmac.digest(key, msg, hash_name)``.

    Built from hashlib: OpenSSL's one-shot HMAC costs twice as much per call on the short inputs
    of a handshake (it sets up an HMAC context each time).  The padded keys are temporaries, never
    kept.
    """
    ctor = _CONSTRUCTORS[hash_name]
    block = _BLOCK[hash_name]
    if len(key) > block:
        key = ctor(key).digest()
    key = key.ljust(block, b"\x00")
    return ctor(key.translate(_OPAD) + ctor(key.translate(_IPAD) + msg).digest()).digest()


@lru_cache(maxsize=64)
def _public_key_pads(hash_name: str, key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """HMAC inner/outer states for a *public* key (an HKDF salt/label), computed once.

    Only ever called with public values: caching a secret key here would keep it alive.
    """
    ctor = _CONSTRUCTORS[hash_name]
    block = _BLOCK[hash_name]
    if len(key) > block:
        key = ctor(key).digest()
    key = key.ljust(block, b"\x00")
    return ctor(bytes(b ^ 0x36 for b in key)), ctor(bytes(b ^ 0x5C for b in key))


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract. An empty salt is HashLen zero bytes, as RFC 5869 specifies (HMAC pads alike).

    The salt is public by definition, so its HMAC pads are cached; this keeps the combiner cheap.
    """
    _hash_len(hash_name)
    inner, outer = _public_key_pads(hash_name, bytes(salt))
    i = inner.copy()
    i.update(ikm)
    o = outer.copy()
    o.update(i.digest())
    return o.digest()


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand to ``length`` bytes (at most 255 * HashLen)."""
    hash_len = _hash_len(hash_name)
    _check_length(length, 255 * hash_len)
    if len(prk) < hash_len:
        raise ConfigurationError(f"HKDF PRK must be at least {hash_len} bytes")
    if length <= hash_len:  # the common case: one block, no loop
        return hmac_digest(hash_name, prk, info + b"\x01")[:length]
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac_digest(hash_name, prk, block + info + bytes((counter,)))
        out += block
        counter += 1
    return bytes(out[:length])


def hkdf(hash_name: str, *, salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Extract then HKDF-Expand (RFC 5869)."""
    return hkdf_expand(hash_name, hkdf_extract(hash_name, salt, ikm), info, length)


# --- SP 800-56C Rev. 2 one-step KDF with HMAC, and KMAC --------------------------------------------


def onestep_hmac_kdf(hash_name: str, *, secret: bytes, salt: bytes, fixed_info: bytes, length: int) -> bytes:
    """SP 800-56C one-step KDF, HMAC option: ``K(i) = HMAC(salt, u32(i) || secret || fixed_info)``."""
    hash_len = _hash_len(hash_name)
    _check_length(length, (2**32 - 1) * hash_len)
    out = bytearray()
    counter = 1
    while len(out) < length:
        out += hmac.digest(salt, u32(counter) + secret + fixed_info, hash_name)
        counter += 1
    return bytes(out[:length])


def kmac(bits: int, *, key: bytes, data: bytes, length: int, customization: bytes = b"") -> bytes:
    """KMAC128 or KMAC256 (NIST SP 800-185) with a ``length``-byte output."""
    if bits not in (128, 256):
        raise ConfigurationError("KMAC strength must be 128 or 256")
    _check_length(length, 2**20)
    return _keccak.kmac(bits, key, data, length, customization)


# --- ETSI TS 103 744 building blocks -----------------------------------------------------------------


def _kdf_hash(kdf: str) -> str:
    return kdf.split("-", 1)[1]


def context_function(kdf: str, a1: bytes, a2: bytes, a3: bytes) -> bytes:
    """ETSI TS 103 744 section 7.2: ``f_ch`` (hashed) for HKDF/HMAC, ``f_c`` (plain) for KMAC."""
    _check_kdf(kdf)
    if kdf.startswith("kmac"):
        return lp_join(a1, a2, a3)
    # Hash the length-prefixed fields as a stream: MA and MB are kilobytes, so no joined copy.
    h = _CONSTRUCTORS[_kdf_hash(kdf)]()
    for field_ in (a1, a2, a3):
        h.update(u32(len(field_)))
        h.update(field_)
    return h.digest()


def etsi_kdf(kdf: str, *, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """ETSI TS 103 744 section 7.4: ``KDF(secret, label, context, L)``."""
    _check_kdf(kdf)
    if kdf.startswith("hkdf-"):
        return hkdf(_kdf_hash(kdf), salt=label, ikm=secret, info=context, length=length)
    if kdf.startswith("hmac-"):
        return onestep_hmac_kdf(_kdf_hash(kdf), secret=secret, salt=label, fixed_info=context, length=length)
    return kmac(int(kdf[4:]), key=label, data=u32(1) + secret + context, length=length, customization=b"KDF")


def etsi_prf(kdf: str, *, key: bytes, secret: bytes, ma: bytes, mb: bytes) -> bytes:
    """ETSI TS 103 744 section 7.3: the CasKDF round PRF keyed with the previous chain secret."""
    _check_kdf(kdf)
    message = context_function(kdf, secret, ma, mb)
    if kdf.startswith("kmac"):
        return kmac(int(kdf[4:]), key=key, data=message, length=_CHAIN_LEN[kdf])
    return hmac.digest(key, message, _kdf_hash(kdf))


# --- The combiners -------------------------------------------------------------------------------------


def _as_bytes(value: object, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}")


def cat_kdf(
    secrets: Sequence[bytes],
    *,
    ma: bytes,
    mb: bytes,
    context: bytes,
    label: bytes,
    length: int,
    kdf: str = "hkdf-sha256",
    psk: bytes = b"",
) -> bytes:
    """ETSI TS 103 744 CatKDF: ``KDF(psk || k_1 || ... || k_n, label, f(context, MA, MB), length)``.

    ``secrets`` are the component shared secrets in order (k1 = ECDH, k2 = KEM in the standard's
    examples).  ``ma``/``mb`` are the public messages of party A and B, taken as raw bytes.
    """
    _check_kdf(kdf)
    if not secrets:
        raise ConfigurationError("CatKDF needs at least one component secret")
    ikm = _as_bytes(psk, "psk") + b"".join(_as_bytes(s, "secret") for s in secrets)
    ctx = context_function(kdf, _as_bytes(context, "context"), _as_bytes(ma, "ma"), _as_bytes(mb, "mb"))
    return etsi_kdf(kdf, secret=ikm, label=_as_bytes(label, "label"), context=ctx, length=length)


class CatKDF:
    """:func:`cat_kdf` with the inputs many derivations share taken once: ``ma``, ``mb``, ``label``,
    ``length`` and the KDF (public values only).  ``derive(ikm, context)`` equals
    ``cat_kdf((ikm,), ma=ma, mb=mb, context=context, label=label, length=length, kdf=kdf)``, where
    ``ikm`` is ``psk || k_1 || ... || k_n``.

    For the HKDF KDFs, the encoded ``lp(MA) || lp(MB)`` and the label's HMAC states are kept, so a
    derivation is one context hash and two HMACs; the other KDFs take :func:`cat_kdf` itself.
    """

    __slots__ = ("_args", "_hash", "_inner", "_len", "_outer", "_tail")

    def __init__(self, *, ma: bytes, mb: bytes, label: bytes, length: int, kdf: str = "hkdf-sha256") -> None:
        _check_kdf(kdf)
        ma, mb, label = _as_bytes(ma, "ma"), _as_bytes(mb, "mb"), _as_bytes(label, "label")
        self._args = (ma, mb, label, length, kdf)
        self._hash: str | None = None
        if kdf.startswith("hkdf-"):
            hash_name = _kdf_hash(kdf)
            _check_length(length, 255 * _hash_len(hash_name))
            self._hash = hash_name
            self._inner, self._outer = _public_key_pads(hash_name, label)
            self._tail = lp_join(ma, mb)
            self._len = length

    def derive(self, ikm: bytes, context: bytes) -> bytes:
        """The CatKDF output for the concatenated secrets ``ikm`` and this derivation's ``context``."""
        hash_name = self._hash
        if hash_name is None:
            ma, mb, label, length, kdf = self._args
            return cat_kdf((ikm,), ma=ma, mb=mb, context=context, label=label, length=length, kdf=kdf)
        ctor = _CONSTRUCTORS[hash_name]
        # f_ch(context, MA, MB) = H(lp(context) || lp(MA) || lp(MB)), the last two encoded once.
        ctx = ctor(u32(len(context)) + context + self._tail).digest()
        i = self._inner.copy()  # HKDF-Extract(salt = label, IKM), as hkdf_extract
        i.update(ikm)
        o = self._outer.copy()
        o.update(i.digest())
        return hkdf_expand(hash_name, o.digest(), ctx, self._len)


@dataclass(frozen=True, slots=True)
class CasRound:
    """One CasKDF round: the component secret and the public messages and label of that exchange."""

    secret: bytes = field(repr=False)
    ma: bytes
    mb: bytes
    label: bytes


def cas_kdf(
    rounds: Sequence[CasRound],
    *,
    context: bytes,
    length: int,
    kdf: str = "hkdf-sha256",
    psk: bytes = b"",
) -> tuple[bytes, bytes]:
    """ETSI TS 103 744 CasKDF; returns ``(key_n, chain_n)``.

    The chain secret lets a later exchange continue the cascade (a ratchet); treat it as secret.
    For KMAC an empty ``psk`` starts the chain from zero bytes of chain length, as the reference
    code does (OpenSSL rejects KMAC keys shorter than 4 bytes).
    """
    _check_kdf(kdf)
    if not rounds:
        raise ConfigurationError("CasKDF needs at least one round")
    chain_len = _CHAIN_LEN[kdf]
    chain = _as_bytes(psk, "psk")
    if kdf.startswith("kmac") and not chain:
        chain = bytes(chain_len)
    key = b""
    for r in rounds:
        round_secret = etsi_prf(kdf, key=chain, secret=r.secret, ma=r.ma, mb=r.mb)
        # The round's public values entered through the PRF; the KDF takes the context as it is.
        out = etsi_kdf(kdf, secret=round_secret, label=r.label, context=context, length=chain_len + length)
        chain, key = out[:chain_len], out[chain_len:]
    return key, chain
