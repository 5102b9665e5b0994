"""Shared test helpers for the whole suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).parent / "vectors"


def load_vectors(name: str) -> Any:
    """Load a vector file from tests/vectors/ (published files keep their upstream format)."""
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


@pytest.fixture
def vectors() -> Any:
    return load_vectors
