"""``hybridkex vectors``: print the hybridkex-v1 known-answer vectors as JSON."""

from __future__ import annotations

import argparse
import sys

from .._kat import load_vectors_text

HELP = "print the hybridkex-v1 combiner known-answer vectors (JSON)"


def configure(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    sys.stdout.write(load_vectors_text())
    return 0
