"""Two workers of one tunnel server sharing one SQLite state file on this host (fleethelpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleethelpers import run_fleet
from kmehelpers import KMEProcess
from tunnelhelpers import EchoService

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("total", [200, pytest.param(2000, marks=pytest.mark.slow)])
def test_two_workers_share_one_sqlite_file(tmp_path: Path, kme: KMEProcess, pki: Path, echo: EchoService,
                                           total: int) -> None:
    run_fleet(tmp_path, kme, pki, echo, url=str(tmp_path / "state.sqlite3"), servers=1, total=total)
