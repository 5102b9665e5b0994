"""Key-encapsulation components behind one interface, so that suites can name them as data.

* ``X25519``: Diffie-Hellman used as a KEM (the "ciphertext" is the encapsulator's ephemeral public
  key); the all-zero shared secret is rejected (RFC 7748 section 6.1).
* ``ML-KEM-768`` / ``ML-KEM-1024`` (FIPS 203) from ``cryptography``: exact length checks on
  encapsulation keys and ciphertexts; the encapsulation-key check of FIPS 203 section 7.2 is done by
  the backend when the key is loaded.
* Algorithms only liboqs has (FrodoKEM, HQC, Classic McEliece) through ``liboqs-python``, loaded only
  after the liboqs shared library is found: ``import oqs`` without it sleeps, tries to download and
  build liboqs and then exits the process, so it is never attempted blindly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from ..exceptions import InvalidKeyMaterial, UnsupportedAlgorithm

__all__ = [
    "KEM",
    "MLKEM",
    "OQSKEM",
    "X25519KEM",
    "KEMPrivateKey",
    "get_kem",
    "kem_names",
    "oqs_library_path",
]


class KEMPrivateKey(ABC):
    """A decapsulation key. Opaque: no ``repr`` of key material, no serialisation."""

    kem: KEM

    @abstractmethod
    def public_bytes(self) -> bytes:
        """The encapsulation (public) key to send to the peer."""

    @abstractmethod
    def decapsulate(self, ciphertext: bytes) -> bytes:
        """Recover the shared secret from the peer's ciphertext."""

    def __repr__(self) -> str:
        return f"<{self.kem.name} private key>"


class KEM(ABC):
    """A key-encapsulation mechanism: generate, encapsulate, decapsulate, with fixed sizes."""

    name: str
    backend: str
    public_key_size: int
    ciphertext_size: int
    shared_secret_size: int

    @abstractmethod
    def generate(self) -> KEMPrivateKey:
        """A fresh key pair."""

    @abstractmethod
    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """``(shared_secret, ciphertext)`` for the holder of ``public_key``."""

    def decapsulate(self, private_key: KEMPrivateKey, ciphertext: bytes) -> bytes:
        if private_key.kem is not self:
            raise InvalidKeyMaterial(f"private key belongs to {private_key.kem.name}, not {self.name}")
        return private_key.decapsulate(ciphertext)

    def _check_len(self, data: bytes, expected: int, what: str) -> bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"{self.name} {what} must be bytes, not {type(data).__name__}")
        if len(data) != expected:
            raise InvalidKeyMaterial(f"{self.name} {what} must be {expected} bytes, got {len(data)}")
        return bytes(data)

    def __repr__(self) -> str:
        return f"<KEM {self.name} ({self.backend})>"


# --- X25519 --------------------------------------------------------------------------------------------

_ZERO32 = bytes(32)


