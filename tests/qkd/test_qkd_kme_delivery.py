"""Delivery guarantees of the simulated KME pair: exactly once under concurrency, exhaustion and recovery.

All over real HTTPS with mutual TLS, using our clients (each thread its own client, so that the
KME, not the client's local reuse check, is what refuses a second delivery).
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from qkdhelpers import https_request, sae_args

from hybridkex.exceptions import KeyUnavailableError
from hybridkex.qkd import (
    AsyncETSI014Client,
    KMEBadRequestError,
    KMEKeyNotFoundError,
    KMEUnavailableError,
    QKDKey,
)
from hybridkex.qkd.kme import SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI

THREADS = 8


def test_parallel_enc_and_dec_keys_deliver_each_key_exactly_once(kmes: SimulatedKMEPair) -> None:
    """Producers take keys at KME A while consumers race to fetch each one at KME B, twice over."""
    issued: dict[str, bytes] = {}
    issued_lock = threading.Lock()
    work: queue.Queue[str | None] = queue.Queue()
    delivered: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    mismatched: list[str] = []
    errors: list[BaseException] = []
    results_lock = threading.Lock()

    def producer() -> None:
        try:
            with kmes.key_source("sae-a") as master:
                for _ in range(20):
                    keys = master.get_keys("sae-b", number=random.choice((1, 3, 8)))
                    with issued_lock:
                        for k in keys:
                            assert k.key_id not in issued
                            issued[k.key_id] = k.key
                    for k in keys:  # every ID is queued twice: two slaves race for it
                        work.put(k.key_id)
                        work.put(k.key_id)
        except BaseException as exc:
            errors.append(exc)

    def consumer() -> None:
        try:
            with kmes.key_source("sae-b") as slave_1, kmes.key_source("sae-b") as slave_2:
                while (key_id := work.get(timeout=30)) is not None:
                    slave = random.choice((slave_1, slave_2))
                    if key_id in slave._fetched:  # this client fetched it already; use the other one
                        slave = slave_2 if slave is slave_1 else slave_1
                    try:
                        (key,) = slave.get_keys_by_id("sae-a", [key_id])
                    except KMEKeyNotFoundError:
                        with results_lock:
                            refused[key_id] += 1
                        continue
                    with results_lock:
                        delivered[key_id] += 1
                        with issued_lock:
                            if issued.get(key_id) != key.key:
                                mismatched.append(key_id)
        except BaseException as exc:
            errors.append(exc)

    before = kmes.store.stats()
    producers = [threading.Thread(target=producer) for _ in range(THREADS // 2)]
    consumers = [threading.Thread(target=consumer) for _ in range(THREADS)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join(60)
    for _ in consumers:
        work.put(None)
    for t in consumers:
        t.join(60)
    assert not errors, errors
    assert issued, "no key was issued"
    assert set(delivered) == set(issued), "a key was lost"
    assert all(n == 1 for n in delivered.values()), "a key was delivered twice"
    assert refused == Counter(dict.fromkeys(issued, 1)), "each second attempt must be refused"
    assert not mismatched
    after = kmes.store.stats()
    assert after.keys_issued - before.keys_issued == len(issued)
    assert after.keys_delivered - before.keys_delivered == len(issued)


def test_parallel_async_requests_get_distinct_keys(kmes: SimulatedKMEPair) -> None:
    async def main() -> tuple[list[QKDKey], list[QKDKey]]:
        async with kmes.async_key_source("sae-a") as master, kmes.async_key_source("sae-b") as slave:
            batches = await asyncio.gather(*(master.get_keys("sae-b", 4) for _ in range(40)))
            keys = [k for batch in batches for k in batch]
            chunks = [keys[i:i + 16] for i in range(0, len(keys), 16)]
            fetched = await asyncio.gather(*(slave.get_keys_by_id("sae-a", [k.key_id for k in c]) for c in chunks))
            return keys, [k for chunk in fetched for k in chunk]

    keys, fetched = asyncio.run(main())
    assert len({k.key_id for k in keys}) == len(keys) == 160
    assert fetched == keys


def test_exhaustion_gives_503_and_the_link_refills(make_pair: Callable[..., SimulatedKMEPair], pki: DemoPKI) -> None:
    # 4 keys of 256 bits in store, refilled at 2 keys per second.
    pair = make_pair(rate_bps=512, capacity_bits=1024)
    master = pair.key_source("sae-a", retries=0)
    assert len(master.get_keys("sae-b", 4)) == 4
    resp = https_request(pair.url_a, "POST", "/api/v1/keys/sae-b/enc_keys", pki=pki, body={"number": 4})
    assert resp.status == 503
    assert resp.json["message"] == "Error on server side."
    assert int(resp.headers["retry-after"]) >= 1
    with pytest.raises(KMEUnavailableError) as info:
        master.get_keys("sae-b", 4)
    assert info.value.status == 503 and isinstance(info.value, KeyUnavailableError)
    # Recovery: poll (bounded) until the link has produced a key again.
    deadline = time.monotonic() + 20
    while True:
        try:
            (key,) = master.get_keys("sae-b", 1)
            break
        except KMEUnavailableError:
            assert time.monotonic() < deadline, "the link never refilled"
            time.sleep(0.1)
    slave = pair.key_source("sae-b")
    assert slave.get_keys_by_id("sae-a", [key.key_id]) == [key]


def test_client_retries_through_503_until_the_link_refills(make_pair: Callable[..., SimulatedKMEPair]) -> None:
    pair = make_pair(rate_bps=1024, capacity_bits=1024)  # 4 keys stored, refills in ~1 s
    master = pair.key_source("sae-a", retries=6, backoff=0.2, max_backoff=2.0)
    first = master.get_keys("sae-b", 4)
    before = pair.store.stats().rejected_requests
    second = master.get_keys("sae-b", 2)  # needs the link to refill; the client waits (Retry-After)
    assert pair.store.stats().rejected_requests > before  # it did get 503 first
    assert not {k.key_id for k in first} & {k.key_id for k in second}


def test_status_reports_the_stock(make_pair: Callable[..., SimulatedKMEPair]) -> None:
    pair = make_pair(rate_bps=0, capacity_bits=2560)  # 10 keys, no refill
    master = pair.key_source("sae-a")
    status = master.status("sae-b")
    assert (status.stored_key_count, status.max_key_count) == (10, 10)
    master.get_keys("sae-b", 3)
    assert master.status("sae-b").stored_key_count == 7
    master.get_keys("sae-b", 1, 512)
    assert master.status("sae-b").stored_key_count == 5


def test_self_pair_is_refused(kmes: SimulatedKMEPair) -> None:
    """A master may not name itself as slave: it could fetch its own key a second time via dec_keys."""
    before = kmes.store.stats().keys_issued
    with kmes.key_source("sae-a") as a:
        with pytest.raises(KMEBadRequestError, match="cannot be a slave of its own keys"):
            a.get_keys("sae-a")
        with pytest.raises(KMEBadRequestError, match="additional_slave_SAE_IDs 'sae-a'"):
            a.enc_keys("sae-b", additional_slave_sae_ids=["sae-a"])
    assert kmes.store.stats().keys_issued == before


def _args(kmes: SimulatedKMEPair, name: str) -> dict[str, Any]:
    return {"url": kmes.url_for(name), **sae_args(kmes.pki, name)}


def test_async_client_against_a_pair_started_in_process(kmes: SimulatedKMEPair) -> None:
    async def main() -> None:
        async with AsyncETSI014Client(**_args(kmes, "sae-b")) as b:
            await b.connect()
            assert b.kme_id == "kme-b"
            status = await b.status("sae-a")
            assert status.source_kme_id == "kme-b"

    asyncio.run(main())


def test_pair_with_a_throwaway_pki_cleans_up() -> None:
    with SimulatedKMEPair.start(rate_bps=1e6) as pair:
        directory = pair.pki.directory
        assert pair.pki.cert("peer-a").is_file()  # the peers' certificates are there for the tunnel/demo
        with pair.key_source("sae-a") as a, pair.key_source("sae-b") as b:
            keys = a.get_keys("sae-b", 2)
            assert b.get_keys_by_id("sae-a", [k.key_id for k in keys]) == keys
    assert not directory.exists()
    pair.stop()  # idempotent


def test_pair_refuses_bad_settings(pki: DemoPKI) -> None:
    from hybridkex.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError):
        SimulatedKMEPair.start(pki, saes_a=("sae-a",), saes_b=("sae-a",))
    with pytest.raises(ConfigurationError):
        SimulatedKMEPair.start(pki, port_a=70000)
    with pytest.raises(ConfigurationError):
        SimulatedKMEPair.start(pki, rate_bps=-1)
