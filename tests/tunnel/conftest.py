"""Fixtures for the tunnel tests: the echo service and tunnel processes, all cleaned up afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kmehelpers import KMEProcess, make_pki
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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo PKI (``hybridkex pki init``) for the tests that start a real KME."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def kme(pki: Path) -> Iterator[KMEProcess]:
    """A real ``hybridkex kme`` process, stopped afterwards."""
    proc = KMEProcess(pki)
    yield proc
    proc.stop()
