"""Shared pieces of the hardening tests (imported as ``hardeninghelpers``, never through conftest).

Puts the other test folders' helper modules (tests/io/iohelpers.py, tests/qkd/qkdhelpers.py, the
protocol tests' package) and the fuzz targets (fuzz/fuzz_targets.py) on ``sys.path`` so that they
are reused by import, and adds what only these tests need: fuzz input strategies, resource
counters (file descriptors, RSS) and secret scanning.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
for _p in (TESTS, TESTS / "io", TESTS / "qkd", ROOT / "fuzz"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import fuzz_targets  # noqa: E402

__all__ = ["ROOT", "TESTS", "fd_count", "fuzz_inputs", "fuzz_targets", "mutate", "rss_bytes", "secret_forms"]

#: Values a length field is set to by the mutator: empty, off by one, the largest u16 and u32.
_EXTREMES = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def mutate(seed: bytes, ops: Iterable[tuple[int, int, bytes]]) -> bytes:
    """Apply structure-blind mutations to ``seed``: byte flips, insertions, deletions, truncation,
    extreme big-endian length values, duplication.  Each op is (kind, position, payload)."""
    data = bytearray(seed)
    for kind, pos, payload in ops:
        at = pos % (len(data) + 1)
        k = kind % 6
        if k == 0 and data:
            i = pos % len(data)
            data[i] ^= (payload[0] if payload else 0) or 0x01
        elif k == 1:
            data[at:at] = payload or b"\x00"
        elif k == 2:
            del data[at:at + 1 + len(payload)]
        elif k == 3:
            del data[at:]
        elif k == 4:
            value = _EXTREMES[(payload[0] if payload else 0) % len(_EXTREMES)]
            width = 2 if (payload[1:2] or b"\x00")[0] & 1 else 4
            data[at:at + width] = value.to_bytes(4, "big")[-width:]
        else:
            data[at:at] = data[at:at + 1 + (payload[0] if payload else 0)]
    return bytes(data)


def fuzz_inputs(name: str) -> st.SearchStrategy[bytes]:
    """Inputs for fuzz target ``name``: raw bytes, its real seeds, and mutations of them."""
    seeds = fuzz_targets.seeds(name)
    ops = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 20), st.binary(max_size=8)),
                   min_size=1, max_size=4)
    return st.one_of(
        st.binary(max_size=1024),
        st.sampled_from(seeds),
        st.builds(mutate, st.sampled_from(seeds), ops),
    )


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def secret_forms(secret: bytes) -> dict[str, bytes]:
    """The spellings a secret could leak in: raw, hex (lower, upper), base64 (standard, URL-safe,
    unpadded).  Only the forms at least 8 bytes long (so a match is not a coincidence)."""
    forms = {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": base64.b64encode(secret),
        "base64url": base64.urlsafe_b64encode(secret),
        "base64-nopad": base64.b64encode(secret).rstrip(b"="),
        "repr": repr(secret).encode(),
    }
    return {k: v for k, v in forms.items() if len(v) >= 8}
