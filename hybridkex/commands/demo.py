"""``hybridkex demo``: show a complete hybrid key establishment with no setup.

Both parties run in this process against an in-memory simulated QKD link: the initiator sends its
X25519 and ML-KEM public keys, the responder encapsulates and takes a QKD key as ETSI 014 master,
the initiator fetches the same QKD key by ID as slave, and both combine the three secrets.
"""

from __future__ import annotations

import argparse
import hmac
import os
import time

from ..combiner import PartyView, QKDBinding, combine, encode_party
from ..hazmat.kem import get_kem
from ..qkd.memory import MemoryKeyLink
from ..suites import DEFAULT_SUITE, get_suite

HELP = "run a complete hybrid key establishment locally (simulated QKD) and explain what was established"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default=DEFAULT_SUITE.name, help="suite to demonstrate (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    suite = get_suite(args.suite)
    x = get_kem(suite.classical_kem)
    pq = get_kem(suite.pq_kem, suite.backend)
    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        stages.append((name, (now - t0) * 1000))
        t0 = now

    link = MemoryKeyLink()
    qkd_initiator = link.source("sae-a", 0)
    qkd_responder = link.source("sae-b", 1)

    # Initiator: fresh key pairs.
    x_a = x.generate()
    pq_a = pq.generate()
    view_a = PartyView("initiator", b"client.example", os.urandom(32), x_a.public_bytes(), pq_a.public_bytes())
    stage("initiator key generation (X25519 + ML-KEM)")

    # Responder: encapsulate to both, take a QKD key as ETSI 014 master.
    ss_x_b, x_ct = x.encapsulate(view_a.x25519_public)
    ss_pq_b, pq_ct = pq.encapsulate(view_a.kem_message)
    stage("responder encapsulation (X25519 + ML-KEM)")
    binding = None
    qkd_key_b = b""
    if suite.qkd:
        (key_b,) = qkd_responder.get_keys(qkd_initiator.sae_id, 1, suite.qkd_key_bits)
        qkd_key_b = key_b.key
        binding = QKDBinding((key_b.key_id,), qkd_responder.sae_id, qkd_initiator.sae_id,
                             qkd_responder.kme_id, qkd_initiator.kme_id)
    stage("responder QKD key (master, 'Get key')")
    view_b = PartyView("responder", b"server.example", os.urandom(32), x_ct, pq_ct)
    ma = encode_party(suite, view_a, binding)
    mb = encode_party(suite, view_b, binding)
    secret_b = combine(suite, qkd_key=qkd_key_b, x25519_secret=ss_x_b, pq_secret=ss_pq_b, ma=ma, mb=mb)
    stage("responder combine (CatKDF)")

    # Initiator: decapsulate, fetch the QKD key by ID as slave, combine.
    ss_x_a = x_a.decapsulate(x_ct)
    ss_pq_a = pq_a.decapsulate(pq_ct)
    qkd_key_a = b""
    if binding is not None:
        (key_a,) = qkd_initiator.get_keys_by_id(qkd_responder.sae_id, binding.key_ids)
        qkd_key_a = key_a.key
    secret_a = combine(suite, qkd_key=qkd_key_a, x25519_secret=ss_x_a, pq_secret=ss_pq_a, ma=ma, mb=mb)
    stage("initiator decapsulation, QKD fetch by ID, combine")

    agree = hmac.compare_digest(secret_a.tls_psk(), secret_b.tls_psk())
    print("hybridkex demo: hybrid key establishment (in-process; simulated QKD link)")
    print(f"  suite            {suite.name}")
    print("  X25519           32-byte shared secret (classical; falls to a quantum computer)")
    print(f"  {suite.pq_kem:16} {pq.shared_secret_size}-byte shared secret (post-quantum, FIPS 203)")
    if binding:
        print(f"  QKD key          {suite.qkd_key_bits}-bit key, ID {binding.key_ids[0]} "
              f"({binding.master_sae_id} master, {binding.slave_sae_id} slave)")
    print(f"  combiner         ETSI TS 103 744 CatKDF, {suite.kdf}, MA {len(ma)} B / MB {len(mb)} B bound in")
    print(f"  both sides agree {'yes' if agree else 'NO'} (TLS PSK {suite.hash_len} bytes, not shown)")
    print("  time per stage:")
    for name, ms in stages:
        print(f"    {ms:8.3f} ms  {name}")
    print("  An attacker recording this exchange must break X25519 AND ML-KEM AND obtain the QKD key.")
    print("  Authentication, TLS and the simulated ETSI 014 KMEs over HTTPS are added by the full handshake.")
    secret_a.erase()
    secret_b.erase()
    return 0 if agree else 1
