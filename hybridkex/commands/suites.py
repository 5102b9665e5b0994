"""``hybridkex suites``: list the suites and what each one fixes."""

from __future__ import annotations

import argparse
import json

from ..hazmat.kem import get_kem
from ..suites import DEFAULT_SUITE, SUITES

HELP = "list the cipher suites and whether their algorithms are available here"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _available(backend: str, kem: str) -> bool:
    try:
        get_kem(kem, backend)
    except Exception:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    rows = []
    for s in SUITES.values():
        rows.append({
            "name": s.name,
            "code": f"0x{s.code:04x}",
            "kems": [s.classical_kem, s.pq_kem],
            "qkd": s.qkd,
            "kdf": s.kdf,
            "ordering": s.ordering,
            "tls_cipher": s.tls_cipher,
            "default": s is DEFAULT_SUITE,
            "available": _available(s.backend, s.pq_kem),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'suite':42} {'code':6} {'QKD':4} {'KDF':12} {'order':10} available")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        print(f"{r['name']:42} {r['code']:6} {'yes' if r['qkd'] else 'no':4} {r['kdf']:12} {r['ordering']:10} "
              f"{'yes' if r['available'] else 'no (needs liboqs)'}{mark}")
    return 0
