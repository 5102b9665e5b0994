"""KEM components: round trips, exact sizes, degenerate inputs (liboqs: tests/test_liboqs_kem.py)."""

from __future__ import annotations

import pytest

from hybridkex.exceptions import InvalidKeyMaterial, UnsupportedAlgorithm
from hybridkex.hazmat.kem import get_kem, kem_names

BUILTIN = ["X25519", "ML-KEM-768", "ML-KEM-1024"]
SIZES = {"X25519": (32, 32), "ML-KEM-768": (1184, 1088), "ML-KEM-1024": (1568, 1568)}


@pytest.mark.parametrize("name", BUILTIN)
def test_round_trip_and_sizes(name: str) -> None:
    kem = get_kem(name)
    assert (kem.public_key_size, kem.ciphertext_size) == SIZES[name]
    sk = kem.generate()
    pk = sk.public_bytes()
    assert len(pk) == kem.public_key_size
    ss, ct = kem.encapsulate(pk)
    assert len(ss) == kem.shared_secret_size == 32
    assert len(ct) == kem.ciphertext_size
    assert kem.decapsulate(sk, ct) == ss
    # a second encapsulation gives a different secret
    ss2, ct2 = kem.encapsulate(pk)
    assert ss2 != ss and ct2 != ct


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("delta", [-1, +1])
def test_wrong_lengths_raise(name: str, delta: int) -> None:
    kem = get_kem(name)
    sk = kem.generate()
    with pytest.raises(InvalidKeyMaterial, match="must be"):
        kem.encapsulate(bytes(kem.public_key_size + delta))
    with pytest.raises(InvalidKeyMaterial, match="must be"):
        kem.decapsulate(sk, bytes(kem.ciphertext_size + delta))


@pytest.mark.parametrize("name", BUILTIN)
def test_private_key_repr_has_no_secret(name: str) -> None:
    sk = get_kem(name).generate()
    assert repr(sk) == f"<{name} private key>"


def test_x25519_rejects_low_order_points() -> None:
    kem = get_kem("X25519")
    sk = kem.generate()
    low_order = [bytes(32), (1).to_bytes(32, "little")]
    for point in low_order:
        with pytest.raises(InvalidKeyMaterial):
            kem.encapsulate(point)
        with pytest.raises(InvalidKeyMaterial):
            kem.decapsulate(sk, point)


@pytest.mark.parametrize("name", ["ML-KEM-768", "ML-KEM-1024"])
def test_mlkem_encapsulation_key_modulus_check(name: str) -> None:
    """FIPS 203 section 7.2: a coefficient >= q in the encapsulation key must be refused."""
    kem = get_kem(name)
    ek = bytearray(kem.generate().public_bytes())
    ek[0] = 0xFF
    ek[1] |= 0x0F  # first 12-bit coefficient = 4095 >= 3329
    with pytest.raises(InvalidKeyMaterial, match="FIPS 203"):
        kem.encapsulate(bytes(ek))


@pytest.mark.parametrize("name", ["ML-KEM-768", "ML-KEM-1024"])
def test_mlkem_implicit_rejection(name: str) -> None:
    """A tampered ciphertext decapsulates to an unrelated secret (implicit rejection), never raises."""
    kem = get_kem(name)
    sk = kem.generate()
    ss, ct = kem.encapsulate(sk.public_bytes())
    bad = bytes([ct[0] ^ 1]) + ct[1:]
    assert kem.decapsulate(sk, bad) != ss


def test_decapsulate_with_foreign_key_refused() -> None:
    k768, k1024 = get_kem("ML-KEM-768"), get_kem("ML-KEM-1024")
    sk = k1024.generate()
    _, ct = k768.encapsulate(k768.generate().public_bytes())
    with pytest.raises(InvalidKeyMaterial, match="belongs to"):
        k768.decapsulate(sk, ct)


def test_mlkem_from_seed_is_deterministic() -> None:
    kem = get_kem("ML-KEM-768")
    seed = bytes(range(64))
    assert kem.from_seed(seed).public_bytes() == kem.from_seed(seed).public_bytes()  # type: ignore[attr-defined]


def test_unknown_kem_and_backend() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="unknown KEM"):
        get_kem("RSA-2048")
    with pytest.raises(UnsupportedAlgorithm, match="backend"):
        get_kem("ML-KEM-768", "gpu")
    with pytest.raises(UnsupportedAlgorithm, match="only available from liboqs"):
        get_kem("HQC-1", "cryptography")
    assert set(BUILTIN) <= set(kem_names())


# The liboqs guard, KATs and backend cross-checks against the real library: tests/test_liboqs_kem.py.


def test_liboqs_python_is_installed_so_the_guard_is_meaningful() -> None:
    """The test extra installs liboqs-python: a bare `import oqs` would really try to build liboqs."""
    import importlib.util

    assert importlib.util.find_spec("oqs") is not None
