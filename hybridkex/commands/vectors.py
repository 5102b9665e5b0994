"""``hybridkex vectors``: print the hybridkex-v1 known-answer vectors as JSON."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from ..exceptions import HybridKEXError

HELP = "print the hybridkex-v1 combiner known-answer vectors (JSON)"
VECTORS_NAME = "hybridkex-v1.json"


def load_vectors_text() -> str:
    """The vectors: shipped in the wheel (``hybridkex/_data``), or in a source tree (``tests/vectors``)."""
    packaged = resources.files("hybridkex").joinpath("_data", VECTORS_NAME)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parents[2] / "tests" / "vectors" / VECTORS_NAME
    if source_tree.is_file():
        return source_tree.read_text(encoding="utf-8")
    raise HybridKEXError(f"the {VECTORS_NAME} vectors are missing from this installation; reinstall hybridkex")


def configure(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    sys.stdout.write(load_vectors_text())
    return 0
