"""The master-side key pool: pre-fetching, watermarks, hand-out-once, failures, shutdown.

Against the real simulated KME over mutual TLS (a dead port for the failure cases).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest
from qkdhelpers import free_port, sae_args

from hybridkex.exceptions import AlreadyFinalized, ConfigurationError
from hybridkex.qkd import (
    AsyncKeyPool,
    ETSI014Client,
    KeyPool,
    KeySource,
    KMEConnectionError,
    QKDKey,
    ThreadedAsyncKeySource,
)
from hybridkex.qkd.kme import SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI


def enc_requests(kmes: SimulatedKMEPair) -> int:
    return kmes.store.stats().enc_keys_requests


def test_pool_prefetches_to_the_high_watermark_in_batches(kmes: SimulatedKMEPair) -> None:
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=4, high_watermark=20, batch_size=8) as pool:
        assert isinstance(pool, KeySource)
        assert pool.wait_ready(20)
        stats = pool.stats()
        assert stats.level == stats.levels["sae-b"] == 20 == stats.fetched
        assert stats.running and stats.fetch_failures == 0
        assert stats.last_fetch_latency is not None and stats.mean_fetch_latency is not None


def test_handshake_side_takes_keys_without_contacting_the_kme(kmes: SimulatedKMEPair) -> None:
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=4, high_watermark=16) as pool, \
            kmes.key_source("sae-b") as slave:
        assert pool.wait_ready(20)
        before = enc_requests(kmes)
        taken = [pool.get_keys("sae-b") for _ in range(5)] + [pool.get_keys("sae-b", 3)]
        assert enc_requests(kmes) == before  # 16 -> 8 keys: above the low watermark, no refill yet
        keys = [k for batch in taken for k in batch]
        assert pool.level("sae-b") == 8 and pool.stats().pool_hits == 6
        # The slave gets the same keys by ID on demand.
        assert slave.get_keys_by_id("sae-a", [k.key_id for k in keys]) == keys


def test_pool_refills_after_the_low_watermark(kmes: SimulatedKMEPair) -> None:
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=4, high_watermark=12, batch_size=4) as pool:
        assert pool.wait_ready(20)
        pool.get_keys("sae-b", 9)  # 12 -> 3 <= low: refill to 12
        assert pool.wait_ready(20)
        assert pool.stats().fetched >= 21


def test_keys_are_handed_out_once_across_threads(kmes: SimulatedKMEPair) -> None:
    taken: list[QKDKey] = []
    lock = threading.Lock()
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=8, high_watermark=32, batch_size=16) as pool:
        pool.wait_ready(20)

        def worker() -> None:
            for _ in range(30):
                keys = pool.get_keys("sae-b", 2)
                with lock:
                    taken.extend(keys)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = pool.stats()
    ids = [k.key_id for k in taken]
    assert len(ids) == 480 and len(set(ids)) == 480
    assert stats.handed_out == 480
    # Every key handed out is retrievable by the slave exactly once.
    with kmes.key_source("sae-b") as slave:
        for i in range(0, 480, 96):
            assert slave.get_keys_by_id("sae-a", ids[i:i + 96]) == taken[i:i + 96]


def test_a_key_whose_handshake_failed_is_never_handed_out_again(kmes: SimulatedKMEPair) -> None:
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=2, high_watermark=8) as pool:
        pool.wait_ready(20)
        (first,) = pool.get_keys("sae-b")
        # ...the handshake using `first` fails; there is no way to give it back...
        assert not hasattr(pool, "put_back") and not hasattr(pool, "release")
        later = [k for _ in range(20) for k in pool.get_keys("sae-b")]
        assert first.key_id not in {k.key_id for k in later}


def test_other_sizes_and_large_requests_go_directly_to_the_kme(kmes: SimulatedKMEPair) -> None:
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=2, high_watermark=8) as pool:
        pool.wait_ready(20)
        assert len(pool.get_keys("sae-b", 1, 512)[0].key) == 64
        assert len(pool.get_keys("sae-b", 9)) == 9  # more than the pool ever holds
        stats = pool.stats()
        assert stats.direct_fetches == 2 and stats.handed_out == 10 and stats.level == 8


def test_unknown_slave_gets_its_own_queue(kmes: SimulatedKMEPair) -> None:
    with KeyPool(kmes.key_source("sae-a"), low_watermark=2, high_watermark=6) as pool:
        assert pool.level() == 0
        pool.get_keys("sae-b")  # first use: direct fetch, and the pool starts filling for sae-b
        assert pool.wait_ready(20)
        assert pool.level("sae-b") == 6 and pool.stats().direct_fetches == 1


def test_batches_follow_the_kmes_max_key_per_request(make_pair: Callable[..., SimulatedKMEPair]) -> None:
    from hybridkex.qkd.kme import KMELimits

    pair = make_pair(limits=KMELimits(max_key_per_request=5))
    with KeyPool(pair.key_source("sae-a"), ["sae-b"], low_watermark=2, high_watermark=23) as pool:
        assert pool.wait_ready(20)
        assert pair.store.stats().enc_keys_requests == 5  # 5+5+5+5+3
        assert pool.stats().fetched == 23


def test_kme_down_counts_failures_and_direct_fetch_fails_typed(pki: DemoPKI) -> None:
    source = ETSI014Client(f"https://127.0.0.1:{free_port()}", **sae_args(pki, "sae-a"), kme_id="kme-a", retries=0)
    with KeyPool(source, ["sae-b"], low_watermark=1, high_watermark=4, batch_size=4,
                 retry_backoff=0.05, max_retry_backoff=0.1) as pool:
        deadline = time.monotonic() + 20
        while pool.stats().fetch_failures < 2:
            assert time.monotonic() < deadline, "refill failures were not recorded"
            time.sleep(0.02)
        stats = pool.stats()
        assert stats.level == 0 and stats.consecutive_failures >= 2
        assert stats.last_error is not None and "KMEConnectionError" in stats.last_error
        with pytest.raises(KMEConnectionError):
            pool.get_keys("sae-b")
        assert stats.running


def test_pool_recovers_when_the_kme_comes_back(make_pair: Callable[..., SimulatedKMEPair], pki: DemoPKI) -> None:
    port = free_port()
    source = ETSI014Client(f"https://127.0.0.1:{port}", **sae_args(pki, "sae-a"), retries=0)
    with KeyPool(source, ["sae-b"], low_watermark=1, high_watermark=4, batch_size=4,
                 retry_backoff=0.05, max_retry_backoff=0.2) as pool:
        deadline = time.monotonic() + 20
        while pool.stats().fetch_failures < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        make_pair(port_a=port)
        assert pool.wait_ready(20)
        assert pool.stats().consecutive_failures == 0


def test_close_drops_keys_and_stops(kmes: SimulatedKMEPair) -> None:
    pool = KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=2, high_watermark=8)
    assert pool.wait_ready(20)
    pool.close()
    stats = pool.stats()
    assert stats.level == 0 and stats.discarded == 8 and not stats.running
    with pytest.raises(AlreadyFinalized):
        pool.get_keys("sae-b")
    pool.close()  # idempotent


def _wait_stopped(pool: KeyPool) -> None:
    deadline = time.monotonic() + 20
    while pool.stats().running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pool.stats().running


def test_a_source_closed_under_an_in_flight_fetch_is_not_a_kme_failure(
    make_pair: Callable[..., SimulatedKMEPair], caplog: pytest.LogCaptureFixture
) -> None:
    """An owner that closes the client before the pool (the tunnel did on a failed start) made the pool
    log ``key pool: fetch for slave ... failed (AlreadyFinalized: ...)`` and retry forever."""
    pair = make_pair(delay=0.2)  # every answer takes a while: the first fetch is in flight
    source = pair.key_source("sae-a")
    with caplog.at_level(logging.INFO, logger="hybridkex.qkd.pool"):
        # The first fetch (4 keys) is in flight at once: every answer of this KME takes 0.2 s.
        pool = KeyPool(source, ["sae-b"], low_watermark=2, high_watermark=8, batch_size=4)
        source.close()  # the in-flight fetch completes; the next one meets the closed client
        _wait_stopped(pool)  # the refill stops by itself: a closed source serves nothing more
        stats = pool.stats()
        pool.close()
    assert "key pool" not in caplog.text and "AlreadyFinalized" not in caplog.text
    assert stats.fetch_failures == 0 and stats.last_error is None


def test_a_fetch_failing_after_close_is_quiet(pki: DemoPKI, caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as black_hole:  # accepts, never answers (not even TLS)
        url = f"https://127.0.0.1:{black_hole.getsockname()[1]}"
        source = ETSI014Client(url, **sae_args(pki, "sae-a"), kme_id="kme-a", timeout=1.0, retries=0)
        with caplog.at_level(logging.INFO, logger="hybridkex.qkd.pool"):
            pool = KeyPool(source, ["sae-b"], low_watermark=2, high_watermark=8, batch_size=4)
            black_hole.settimeout(20)
            conn, _ = black_hole.accept()  # the pool's first fetch is now in flight
            pool.close(timeout=0)  # ...and fails after close, when its timeout passes
            _wait_stopped(pool)
            conn.close()
    source.close()
    assert "key pool" not in caplog.text
    assert pool.stats().fetch_failures == 0 and pool.stats().last_error is None


def test_max_key_age_discards_stale_keys(kmes: SimulatedKMEPair) -> None:
    now = [1000.0]
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=2, high_watermark=6, batch_size=6,
                 max_key_age=60, clock=lambda: now[0]) as pool:
        assert pool.wait_ready(20)
        stale = {k.key_id for s in [pool._core.subs["sae-b"]] for k, _ in s.keys}
        now[0] += 61
        (key,) = pool.get_keys("sae-b")
        assert key.key_id not in stale
        assert pool.stats().discarded >= 6


@pytest.mark.parametrize("kwargs", [
    {"low_watermark": 5, "high_watermark": 5},
    {"low_watermark": -1},
    {"batch_size": 0},
    {"size_bits": 12},
    {"max_key_age": 0},
    {"retry_backoff": 0},
])
def test_bad_pool_settings(kmes: SimulatedKMEPair, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        KeyPool(kmes.key_source("sae-a"), **kwargs, start=False)  # type: ignore[arg-type]


def test_async_pool(kmes: SimulatedKMEPair) -> None:
    async def main() -> None:
        async with kmes.async_key_source("sae-a") as source, kmes.async_key_source("sae-b") as slave, \
                AsyncKeyPool(source, ["sae-b"], low_watermark=4, high_watermark=16, batch_size=8) as pool:
            assert await pool.wait_ready(20)
            before = enc_requests(kmes)
            batches = await asyncio.gather(*(pool.get_keys("sae-b") for _ in range(10)))
            assert enc_requests(kmes) == before
            keys = [k for b in batches for k in b]
            assert len({k.key_id for k in keys}) == 10
            assert await slave.get_keys_by_id("sae-a", [k.key_id for k in keys]) == keys
            assert pool.level("sae-b") == 6  # above the low watermark: no refill yet
            await pool.get_keys("sae-b", 3)  # 3 <= 4: refill to 16
            assert await pool.wait_ready(20)
            assert pool.stats().running
        assert pool.level() == 0 and not pool.stats().running
        with pytest.raises(AlreadyFinalized):
            await pool.get_keys("sae-b")

    asyncio.run(main())


def test_threaded_async_adapter_over_a_sync_pool(kmes: SimulatedKMEPair) -> None:
    with KeyPool(kmes.key_source("sae-a"), ["sae-b"], low_watermark=2, high_watermark=8) as pool:
        pool.wait_ready(20)
        adapter = ThreadedAsyncKeySource(pool)

        async def main() -> list[QKDKey]:
            status = await adapter.status("sae-b")
            assert status.master_sae_id == adapter.sae_id == "sae-a" and adapter.kme_id == "kme-a"
            return await adapter.get_keys("sae-b", 2)

        keys = asyncio.run(main())
        assert len(keys) == 2 and pool.stats().pool_hits == 1
