"""``hybridkex vectors``: print the hybridkex-v1 known-answer vectors as JSON."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from ..exceptions import HybridKEXError

HELP = "print the hybridkex-v1 combiner known-answer vectors (JSON; --steady: the steady state's)"
VECTORS_NAME = "hybridkex-v1.json"
#: The steady state's vectors (docs/spec.md section 12).
STEADY_VECTORS_NAME = "hybridkex-v1-steady.json"


def load_vectors_text(name: str = VECTORS_NAME) -> str:
    """The vectors: shipped in the wheel (``hybridkex/_data``), or in a source tree (``tests/vectors``)."""
    packaged = resources.files("hybridkex").joinpath("_data", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parents[2] / "tests" / "vectors" / name
    if source_tree.is_file():
        return source_tree.read_text(encoding="utf-8")
    raise HybridKEXError(f"the {name} vectors are missing from this installation; reinstall hybridkex")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steady", action="store_true",
                        help="the steady state's vectors (docs/spec.md section 12) instead of the combiner's")


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(load_vectors_text(STEADY_VECTORS_NAME if args.steady else VECTORS_NAME))
    return 0
