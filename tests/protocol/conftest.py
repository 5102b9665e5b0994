"""Fixtures for the handshake tests (helpers live in helpers.py)."""

from __future__ import annotations

import pytest

from .helpers import QKDPair


@pytest.fixture
def qkd() -> QKDPair:
    """A fresh in-memory QKD link with a key manager per side (fresh key budget)."""
    return QKDPair.create()
