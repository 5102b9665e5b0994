"""Handshake costs side by side: hybridkex against what users run today, as ratios from one run.

    python benchmarks/bench_handshakes.py [--quick] [--json FILE] [--plots DIR] [--variants IDS] ...

The same as ``hybridkex bench`` (all options are the same; ``--help`` lists them).  The measuring
code lives in the package (:mod:`hybridkex.bench`); see docs/benchmarks.md for what is measured and
how to read it.
"""

from __future__ import annotations

import sys

from hybridkex.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
