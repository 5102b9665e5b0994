"""Fixtures for the connect/serve tests (helpers live in iohelpers.py)."""

from __future__ import annotations

import logging

import pytest
from iohelpers import Setup, make_setup


@pytest.fixture
def setup() -> Setup:
    """Matching client/server configurations (PSK authentication, QKD required over MemoryKeyLink)."""
    return make_setup()


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures the servers' rejection lines (logger ``hybridkex.server``)."""
    caplog.set_level(logging.INFO, logger="hybridkex")
    return caplog
