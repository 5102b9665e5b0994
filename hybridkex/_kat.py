"""Where the hybridkex-v1 known-answer vectors live: shipped in the wheel, or in a source tree."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .exceptions import HybridKEXError

VECTORS_NAME = "hybridkex-v1.json"


def load_vectors_text() -> str:
    packaged = resources.files("hybridkex").joinpath("_data", VECTORS_NAME)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parent.parent / "tests" / "vectors" / VECTORS_NAME
    if source_tree.is_file():
        return source_tree.read_text(encoding="utf-8")
    raise HybridKEXError(f"the {VECTORS_NAME} vectors are missing from this installation; reinstall hybridkex")