def _x25519_exchange(private: x25519.X25519PrivateKey, public: bytes) -> bytes:
    try:
        secret = private.exchange(x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # cryptography refuses low-order points with ValueError
        raise InvalidKeyMaterial("X25519 peer public key is invalid (low-order point)") from exc
    if secret == _ZERO32:
        raise InvalidKeyMaterial("X25519 shared secret is all zero (RFC 7748 section 6.1)")
    return secret


class _X25519PrivateKey(KEMPrivateKey):
    __slots__ = ("_key", "_public", "kem")

    def __init__(self, kem: X25519KEM, key: x25519.X25519PrivateKey) -> None:
        self.kem = kem
        self._key = key
        self._public = key.public_key().public_bytes_raw()

    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return _x25519_exchange(self._key, self.kem._check_len(ciphertext, 32, "ciphertext"))


class X25519KEM(KEM):
    """X25519 (RFC 7748) as a KEM: the ciphertext is the encapsulator's fresh public key."""

    name = "X25519"
    backend = "cryptography"
    public_key_size = 32
    ciphertext_size = 32
    shared_secret_size = 32

    def generate(self) -> KEMPrivateKey:
        return _X25519PrivateKey(self, x25519.X25519PrivateKey.generate())

    def from_private_bytes(self, data: bytes) -> KEMPrivateKey:
        """Load a 32-byte private key (for deterministic test vectors)."""
        raw = self._check_len(data, 32, "private key")
        return _X25519PrivateKey(self, x25519.X25519PrivateKey.from_private_bytes(raw))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        peer = self._check_len(public_key, 32, "public key")
        eph = x25519.X25519PrivateKey.generate()
        return _x25519_exchange(eph, peer), eph.public_key().public_bytes_raw()


# --- ML-KEM (FIPS 203) ---------------------------------------------------------------------------------


class _MLKEMPrivateKey(KEMPrivateKey):
    __slots__ = ("_key", "_public", "kem")

    def __init__(self, kem: MLKEM, key: Any) -> None:
        self.kem = kem
        self._key = key
        self._public: bytes = key.public_key().public_bytes_raw()

    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        ct = self.kem._check_len(ciphertext, self.kem.ciphertext_size, "ciphertext")
        try:
            secret: bytes = self._key.decapsulate(ct)
        except ValueError as exc:
            raise InvalidKeyMaterial(f"{self.kem.name} ciphertext rejected") from exc
        return secret


class MLKEM(KEM):
    """ML-KEM-768 or ML-KEM-1024 (FIPS 203) from ``cryptography``."""

    backend = "cryptography"
    shared_secret_size = 32
    _PARAMS: ClassVar[dict[str, tuple[Any, Any, int, int]]] = {
        "ML-KEM-768": (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey, 1184, 1088),
        "ML-KEM-1024": (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey, 1568, 1568),
    }

    def __init__(self, name: str) -> None:
        try:
            self._private_cls, self._public_cls, pk, ct = self._PARAMS[name]
        except KeyError:
            raise UnsupportedAlgorithm(f"unknown ML-KEM parameter set {name!r}") from None
        self.name = name
        self.public_key_size = pk
        self.ciphertext_size = ct

    def generate(self) -> KEMPrivateKey:
        return _MLKEMPrivateKey(self, self._private_cls.generate())

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        """Deterministic key pair from the 64-byte FIPS 203 seed ``d || z``."""
        raw = self._check_len(seed, 64, "seed")
        return _MLKEMPrivateKey(self, self._private_cls.from_seed_bytes(raw))

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        ek = self._check_len(public_key, self.public_key_size, "encapsulation key")
        try:
            key = self._public_cls.from_public_bytes(ek)
        except ValueError as exc:  # FIPS 203 section 7.2 modulus check failed
            raise InvalidKeyMaterial(f"{self.name} encapsulation key failed the FIPS 203 check") from exc
        secret, ciphertext = key.encapsulate()
        return bytes(secret), bytes(ciphertext)


# --- liboqs (optional) ---------------------------------------------------------------------------------

_oqs_lock = threading.Lock()
_oqs_module: Any = None

_INSTALL_HINT = (
    "install the liboqs shared library (liboqs >= 0.16 built with -DBUILD_SHARED_LIBS=ON, then set "
    "OQS_INSTALL_PATH to its prefix) and `pip install 'hybridkex[oqs]'`"
)


def oqs_library_path() -> str | None:
    """Where the liboqs shared library is, or None. Never imports ``oqs``."""
    candidates: list[str] = []
    prefix = os.environ.get("OQS_INSTALL_PATH")
    prefixes = [Path(prefix)] if prefix else []
    prefixes.append(Path.home() / "_oqs")
    for p in prefixes:
        for libdir in ("lib", "lib64"):
            for fname in ("liboqs.so", "liboqs.dylib"):
                candidates.append(str(p / libdir / fname))
    found = ctypes.util.find_library("oqs")
    if found:
        candidates.append(found)
    for cand in candidates:
        if ("/" in cand and not Path(cand).exists()):
            continue
        try:
            ctypes.CDLL(cand)
        except OSError:
            continue
        return cand
    return None


def _load_oqs() -> Any:
    global _oqs_module  # noqa: PLW0603 - a process-wide cache of the imported module
    with _oqs_lock:
        if _oqs_module is not None:
            return _oqs_module
        if oqs_library_path() is None:
            raise UnsupportedAlgorithm(f"the liboqs shared library was not found; {_INSTALL_HINT}")
        # liboqs-python logs INFO lines to stdout from its own handler on import ("faulthandler is
        # disabled"): they would land in a program's output (JSON from `hybridkex suites --json`).
        # logging is imported here, not at the top: the sans-IO core must not read the clock on import.
        import logging  # noqa: PLC0415

        logging.getLogger("oqs.oqs").addFilter(lambda record: record.levelno >= logging.WARNING)
        try:
            import oqs  # noqa: PLC0415 - imported only once the library is known to load
        except ImportError as exc:
            raise UnsupportedAlgorithm(f"liboqs-python is not installed; {_INSTALL_HINT}") from exc
        except SystemExit as exc:  # liboqs-python exits the process when its auto-install fails
            raise UnsupportedAlgorithm(f"liboqs-python failed to load liboqs; {_INSTALL_HINT}") from exc
        _oqs_module = oqs
        return oqs


class _OQSPrivateKey(KEMPrivateKey):
    __slots__ = ("_kem_obj", "_public", "kem")

    def __init__(self, kem: OQSKEM, kem_obj: Any, public: bytes) -> None:
        self.kem = kem
        self._kem_obj = kem_obj
        self._public = public

    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        ct = self.kem._check_len(ciphertext, self.kem.ciphertext_size, "ciphertext")
        return bytes(self._kem_obj.decap_secret(ct))


class OQSKEM(KEM):
    """A KEM from liboqs, by its liboqs name (e.g. ``FrodoKEM-640-AES``, ``HQC-1``)."""

    backend = "liboqs"

    def __init__(self, name: str) -> None:
        oqs = _load_oqs()
        if name not in oqs.get_enabled_kem_mechanisms():
            raise UnsupportedAlgorithm(f"{name} is not enabled in this liboqs build")
        self.name = name
        self._oqs = oqs
        with oqs.KeyEncapsulation(name) as probe:
            details = probe.details
        self.public_key_size = int(details["length_public_key"])
        self.ciphertext_size = int(details["length_ciphertext"])
        self.shared_secret_size = int(details["length_shared_secret"])
        #: Length of the seed of deterministic key generation, 0 when liboqs has none for this KEM.
        self.seed_size = int(details.get("length_keypair_seed", 0))

    def generate(self) -> KEMPrivateKey:
        kem_obj = self._oqs.KeyEncapsulation(self.name)
        public = bytes(kem_obj.generate_keypair())
        return _OQSPrivateKey(self, kem_obj, public)

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        """Deterministic key pair (for ML-KEM the FIPS 203 seed ``d || z``, as :meth:`MLKEM.from_seed`)."""
        if not self.seed_size:
            raise UnsupportedAlgorithm(f"liboqs has no deterministic key generation for {self.name}")
        raw = self._check_len(seed, self.seed_size, "seed")
        kem_obj = self._oqs.KeyEncapsulation(self.name)
        public = bytes(kem_obj.generate_keypair_seed(raw))
        return _OQSPrivateKey(self, kem_obj, public)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        pk = self._check_len(public_key, self.public_key_size, "public key")
        with self._oqs.KeyEncapsulation(self.name) as kem_obj:
            ciphertext, secret = kem_obj.encap_secret(pk)
        return bytes(secret), bytes(ciphertext)


# --- registry -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    backend: str
    liboqs_name: str | None = None


_REGISTRY: dict[str, _Entry] = {
    "X25519": _Entry("cryptography"),
    "ML-KEM-768": _Entry("cryptography", "ML-KEM-768"),
    "ML-KEM-1024": _Entry("cryptography", "ML-KEM-1024"),
    "FrodoKEM-640-AES": _Entry("liboqs", "FrodoKEM-640-AES"),
    "FrodoKEM-976-AES": _Entry("liboqs", "FrodoKEM-976-AES"),
    # liboqs 0.16 names (the 2025 HQC specification); its "HQC-128"/"HQC-192" are gone.
    "HQC-1": _Entry("liboqs", "HQC-1"),
    "HQC-3": _Entry("liboqs", "HQC-3"),
    "HQC-5": _Entry("liboqs", "HQC-5"),
    # Known so that a suite naming them is refused with the reason (their public keys, 261 KB and
    # 524 KB, exceed what a handshake key share carries), not as an unknown name.
    "Classic-McEliece-348864": _Entry("liboqs", "Classic-McEliece-348864"),
    "Classic-McEliece-460896": _Entry("liboqs", "Classic-McEliece-460896"),
}
_cache: dict[tuple[str, str], KEM] = {}


def kem_names() -> tuple[str, ...]:
    """Every KEM name hybridkex knows (whether or not its backend is installed)."""
    return tuple(_REGISTRY)


def get_kem(name: str, backend: str | None = None) -> KEM:
    """The KEM ``name``; ``backend`` ('cryptography' or 'liboqs') overrides the default.

    Raises :class:`~hybridkex.exceptions.UnsupportedAlgorithm` within milliseconds when the
    backend is missing, with what to install.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnsupportedAlgorithm(f"unknown KEM {name!r}; known: {', '.join(_REGISTRY)}")
    chosen = backend or entry.backend
    key = (name, chosen)
    kem = _cache.get(key)
    if kem is not None:
        return kem
    if chosen == "cryptography":
        if name == "X25519":
            kem = X25519KEM()
        elif entry.liboqs_name and name.startswith("ML-KEM"):
            kem = MLKEM(name)
        else:
            raise UnsupportedAlgorithm(f"{name} is only available from liboqs; {_INSTALL_HINT}")
    elif chosen == "liboqs":
        if entry.liboqs_name is None:
            raise UnsupportedAlgorithm(f"{name} has no liboqs implementation")
        kem = OQSKEM(entry.liboqs_name)
    else:
        raise UnsupportedAlgorithm(f"unknown KEM backend {chosen!r}; use 'cryptography' or 'liboqs'")
    _cache[key] = kem
    return kem
