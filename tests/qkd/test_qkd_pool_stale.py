"""Stale pooled keys: what the pool and the key manager do when a KME does not know a key any more.

Over the in-memory QKD link (the stand-in for QKD hardware); the end-to-end behaviour across a real
``hybridkex kme`` restart is in test_qkd_kme_restart.py and tests/tunnel/test_tunnel_kme_restart.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

import pytest

from hybridkex import KeyBudget
from hybridkex.exceptions import QKDKeyUnknownError
from hybridkex.io import QKDKeyManager
from hybridkex.protocol import QKDKeysByIdRequired, QKDKeysRequired
from hybridkex.qkd import AsyncKeyPool, KeyPool, MemoryKeyLink, QKDKey, ThreadedAsyncKeySource

MASTER, SLAVE = "sae-master", "sae-slave"


class Recording:
    """A key source that records every key it hands out, and can hold a fetch until released."""

    def __init__(self, link: MemoryKeyLink) -> None:
        self._source = link.source(MASTER, 0)
        self.ids: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    sae_id = property(lambda self: self._source.sae_id)
    kme_id = property(lambda self: self._source.kme_id)

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        keys = self._source.get_keys(slave_sae_id, number, size_bits)
        self.ids.extend(k.key_id for k in keys)
        self.waiting.set()
        assert self.gate.wait(20)
        return keys

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        return self._source.get_keys_by_id(master_sae_id, key_ids)

    def status(self, slave_sae_id: str) -> object:
        return self._source.status(slave_sae_id)


def take_ids(pool: KeyPool, n: int) -> set[str]:
    return {pool.get_keys(SLAVE)[0].key_id for _ in range(n)}


def test_a_stale_report_drops_the_queue_and_no_dropped_key_is_ever_handed_out(caplog: pytest.LogCaptureFixture) -> None:
    source = Recording(MemoryKeyLink())
    with KeyPool(source, [SLAVE], low_watermark=2, high_watermark=8, batch_size=8) as pool:  # type: ignore[arg-type]
        assert pool.wait_ready(20)
        (first,) = pool.get_keys(SLAVE)
        pooled = set(source.ids) - {first.key_id}
        with caplog.at_level(logging.WARNING, logger="hybridkex.qkd.pool"):
            assert pool.discard_stale(SLAVE, [first.key_id]) == 7
        assert "does not know QKD key(s)" in caplog.text and first.key_id in caplog.text
        stats = pool.stats()
        assert (stats.stale_discards, stats.discarded) == (1, 7)
        # The same report again (or for another key of the dropped batch) changes nothing.
        assert pool.discard_stale(SLAVE, [first.key_id]) == 0
        assert pool.discard_stale(SLAVE, [next(iter(pooled))]) == 0
        assert pool.stats().stale_discards == 1
        later = take_ids(pool, 30)
        assert not later & (pooled | {first.key_id})  # a dropped key is never used


def test_a_fetch_in_flight_at_the_report_delivers_into_the_old_generation() -> None:
    source = Recording(MemoryKeyLink())
    source.gate.clear()
    with KeyPool(source, [SLAVE], low_watermark=2, high_watermark=8, batch_size=8) as pool:  # type: ignore[arg-type]
        assert source.waiting.wait(20)  # the first fetch took its keys and is held
        in_flight = set(source.ids)
        pool.discard_stale(SLAVE, [])
        source.gate.set()
        assert pool.wait_ready(20)  # refilled by a later fetch
        assert pool.stats().discarded >= len(in_flight) == 8
        assert not take_ids(pool, 20) & in_flight


def test_stale_reports_are_rate_limited() -> None:
    now = [1000.0]
    source = Recording(MemoryKeyLink())
    with KeyPool(source, [SLAVE], low_watermark=1, high_watermark=4, batch_size=4, stale_discard_interval=5.0,  # type: ignore[arg-type]
                 clock=lambda: now[0]) as pool:
        results = []
        for _ in range(4):  # each report names a key of the current generation
            assert pool.wait_ready(20, minimum=1)
            (key,) = pool.get_keys(SLAVE)
            results.append(pool.discard_stale(SLAVE, [key.key_id]))
        assert [r > 0 for r in results] == [True, True, True, False]  # 3 in a row, then the limit
        now[0] += 5.0
        assert pool.wait_ready(20, minimum=1)
        (key,) = pool.get_keys(SLAVE)
        assert pool.discard_stale(SLAVE, [key.key_id]) > 0  # one more per interval
        assert pool.stats().stale_discards == 4


def test_unknown_slave_and_closed_pool_reports_change_nothing() -> None:
    with KeyPool(Recording(MemoryKeyLink()), [SLAVE], low_watermark=2, high_watermark=8) as pool:  # type: ignore[arg-type]
        assert pool.wait_ready(20)
        assert pool.discard_stale("someone-else", []) == 0
        assert pool.level(SLAVE) == 8
    assert pool.discard_stale(SLAVE, []) == 0


def test_async_pool_and_threaded_adapter_drop_stale_keys() -> None:
    link = MemoryKeyLink()

    async def main() -> None:
        async with AsyncKeyPool(ThreadedAsyncKeySource(link.source(MASTER, 0)), [SLAVE], low_watermark=2,
                                high_watermark=8, batch_size=8) as pool:
            assert await pool.wait_ready(20)
            (key,) = await pool.get_keys(SLAVE)
            # Called from another thread, as the key manager's worker would.
            assert await asyncio.to_thread(pool.discard_stale, SLAVE, [key.key_id]) == 7
            assert await pool.wait_ready(20)
            assert pool.stats().stale_discards == 1

    asyncio.run(main())
    with KeyPool(link.source(MASTER, 0), [SLAVE], low_watermark=2, high_watermark=8) as sync_pool:
        assert sync_pool.wait_ready(20)
        assert ThreadedAsyncKeySource(sync_pool).discard_stale(SLAVE, []) == 8
    assert ThreadedAsyncKeySource(link.source(MASTER, 0)).discard_stale(SLAVE, []) == 0


def test_key_manager_drops_a_stale_epoch_key_and_tells_its_pool() -> None:
    link = MemoryKeyLink()
    budget = KeyBudget(mode="epoch", epoch_max_handshakes=100)
    with KeyPool(link.source(MASTER, 0), [SLAVE], low_watermark=2, high_watermark=8) as pool:
        assert pool.wait_ready(20)
        manager = QKDKeyManager(pool, budget)
        request = QKDKeysRequired(SLAVE, 1, 256, "epoch")
        epoch = manager.take(request)
        assert manager.take(request) == epoch  # the epoch key is served again...
        # ...until the peer reports it unknown: then it is dropped, with the pooled keys.
        assert manager.key_unknown(SLAVE, [epoch[0].key_id], reported_by_peer=True) == 7
        fresh = manager.take(request)
        assert fresh != epoch and fresh[0].key_id != epoch[0].key_id
        # A peer's report about other keys leaves the current epoch key alone.
        manager.key_unknown(SLAVE, ["00000000-0000-4000-8000-000000000000"], reported_by_peer=True)
        assert manager.take(request) == fresh
    # A source that does not pool: nothing to drop.
    plain = QKDKeyManager(link.source(MASTER, 0))
    assert plain.key_unknown(SLAVE, [], reported_by_peer=False) == 0


def test_the_slave_side_names_the_keys_its_kme_does_not_know() -> None:
    link = MemoryKeyLink()
    (key,) = link.source(MASTER, 0).get_keys(SLAVE)
    link.forget_pending()
    manager = QKDKeyManager(link.source(SLAVE, 1))
    with pytest.raises(QKDKeyUnknownError) as info:
        manager.fetch(QKDKeysByIdRequired(MASTER, (key.key_id,), "fresh"))
    assert info.value.key_ids == (key.key_id,)
