"""Micro-benchmarks of the key-combination components and the full combine.

    python benchmarks/bench_core.py [--json FILE] [--quick]

Reports microseconds per operation (median of repeated timeit runs) and the goal of issue [core]
as a ratio measured in the same run: the combine itself (encoding MA/MB, CatKDF and the derived
TLS PSK, i.e. everything except the KEM and X25519 operations) should cost under 10% of one
ML-KEM-768 decapsulation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import timeit
from collections.abc import Callable

import cryptography

from hybridkex import PartyView, QKDBinding, combine, encode_party, get_suite
from hybridkex.combiner import combine_raw
from hybridkex.hazmat.kdf import hkdf
from hybridkex.hazmat.kem import get_kem


def measure(fn: Callable[[], object], *, repeat: int, number: int) -> float:
    """Median microseconds per call over ``repeat`` runs of ``number`` calls."""
    runs = timeit.repeat(fn, repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args(argv)
    repeat, number = (3, 50) if args.quick else (7, 1000)

    suite = get_suite("x25519-mlkem768-qkd-hkdfsha256")
    x, m = get_kem("X25519"), get_kem("ML-KEM-768")
    xa, ma_key = x.generate(), m.generate()
    ss_x, x_ct = x.encapsulate(xa.public_bytes())
    ss_m, m_ct = m.encapsulate(ma_key.public_bytes())
    qkd = os.urandom(32)
    binding = QKDBinding(key_ids=("0b5f1f1e-6f4e-4a53-9a57-2a4a3c1f6f10",), master_sae_id="sae-b", slave_sae_id="sae-a",
                         master_kme_id="kme-b", slave_kme_id="kme-a")
    va = PartyView("initiator", b"client.example", os.urandom(32), xa.public_bytes(), ma_key.public_bytes())
    vb = PartyView("responder", b"server.example", os.urandom(32), x_ct, m_ct)
    ma, mb = encode_party(suite, va, binding), encode_party(suite, vb, binding)

    def full_combine() -> bytes:
        a = encode_party(suite, va, binding)
        b = encode_party(suite, vb, binding)
        return combine(suite, qkd_key=qkd, x25519_secret=ss_x, pq_secret=ss_m, ma=a, mb=b).tls_psk()

    cases: dict[str, Callable[[], object]] = {
        "x25519 keygen": x.generate,
        "x25519 encapsulate (keygen + exchange)": lambda: x.encapsulate(xa.public_bytes()),
        "x25519 decapsulate (exchange)": lambda: xa.decapsulate(x_ct),
        "ml-kem-768 keygen": m.generate,
        "ml-kem-768 encapsulate": lambda: m.encapsulate(ma_key.public_bytes()),
        "ml-kem-768 decapsulate": lambda: ma_key.decapsulate(m_ct),
        "hkdf-sha256 (32 B)": lambda: hkdf("sha256", salt=b"s", ikm=qkd, info=b"i", length=32),
        "encode MA + MB": lambda: (encode_party(suite, va, binding), encode_party(suite, vb, binding)),
        "CatKDF (combine_raw)": lambda: combine_raw(suite, qkd_key=qkd, x25519_secret=ss_x, pq_secret=ss_m,
                                                    ma=ma, mb=mb),
        "full combine (encode + CatKDF + TLS PSK)": full_combine,
    }
    results = {name: measure(fn, repeat=repeat, number=number) for name, fn in cases.items()}
    ratio = results["full combine (encode + CatKDF + TLS PSK)"] / results["ml-kem-768 decapsulate"]

    print(f"hybridkex core micro-benchmarks  (Python {platform.python_version()}, cryptography "
          f"{cryptography.__version__}, {platform.machine()}, repeat={repeat} x {number})")
    for name, us in results.items():
        print(f"  {us:9.2f} us  {name}")
    verdict = "met" if ratio < 0.10 else "MISSED"
    print(f"  full combine / ML-KEM-768 decapsulation = {ratio:.3f}  (goal < 0.10: {verdict})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"python": sys.version, "cryptography": cryptography.__version__, "us_per_op": results,
                       "combine_over_decaps": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
