"""Fixtures for the QKD tests: one demo PKI and one simulated KME pair per session, plus factories."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openapicheck import Recorder, violation
from qkdhelpers import SyncOverAsync

from hybridkex.qkd.kme import SimulatedKMEPair
from hybridkex.qkd.kme import pair as kme_pair
from hybridkex.qkd.pki import DemoPKI


@pytest.fixture(scope="session", autouse=True)
def kme_answers() -> Iterator[Recorder]:
    """Every answer of every in-process KME these tests start, recorded for the OpenAPI check."""
    recorder = Recorder()
    create = kme_pair.create_kme_app
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kme_pair, "create_kme_app", lambda *a, **kw: recorder.attach(create(*a, **kw)))
        yield recorder


@pytest.fixture(autouse=True)
def kme_answers_conform(kme_answers: Recorder) -> Iterator[None]:
    """After each test: the KME answers since the last check (this test's, and background refills
    between tests) conform to the OpenAPI document."""
    yield
    wrong = [why for ex in kme_answers.take() if (why := violation(ex)) is not None]
    assert not wrong, "KME answers violate its OpenAPI document:\n" + "\n".join(wrong[:10])


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    """kme-a, kme-b, sae-a, sae-b, peers, plus sae-c (served by KME B, never a slave of sae-a's keys)."""
    p = DemoPKI.create(tmp_path_factory.mktemp("pki"))
    p.issue("sae-c", kind="sae")
    p.issue("sae-d", kind="sae")  # known to the CA, served by neither KME
    return p


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    """An unrelated CA with the same names: its certificates must be refused everywhere."""
    return DemoPKI.create(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture(scope="session")
def kmes(pki: DemoPKI) -> Iterator[SimulatedKMEPair]:
    """The shared KME pair: fast link, large store, sae-a at A, sae-b and sae-c at B."""
    with SimulatedKMEPair.start(pki, rate_bps=50_000_000, capacity_bits=1 << 24, saes_b=("sae-b", "sae-c")) as pair:
        yield pair


@pytest.fixture
def make_pair(pki: DemoPKI) -> Iterator[Callable[..., SimulatedKMEPair]]:
    """Start extra KME pairs with custom settings; all stopped at the end of the test."""
    started: list[SimulatedKMEPair] = []

    def make(**kwargs: Any) -> SimulatedKMEPair:
        kwargs.setdefault("saes_b", ("sae-b", "sae-c"))
        pair = SimulatedKMEPair.start(pki, **kwargs)
        started.append(pair)
        return pair

    yield make
    for pair in started:
        pair.stop()


@pytest.fixture(params=["sync", "async"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_client(client_kind: str) -> Iterator[Callable[..., Any]]:
    """Build an ETSI014Client or (driven synchronously) an AsyncETSI014Client with the same arguments."""
    from hybridkex.qkd import AsyncETSI014Client, ETSI014Client

    made: list[Any] = []

    def make(url: str, **kwargs: Any) -> Any:
        if client_kind == "sync":
            client: Any = ETSI014Client(url, **kwargs)
        else:
            client = SyncOverAsync(AsyncETSI014Client(url, **kwargs))
        made.append(client)
        return client

    yield make
    for c in made:
        (c.dispose if isinstance(c, SyncOverAsync) else c.close)()

