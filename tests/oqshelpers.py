"""What the tests that need the real liboqs share: the skip marker, and liboqs's own KAT procedure.

liboqs checks every KEM against its published known-answer tests with ``tests/kat_kem.c``: seed a
deterministic generator, draw a 48-byte seed, reseed with it, then keypair and encapsulate, printing
``count``/``seed``/``pk``/``sk``/``ct``/``ss`` as in the NIST ``.rsp`` files; the SHA-256 of that text
is listed in ``tests/KATs/kem/kats.json`` ("single"). The generators it uses (the NIST AES-256
CTR_DRBG, and SHAKE256 for HQC) live in liboqs's test helpers, not in liboqs.so, so they are written
here and plugged in with ``OQS_randombytes_custom_algorithm``.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hybridkex.hazmat.kem import oqs_library_path

HOW_TO_GET_LIBOQS = (
    "liboqs shared library not found: build it with ../shared/vendor/build-liboqs.sh (next to the checkout) "
    "or any liboqs >= 0.16 with -DBUILD_SHARED_LIBS=ON, then export OQS_INSTALL_PATH=<its prefix> "
    "(README.md, 'Optional: liboqs')"
)
needs_liboqs = pytest.mark.skipif(oqs_library_path() is None, reason=HOW_TO_GET_LIBOQS)

#: SHA-256 of kat_kem's output ("single") from liboqs 0.16.0's tests/KATs/kem/kats.json
#: (vendor tarball liboqs-0.16.0-8979276.tar.gz).
KAT_SINGLE_SHA256 = {
    "ML-KEM-768": "5352539586b6c3df58be6158a6250aeff402bd73060b0a3de68850ac074c17c3",
    "ML-KEM-1024": "f580d851e5fb27e6876e5e203fa18be4cdbfd49e05d48fec3d3992c8f43a13e6",
    "FrodoKEM-640-AES": "8ce8c56597888db8bebc27854a48444c504bdecf80599e11d03372f582adb900",
    "FrodoKEM-976-AES": "b0a421f4a94706bb1b124cc7d8acaffe194731f6c3d76a378c078749626fe47d",
    "HQC-1": "0f1f4fd014b32492ec6490d2ad9e9f75ccc0c2b27d72f34918c7f73f9698c2e4",
    "HQC-3": "b88d4cfe517446854b5d3c85e6602518a526c5eb95571348ce4ab5915faa05b6",
    "Classic-McEliece-348864": "6f0f50626df15ce403c0c1d5f91648245282afebcac90e5db3595ce9b20b1817",
}


class NistDrbg:
    """The NIST PQC AES-256 CTR_DRBG without derivation function (rng.c of the submission packages)."""

    def __init__(self, entropy: bytes) -> None:
        assert len(entropy) == 48
        self.key, self.v = bytes(32), bytes(16)
        self._update(entropy)

    def _block(self) -> bytes:
        self.v = ((int.from_bytes(self.v, "big") + 1) % (1 << 128)).to_bytes(16, "big")
        enc = Cipher(algorithms.AES(self.key), modes.ECB()).encryptor()
        return enc.update(self.v) + enc.finalize()

    def _update(self, provided: bytes | None) -> None:
        temp = b"".join(self._block() for _ in range(3))
        if provided is not None:
            temp = bytes(a ^ b for a, b in zip(temp, provided, strict=True))
        self.key, self.v = temp[:32], temp[32:]

    def read(self, n: int) -> bytes:
        out = b"".join(self._block() for _ in range((n + 15) // 16))[:n]
        self._update(None)
        return out


class HqcPrng:
    """HQC's KAT generator: SHAKE256(entropy || 0x00), squeezed as one stream."""

    def __init__(self, entropy: bytes) -> None:
        self._seed, self._pos = entropy + b"\x00", 0

    def read(self, n: int) -> bytes:
        out = hashlib.shake_256(self._seed).digest(self._pos + n)[self._pos:]
        self._pos += n
        return out


_RANDOMBYTES = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)


@contextmanager
def liboqs_randomness(oqs: Any, source: Callable[[int], bytes]) -> Iterator[None]:
    """Make liboqs draw every random byte from ``source`` (process-wide), then restore the system RNG."""

    def fill(buf: Any, n: int) -> None:
        ctypes.memmove(buf, source(n), n)

    callback = _RANDOMBYTES(fill)  # kept referenced until liboqs stops calling it
    native = oqs.native()
    native.OQS_randombytes_custom_algorithm.argtypes = [_RANDOMBYTES]
    native.OQS_randombytes_custom_algorithm(callback)
    try:
        yield
    finally:
        oqs.rand.randombytes_switch_algorithm("system")


def kat_single(oqs: Any, name: str) -> str:
    """kat_kem.c for count 0: the SHA-256 hex digest of its output."""
    prng_class = HqcPrng if name.startswith("HQC-") else NistDrbg
    state = {"prng": prng_class(bytes(range(48)))}
    with liboqs_randomness(oqs, lambda n: state["prng"].read(n)):
        seed = state["prng"].read(48)
        state["prng"] = prng_class(seed)
        with oqs.KeyEncapsulation(name) as kem:
            pk = kem.generate_keypair()
            sk = kem.export_secret_key()
            ct, ss = kem.encap_secret(pk)
    text = "count = 0\n" + "".join(f"{label} = {bytes(value).hex().upper()}\n" for label, value in
                                   (("seed", seed), ("pk", pk), ("sk", sk), ("ct", ct), ("ss", ss)))
    return hashlib.sha256(text.encode()).hexdigest()
