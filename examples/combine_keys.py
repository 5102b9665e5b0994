"""Combine ML-KEM-768, X25519 and a QKD key into one TLS PSK, both sides in one process.

    python examples/combine_keys.py

This shows the combiner recipe on its own (no network): the handshake APIs run exactly these
steps, plus authentication, over a real connection.
"""

from __future__ import annotations

import os

import hybridkex
from hybridkex.hazmat.kem import get_kem
from hybridkex.qkd import MemoryKeyLink

suite = hybridkex.DEFAULT_SUITE
x25519, mlkem = get_kem(suite.classical_kem), get_kem(suite.pq_kem)
link = MemoryKeyLink()  # stands in for a pair of ETSI GS QKD 014 KMEs
alice_qkd, bob_qkd = link.source("sae-a", 0), link.source("sae-b", 1)

# Alice (initiator) sends her public keys.
alice_x, alice_m = x25519.generate(), mlkem.generate()
alice = hybridkex.PartyView("initiator", b"alice", os.urandom(32), alice_x.public_bytes(), alice_m.public_bytes())

# Bob (responder, ETSI 014 master) encapsulates and takes a QKD key for Alice's SAE.
bob_ss_x, x_ct = x25519.encapsulate(alice.x25519_public)
bob_ss_m, m_ct = mlkem.encapsulate(alice.kem_message)
(bob_key,) = bob_qkd.get_keys("sae-a", number=1, size_bits=suite.qkd_key_bits)
binding = hybridkex.QKDBinding(key_ids=(bob_key.key_id,), master_sae_id="sae-b", slave_sae_id="sae-a",
                               master_kme_id=bob_qkd.kme_id, slave_kme_id=alice_qkd.kme_id)
bob = hybridkex.PartyView("responder", b"bob", os.urandom(32), x_ct, m_ct)
ma, mb = hybridkex.encode_party(suite, alice, binding), hybridkex.encode_party(suite, bob, binding)
bob_secret = hybridkex.combine(suite, qkd_key=bob_key.key, x25519_secret=bob_ss_x, pq_secret=bob_ss_m, ma=ma, mb=mb)

# Alice decapsulates and fetches the same QKD key by its ID (slave role).
(alice_key,) = alice_qkd.get_keys_by_id("sae-b", binding.key_ids)
alice_secret = hybridkex.combine(
    suite, qkd_key=alice_key.key, x25519_secret=alice_x.decapsulate(x_ct),
    pq_secret=alice_m.decapsulate(m_ct), ma=ma, mb=mb,
)

assert alice_secret.equals(bob_secret)
print(f"suite {suite.name}: both sides derived the same {suite.hash_len}-byte TLS PSK")
print(f"QKD key {bob_key.key_id} bound into the exchange; secrets: {alice_secret!r}")
