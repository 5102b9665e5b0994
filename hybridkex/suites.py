"""Cipher suites as data.

A suite name fixes every algorithm of an exchange (the two KEMs, whether a QKD key is mixed in, the
KDF and hash, the input order of the combiner, the TLS 1.3 cipher the PSK is bound to) and is the
root of domain separation: it is hashed into every label, so outputs of different suites can never
coincide.  Look suites up with :func:`get_suite`; never build them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .exceptions import ConfigurationError

__all__ = ["DEFAULT_SUITE", "RETIRED", "SUITES", "Suite", "get_suite", "suite_by_code", "unknown_suite"]

Ordering = Literal["etsi", "sp800-56c"]


@dataclass(frozen=True, slots=True)
class Suite:
    """One hybridkex suite. Instances live in :data:`SUITES`; compare them by ``name``."""

    #: The suite's name, e.g. ``"x25519-mlkem768-qkd-hkdfsha256"``.
    name: str
    #: 16-bit code point on the wire.
    code: int
    #: The classical component (ETSI k1).
    classical_kem: str
    #: The post-quantum component (ETSI k2).
    pq_kem: str
    #: Whether a QKD key is a component (ETSI CatKDF ``psk``).
    qkd: bool
    #: ETSI TS 103 744 KDF name used by CatKDF.
    kdf: str
    #: Hash of the KDF and of the TLS 1.3 PSK.
    hash: Literal["sha256", "sha384"]
    #: "etsi": IKM = k_qkd || ss_X25519 || ss_PQ (CatKDF with psk = QKD key);
    #: "sp800-56c": IKM = ss_PQ || ss_X25519 || k_qkd (approved secret Z first, Z' = Z || T).
    ordering: Ordering
    #: TLS 1.3 cipher suite the external PSK is bound to (its hash must equal ``hash``).
    tls_cipher: str
    #: Size of the QKD key taken per handshake, in bits (ETSI 014 ``size``); 0 without QKD.
    qkd_key_bits: int = 0
    #: Backend the PQ KEM comes from by default.
    backend: str = "cryptography"
    #: Length of the post-quantum KEM's shared secret in bytes (ETSI k2): 32 for ML-KEM, HQC and
    #: Classic McEliece; FrodoKEM's is its security level (16 for -640, 24 for -976). Data here, so
    #: the combiner checks it without loading the KEM's backend.
    pq_secret_bytes: int = 32

    @property
    def hash_len(self) -> int:
        return 32 if self.hash == "sha256" else 48

    @property
    def label(self) -> bytes:
        """The suite's name as bytes: the root of every label derived under it."""
        return self.name.encode("ascii")

    def without_qkd(self) -> Suite:
        """The sibling suite with the same algorithms and no QKD component."""
        if not self.qkd:
            return self
        for s in SUITES.values():
            same_algorithms = (s.classical_kem, s.pq_kem, s.kdf, s.ordering) == (
                self.classical_kem, self.pq_kem, self.kdf, self.ordering)
            if not s.qkd and same_algorithms:
                return s
        raise ConfigurationError(f"suite {self.name} has no sibling without QKD")

    def __str__(self) -> str:
        return self.name


def _suite(name: str, code: int, pq: str, qkd: bool, sha: Literal["sha256", "sha384"], *,
           ordering: Ordering = "etsi", backend: str = "cryptography", pq_secret_bytes: int = 32) -> Suite:
    return Suite(
        name=name,
        code=code,
        classical_kem="X25519",
        pq_kem=pq,
        qkd=qkd,
        kdf=f"hkdf-{sha}",
        hash=sha,
        ordering=ordering,
        tls_cipher="TLS_AES_128_GCM_SHA256" if sha == "sha256" else "TLS_AES_256_GCM_SHA384",
        qkd_key_bits=256 if qkd else 0,
        backend=backend,
        pq_secret_bytes=pq_secret_bytes,
    )


#: Every suite hybridkex knows, by name. The first is the default.
SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        _suite("x25519-mlkem768-qkd-hkdfsha256", 0x0001, "ML-KEM-768", True, "sha256"),
        _suite("x25519-mlkem1024-qkd-hkdfsha384", 0x0002, "ML-KEM-1024", True, "sha384"),
        _suite("x25519-mlkem768-hkdfsha256", 0x0003, "ML-KEM-768", False, "sha256"),
        _suite("x25519-mlkem1024-hkdfsha384", 0x0004, "ML-KEM-1024", False, "sha384"),
        _suite("mlkem768-x25519-qkd-hkdfsha256-sp80056c", 0x0005, "ML-KEM-768", True, "sha256", ordering="sp800-56c"),
        _suite("mlkem768-x25519-hkdfsha256-sp80056c", 0x0006, "ML-KEM-768", False, "sha256", ordering="sp800-56c"),
        # Suites whose post-quantum KEM only liboqs provides (optional extra [oqs]). For a user who
        # distrusts lattices: HQC (code-based) or FrodoKEM-976 (plain LWE, no ring or module structure),
        # each still with X25519 and QKD. Code 0x0102 was x25519-hqc128-qkd-hkdfsha256: retired.
        _suite("x25519-frodokem640aes-qkd-hkdfsha256", 0x0101, "FrodoKEM-640-AES", True, "sha256", backend="liboqs",
               pq_secret_bytes=16),
        _suite("x25519-frodokem976aes-qkd-hkdfsha384", 0x0103, "FrodoKEM-976-AES", True, "sha384", backend="liboqs",
               pq_secret_bytes=24),
        _suite("x25519-hqc1-qkd-hkdfsha256", 0x0104, "HQC-1", True, "sha256", backend="liboqs"),
        _suite("x25519-hqc3-qkd-hkdfsha384", 0x0105, "HQC-3", True, "sha384", backend="liboqs"),
    )
}

#: Suites that were removed, and what to use instead.
RETIRED: dict[str, str] = {
    "x25519-hqc128-qkd-hkdfsha256":
        "liboqs 0.16 has no HQC-128 (HQC is now HQC-1/-3/-5); use x25519-hqc1-qkd-hkdfsha256",
}

DEFAULT_SUITE: Suite = SUITES["x25519-mlkem768-qkd-hkdfsha256"]

_BY_CODE = {s.code: s for s in SUITES.values()}


def get_suite(name: str | Suite) -> Suite:
    """The suite called ``name`` (a :class:`Suite` passes through)."""
    if isinstance(name, Suite):
        return name
    try:
        return SUITES[name]
    except KeyError:
        raise ConfigurationError(unknown_suite(name), field="suite") from None


def unknown_suite(name: str) -> str:
    """Why ``name`` is not a suite, in one line (a retired suite says what replaces it)."""
    if name in RETIRED:
        return f"suite {name!r} was removed: {RETIRED[name]}"
    return f"unknown suite {name!r}; known suites: {', '.join(SUITES)}"


def suite_by_code(code: int) -> Suite | None:
    """The suite with wire code ``code``, or None."""
    return _BY_CODE.get(code)
