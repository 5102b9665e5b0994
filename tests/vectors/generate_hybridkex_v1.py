"""Generate tests/vectors/hybridkex-v1.json, the hybridkex-v1 combiner's known-answer vectors.

Run from the repository root:  python tests/vectors/generate_hybridkex_v1.py > tests/vectors/hybridkex-v1.json

Every input is derived from a fixed seed, so the output is byte-for-byte reproducible: the key pairs,
public keys and X25519 secret from seeds, and the ML-KEM encapsulation from FIPS 203
ML-KEM.Encaps_internal(ek, m) with a seeded ``m`` (``mlkem_encaps_m``; kyber-py, a pure-Python ML-KEM,
because cryptography offers no derandomised encapsulation).  Decapsulating ``mlkem_ct`` with the
seeded key re-derives ``mlkem_secret``.  tests/test_combiner.py re-checks every field and
tests/test_handshake_vectors.py re-runs this script.
"""

from __future__ import annotations

import hashlib
import json
import sys

from cryptography.hazmat.primitives.asymmetric import x25519
from kyber_py.ml_kem.default_parameters import DEFAULT_PARAMETERS
from kyber_py.ml_kem.ml_kem import ML_KEM

from hybridkex.combiner import PartyView, QKDBinding, combine, combine_raw, encode_party
from hybridkex.hazmat import labels
from hybridkex.hazmat.encoding import u32
from hybridkex.hazmat.kdf import context_function
from hybridkex.hazmat.kem import get_kem
from hybridkex.io.reconnect import reconnect_identity, reconnect_psk, session_handle
from hybridkex.suites import get_suite


def stream(seed: str, n: int) -> bytes:
    return hashlib.shake_256(b"hybridkex-v1 test vector " + seed.encode()).digest(n)


def fixed_encapsulation(kem_name: str, ek: bytes, m: bytes) -> tuple[bytes, bytes]:
    """``(shared secret, ciphertext)`` of ML-KEM encapsulation with the 32-byte randomness ``m``."""
    kem = ML_KEM(DEFAULT_PARAMETERS[{"ML-KEM-768": "ML768", "ML-KEM-1024": "ML1024"}[kem_name]])
    kem.random_bytes = lambda n: m[:n]  # kyber-py's documented randomness source, here fixed
    shared, ct = kem.encaps(ek)
    return shared, ct


CASES = [
    ("default suite, QKD key", "x25519-mlkem768-qkd-hkdfsha256", "case-1", True),
    ("default suite, second QKD key and identities", "x25519-mlkem768-qkd-hkdfsha256", "case-2", True),
    ("ML-KEM-1024, SHA-384, QKD key", "x25519-mlkem1024-qkd-hkdfsha384", "case-3", True),
    ("ML-KEM-768 without QKD", "x25519-mlkem768-hkdfsha256", "case-4", False),
    ("ML-KEM-1024 without QKD", "x25519-mlkem1024-hkdfsha384", "case-5", False),
    ("SP 800-56C order (ML-KEM first), QKD key", "mlkem768-x25519-qkd-hkdfsha256-sp80056c", "case-6", True),
]


