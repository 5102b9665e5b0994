"""The liboqs backend against the real library: published KATs, round trips, cross-checks, the guard.

Skipped, with how to get liboqs, where the library is absent; .ci/run builds it from the vendored
source when that is next to the checkout (README.md, "Optional: liboqs").
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from oqshelpers import KAT_SINGLE_SHA256, kat_single, needs_liboqs

from hybridkex.exceptions import InvalidKeyMaterial, UnsupportedAlgorithm
from hybridkex.hazmat.kem import get_kem
from hybridkex.suites import SUITES

#: Every liboqs KEM a suite uses, and Classic McEliece (no suite: its keys do not fit a key share).
LIBOQS_KEMS = [*sorted({s.pq_kem for s in SUITES.values() if s.backend == "liboqs"}), "Classic-McEliece-348864"]
#: (public key, ciphertext, shared secret) in bytes, from the algorithms' specifications.
SIZES = {
    "FrodoKEM-640-AES": (9616, 9752, 16),
    "FrodoKEM-976-AES": (15632, 15792, 24),
    "HQC-1": (2241, 4433, 32),
    "HQC-3": (4514, 8978, 32),
    "Classic-McEliece-348864": (261120, 96, 32),
}


def test_every_liboqs_kem_of_a_suite_has_a_kat_and_sizes() -> None:
    assert set(LIBOQS_KEMS) <= set(KAT_SINGLE_SHA256) and set(LIBOQS_KEMS) == set(SIZES)
    for s in SUITES.values():
        if s.backend == "liboqs":
            assert SIZES[s.pq_kem][2] == s.pq_secret_bytes, s.name


@needs_liboqs
@pytest.mark.parametrize("name", [*LIBOQS_KEMS, "ML-KEM-768", "ML-KEM-1024"])
def test_published_kat(name: str) -> None:
    """liboqs's own known-answer test (kat_kem.c, count 0) reproduces the published hash."""
    get_kem("ML-KEM-768", "liboqs")  # loads oqs through the guard (and keeps its INFO line off stdout)
    import oqs
    import oqs.rand

    assert kat_single(oqs, name) == KAT_SINGLE_SHA256[name]


@needs_liboqs
@pytest.mark.parametrize("name", LIBOQS_KEMS)
def test_round_trip_sizes_and_implicit_rejection(name: str) -> None:
    kem = get_kem(name)
    assert kem.backend == "liboqs"
    assert (kem.public_key_size, kem.ciphertext_size, kem.shared_secret_size) == SIZES[name]
    sk = kem.generate()
    assert repr(sk) == f"<{name} private key>"
    pk = sk.public_bytes()
    ss, ct = kem.encapsulate(pk)
    assert (len(pk), len(ct), len(ss)) == SIZES[name]
    assert kem.decapsulate(sk, ct) == ss
    ss2, ct2 = kem.encapsulate(pk)
    assert ss2 != ss and ct2 != ct and kem.decapsulate(sk, ct2) == ss2
    # A corrupted ciphertext decapsulates to an unrelated secret (implicit rejection), never raises.
    for pos in (0, len(ct) // 2, len(ct) - 1):
        bad = bytearray(ct)
        bad[pos] ^= 0x01
        out = kem.decapsulate(sk, bytes(bad))
        assert len(out) == len(ss) and out != ss
    # Another key pair cannot open it either.
    assert kem.decapsulate(kem.generate(), ct) != ss
    for delta in (-1, 1):
        with pytest.raises(InvalidKeyMaterial, match="must be"):
            kem.encapsulate(bytes(len(pk) + delta))
        with pytest.raises(InvalidKeyMaterial, match="must be"):
            kem.decapsulate(sk, bytes(len(ct) + delta))


@needs_liboqs
@pytest.mark.parametrize("name", ["ML-KEM-768", "ML-KEM-1024"])
def test_mlkem_cross_checked_between_cryptography_and_liboqs(name: str) -> None:
    """Keys from one backend, encapsulation in the other, in both directions; and FIPS 203 seeded
    key generation gives the same key pair in both."""
    c, o = get_kem(name, "cryptography"), get_kem(name, "liboqs")
    assert (c.public_key_size, c.ciphertext_size) == (o.public_key_size, o.ciphertext_size)
    for gen, enc in ((c, o), (o, c)):
        sk = gen.generate()
        ss, ct = enc.encapsulate(sk.public_bytes())
        assert gen.decapsulate(sk, ct) == ss
    seed = bytes(range(64))
    sk_c, sk_o = c.from_seed(seed), o.from_seed(seed)  # type: ignore[attr-defined]
    assert sk_c.public_bytes() == sk_o.public_bytes()
    # Same seed, same decapsulation key: each opens what the other backend encapsulated to it.
    ss, ct = o.encapsulate(sk_c.public_bytes())
    assert c.decapsulate(sk_c, ct) == ss and o.decapsulate(sk_o, ct) == ss


@needs_liboqs
def test_no_deterministic_keygen_where_liboqs_has_none() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="no deterministic key generation"):
        get_kem("FrodoKEM-640-AES").from_seed(bytes(64))  # type: ignore[attr-defined]


def _no_liboqs_env(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "no-liboqs"
    empty.mkdir()
    # An empty prefix, and a HOME without ~/_oqs (liboqs-python's own default install place).
    return {**os.environ, "OQS_INSTALL_PATH": str(empty), "HOME": str(empty)}


@pytest.mark.skipif(ctypes.util.find_library("oqs") is not None,
                    reason="a system-wide liboqs is installed here; the guard path cannot be taken")
def test_guard_answers_without_importing_or_building_liboqs(tmp_path: Path) -> None:
    """Without the library, `import oqs` would sleep, try to git-clone and build liboqs, then exit the
    process. The guard must answer UnsupportedAlgorithm without importing oqs, whatever this machine
    has (the run uses an empty OQS_INSTALL_PATH); the timeout only guards against a hang."""
    script = textwrap.dedent("""
        import sys
        from hybridkex.exceptions import UnsupportedAlgorithm
        from hybridkex.hazmat.kem import get_kem
        for name in ("FrodoKEM-640-AES", "FrodoKEM-976-AES", "HQC-1", "Classic-McEliece-348864"):
            try:
                get_kem(name)
            except UnsupportedAlgorithm as exc:
                assert "OQS_INSTALL_PATH" in str(exc), exc
            else:
                raise SystemExit("no error for " + name)
        assert "oqs" not in sys.modules, "oqs was imported"
        print("guard-ok")
    """)
    env = _no_liboqs_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "guard-ok"
    # The CLI says so too, and does not try to build anything (nothing is written under HOME).
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "suites"], capture_output=True, text=True,
                          timeout=20, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    for s in SUITES.values():
        assert ("no (needs liboqs)" in rows[s.name]) is (s.backend == "liboqs"), rows[s.name]
    assert list((tmp_path / "no-liboqs").iterdir()) == []
