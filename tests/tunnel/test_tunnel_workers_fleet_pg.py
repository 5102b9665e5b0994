"""Two tunnel servers x 2 workers sharing one PostgreSQL behind a round-robin balancer (fleethelpers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fleethelpers import run_fleet
from statehelpers import PG, pg_session

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pg() -> Iterator[PG]:
    yield from pg_session()


@pytest.mark.parametrize("total", [200, pytest.param(2000, marks=pytest.mark.slow)])
def test_two_servers_with_two_workers_share_postgresql(request: pytest.FixtureRequest, tmp_path: Path,
                                                       pg: PG, total: int) -> None:
    kme, pki, echo = (request.getfixturevalue(name) for name in ("kme", "pki", "echo"))
    run_fleet(tmp_path, kme, pki, echo, url=pg.new_url(), servers=2, total=total, restart=pg)