def make_case(description: str, suite_name: str, seed: str, with_qkd: bool) -> dict[str, object]:
    suite = get_suite(suite_name)
    pq = get_kem(suite.pq_kem)
    xa = x25519.X25519PrivateKey.from_private_bytes(stream(seed + " x25519 a", 32))
    xb = x25519.X25519PrivateKey.from_private_bytes(stream(seed + " x25519 b", 32))
    xa_pub = xa.public_key().public_bytes_raw()
    xb_pub = xb.public_key().public_bytes_raw()
    x_secret = xa.exchange(xb.public_key())
    mlkem_seed = stream(seed + " mlkem seed", 64)
    sk = pq.from_seed(mlkem_seed)  # type: ignore[attr-defined]
    mlkem_m = stream(seed + " mlkem encaps m", 32)
    mlkem_secret, mlkem_ct = fixed_encapsulation(suite.pq_kem, sk.public_bytes(), mlkem_m)
    assert sk.decapsulate(mlkem_ct) == mlkem_secret
    qkd_key = stream(seed + " qkd key", suite.qkd_key_bits // 8) if with_qkd else b""
    binding = None
    if with_qkd:
        key_id = str(__import__("uuid").UUID(bytes=stream(seed + " key id", 16), version=4))
        binding = QKDBinding(key_ids=(key_id,), master_sae_id="sae-b", slave_sae_id="sae-a",
                             master_kme_id="kme-b", slave_kme_id="kme-a")
    view_a = PartyView("initiator", f"client-{seed}".encode(), stream(seed + " nonce a", 32), xa_pub, sk.public_bytes())
    view_b = PartyView("responder", f"server-{seed}".encode(), stream(seed + " nonce b", 32), xb_pub, mlkem_ct)
    ma = encode_party(suite, view_a, binding)
    mb = encode_party(suite, view_b, binding)
    combined_secret = combine_raw(suite, qkd_key=qkd_key, x25519_secret=x_secret, pq_secret=mlkem_secret, ma=ma, mb=mb)
    secret = combine(suite, qkd_key=qkd_key, x25519_secret=x_secret, pq_secret=mlkem_secret, ma=ma, mb=mb)
    return {
        "description": description,
        "suite": suite.name,
        "suite_code": suite.code,
        "kdf": suite.kdf,
        "ordering": suite.ordering,
        "qkd_key": qkd_key.hex(),
        "qkd_key_ids": list(binding.key_ids) if binding else [],
        "qkd_binding": None if binding is None else {
            "master_sae_id": binding.master_sae_id, "slave_sae_id": binding.slave_sae_id,
            "master_kme_id": binding.master_kme_id, "slave_kme_id": binding.slave_kme_id,
        },
        "x25519_private_a": stream(seed + " x25519 a", 32).hex(),
        "x25519_private_b": stream(seed + " x25519 b", 32).hex(),
        "x25519_public_a": xa_pub.hex(),
        "x25519_public_b": xb_pub.hex(),
        "x25519_secret": x_secret.hex(),
        "mlkem_seed": mlkem_seed.hex(),
        "mlkem_ek": sk.public_bytes().hex(),
        "mlkem_encaps_m": mlkem_m.hex(),
        "mlkem_ct": mlkem_ct.hex(),
        "mlkem_secret": mlkem_secret.hex(),
        "identity_a": view_a.identity.hex(),
        "identity_b": view_b.identity.hex(),
        "nonce_a": view_a.nonce.hex(),
        "nonce_b": view_b.nonce.hex(),
        "ma": ma.hex(),
        "mb": mb.hex(),
        "label": labels.combiner_label(suite.label).hex(),
        "context": labels.COMBINER_CONTEXT.hex(),
        "kdf_context_hash": context_function(suite.kdf, labels.COMBINER_CONTEXT, ma, mb).hex(),
        "combined_secret": combined_secret.hex(),
        "tls_psk": secret.tls_psk().hex(),
        "tls_psk_identity_bytes": secret.derive(labels.TLS_PSK_IDENTITY, 16).hex(),
        "tls_psk_identity": secret.tls_identity().decode("ascii"),
        "next_auth_key": secret.next_auth_key().hex(),
        "reconnect_1": {
            "handle": session_handle(secret).hex(),
            "tag": secret.derive(labels.RECONNECT_IDENTITY, 16, u32(1)).hex(),
            "identity": reconnect_identity(secret, 1).decode("ascii"),
            "psk": reconnect_psk(secret, 1).hex(),
        },
    }


def main() -> None:
    doc = {
        "source": "hybridkex (this project): self-computed known-answer vectors of the hybridkex-v1 combiner, "
                  "docs/spec.md section 'Combiner'. Not an independent check.",
        "algorithm": "ETSI TS 103 744 V1.2.1 CatKDF with HKDF; psk = QKD key, k1 = X25519, k2 = ML-KEM "
                     "(ordering 'etsi'), or IKM = ss_ML-KEM || ss_X25519 || k_qkd (ordering 'sp800-56c')",
        "fields": "hex strings, except the identities (ASCII text, sent as these octets); "
                  "combined_secret = S of docs/spec.md 4.1 = CatKDF(qkd_key, x25519_secret, mlkem_secret; ma, mb, "
                  "label, context); mlkem_encaps_m = the m of FIPS 203 ML-KEM.Encaps_internal that produced mlkem_ct; "
                  "tls_psk/tls_psk_identity_bytes/next_auth_key = HKDF-Expand(S, lp('hybridkex/v1') || lp(suite) || "
                  "lp(purpose) || lp(''), L); tls_psk_identity = 'hk1-psk.' || base64url(tls_psk_identity_bytes) "
                  "without padding; reconnect_1: handle, tag (context u32(1)), identity = 'hk1-rc.' || "
                  "base64url(handle || u32(1) || tag), psk (context u32(1)), docs/spec.md 4.3",
        "cases": [make_case(*c) for c in CASES],
    }
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
