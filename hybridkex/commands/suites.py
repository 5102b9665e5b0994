"""``hybridkex suites``: list the suites and what each one fixes."""

from __future__ import annotations

import argparse
import json

from ..exceptions import HybridKEXError, UnsupportedAlgorithm
from ..protocol import suite_kem
from ..suites import DEFAULT_SUITE, SUITES, Suite

HELP = "list the cipher suites and whether their algorithms are available here"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _unavailable(suite: Suite) -> str | None:
    """Why the suite cannot run here (one line), or None when it can."""
    try:
        suite_kem(suite)  # loads the KEM and checks it against the wire format
    except UnsupportedAlgorithm:
        return "needs liboqs"
    except HybridKEXError as exc:
        return str(exc)
    return None


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
            "available": (why := _unavailable(s)) is None,
            "unavailable_reason": why,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'suite':42} {'code':6} {'QKD':4} {'KDF':12} {'order':10} available")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        available = "yes" if r["available"] else f"no ({r['unavailable_reason']})"
        print(f"{r['name']:42} {r['code']:6} {'yes' if r['qkd'] else 'no':4} {r['kdf']:12} {r['ordering']:10} "
              f"{available}{mark}")
    return 0
