"""The tunnel and its KME, over the REAL secure channel with real `hybridkex kme` processes.

What an operator sees when the KME is misconfigured, slow or gone: structured log lines only,
one clear error for a peer SAE the KME does not know, KME errors counted by kind, a current pool
gauge, and /healthz turning degraded/unhealthy with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kmehelpers import KMEProcess, make_pki, make_psk, secure_toml, start_secure
from tunnelhelpers import TunnelProcess

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def kme(pki: Path) -> Iterator[KMEProcess]:
    proc = KMEProcess(pki)
    yield proc
    proc.stop()


@pytest.fixture
def procs() -> Iterator[list[TunnelProcess]]:
    started: list[TunnelProcess] = []
    yield started
    for p in started:
        p.stop()


def test_every_line_is_structured_including_the_key_pool_and_kme_client(
        tmp_path: Path, pki: Path, kme: KMEProcess, procs: list[TunnelProcess]) -> None:
    # A peer SAE the KME does not know: the server's key pool fails to fill and says so, repeatedly.
    psk = make_psk(tmp_path / "a.psk")
    server = start_secure("server", tmp_path / "server.toml", secure_toml(
        listen="127.0.0.1:0", target="127.0.0.1:9", identity="server", peer="client-z", peer_sae="sae-zzz",
        psk=psk, kme_url=kme.url_b, sae="sae-b", pki=pki), procs)
    pool = server.wait_for(lambda r: r.get("logger") == "hybridkex.qkd.pool" and r["level"] == "warning",
                           "the key pool's fetch failure")
    assert "fetch for slave sae-zzz failed" in pool["msg"] and pool["event"] == "log", pool
    server.stop()
    records = server.records()  # raises if any line of stderr is not JSON
    assert records and all({"ts", "level", "event", "msg"} <= r.keys() for r in records), records
