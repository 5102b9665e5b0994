"""Fixtures for the tunnel tests: the echo service and tunnel processes, all cleaned up afterwards."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tunnelhelpers, without a package __init__

from tunnelhelpers import EchoService, Tunnels


@pytest.fixture
def echo() -> Iterator[EchoService]:
    service = EchoService()
    yield service
    service.close()


@pytest.fixture
def tunnels(tmp_path: Path) -> Iterator[Tunnels]:
    t = Tunnels(tmp_path)
    yield t
    t.stop_all()
