"""The state and decisions of the master-side key pool, shared by :class:`~.pool.KeyPool` (a thread)
and :class:`~.pool.AsyncKeyPool` (a task).  No I/O here; every method is called with the core's lock
held.

Stale keys: when a KME turns out not to know a key this pool handed out (it restarted without
persistence), :meth:`_PoolCore.discard_stale` drops that slave's queue and starts a new
*generation*: a fetch that was in flight then delivers into the old generation, so its keys are
dropped too, and later reports about keys of an old generation change nothing (they were dropped
already).  Such a report may come from an unauthenticated peer (its Abort), so the drops of one
slave's queue are rate-limited: up to ``_STALE_BURST`` in a row (KME restarts close together), then
one per ``stale_discard_interval`` seconds.  A dropped key is gone from memory: it is never handed
out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from ..exceptions import AlreadyFinalized, ConfigurationError
from .base import QKDKey

log = logging.getLogger("hybridkex.qkd.pool")

_DEFAULT_BATCH = 32
_EWMA_WEIGHT = 0.2
# Key IDs the pool got that it remembers (with their generation) to judge a stale-key report.
_ISSUED_MEMORY = 16384
# Stale-key drops of one queue allowed in a row before the rate limit applies.
_STALE_BURST = 3.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a key pool (no key material).

    Attributes:
        level: keys ready, all slaves together; ``levels`` per slave SAE.
        fetched: keys received by the background refill.
        handed_out: keys given to callers (from the pool or fetched directly).
        pool_hits: requests answered from the pool without contacting the KME.
        direct_fetches: requests that had to go to the KME because the pool was short.
        discarded: keys dropped unused (expired, stale, or at close).
        fetch_failures: failed background fetches; ``consecutive_failures`` since the last success.
        last_error: type and message of the last failure (never key material).
        last_fetch_latency, mean_fetch_latency: seconds per background fetch (mean is an EWMA).
        running: the refill worker is active.
        stale_discards: times a slave's queue was dropped because a KME did not know one of its keys.
    """

    level: int
    levels: dict[str, int]
    fetched: int
    handed_out: int
    pool_hits: int
    direct_fetches: int
    discarded: int
    fetch_failures: int
    consecutive_failures: int
    last_error: str | None
    last_fetch_latency: float | None
    mean_fetch_latency: float | None
    running: bool
    stale_discards: int = 0


class PoolSettings(TypedDict, total=False):
    """The tuning both pools take as keyword arguments (described on :class:`~.pool.KeyPool`)."""

    size_bits: int
    low_watermark: int
    high_watermark: int
    batch_size: int | None
    max_key_age: float | None
    retry_backoff: float
    max_retry_backoff: float
    stale_discard_interval: float
    clock: Callable[[], float]


@dataclass
class _SubPool:
    slave: str
    keys: deque[tuple[QKDKey, float]] = field(default_factory=deque)
    filling: bool = True
    in_flight: bool = False
    retry_at: float = 0.0
    failures: int = 0
    batch: int | None = None
    generation: int = 0  # bumped by discard_stale()
    fetch_generation: int = 0  # the generation the in-flight fetch delivers into
    stale_tokens: float = _STALE_BURST  # rate limit of discard_stale() (a token bucket)
    stale_at: float | None = None


class _PoolCore:
    """The pool's state and decisions; no I/O, so the thread and asyncio variants share it."""

    def __init__(
        self,
        slaves: Iterable[str],
        *,
        size_bits: int = 256,
        low_watermark: int = 16,
        high_watermark: int = 64,
        batch_size: int | None = None,
        max_key_age: float | None = None,
        retry_backoff: float = 0.5,
        max_retry_backoff: float = 30.0,
        stale_discard_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size_bits <= 0 or size_bits % 8:
            raise ConfigurationError("must be a positive multiple of 8", field="size_bits")
        if not 0 <= low_watermark < high_watermark:
            raise ConfigurationError("need 0 <= low_watermark < high_watermark", field="low_watermark")
        if batch_size is not None and batch_size < 1:
            raise ConfigurationError("must be >= 1", field="batch_size")
        if max_key_age is not None and max_key_age <= 0:
            raise ConfigurationError("must be > 0 seconds", field="max_key_age")
        if not 0 < retry_backoff <= max_retry_backoff:
            raise ConfigurationError("need 0 < retry_backoff <= max_retry_backoff", field="retry_backoff")
        if stale_discard_interval < 0:
            raise ConfigurationError("must be >= 0 seconds", field="stale_discard_interval")
        self.size_bits = size_bits
        self.low = low_watermark
        self.high = high_watermark
        self.batch_size = batch_size
        self.max_key_age = max_key_age
        self.retry_backoff = retry_backoff
        self.max_retry_backoff = max_retry_backoff
        self.clock = clock
        self.stale_interval = stale_discard_interval
        self.issued: OrderedDict[str, tuple[str, int]] = OrderedDict()  # key ID -> (slave, generation)
        self.lock = threading.Lock()
        self.subs: dict[str, _SubPool] = {}
        self.closed = False
        self.source_closed = False
        self.c = dict.fromkeys(("fetched", "handed_out", "hits", "direct", "discarded", "failures", "stale"), 0)
        self.last_error: str | None = None
        self.last_latency: float | None = None
        self.mean_latency: float | None = None
        for s in slaves:
            self.subs[s] = _SubPool(s)

    # Everything below runs with self.lock held, except where noted.

    def _expire(self, sub: _SubPool, now: float) -> None:
        if self.max_key_age is None:
            return
        while sub.keys and now - sub.keys[0][1] > self.max_key_age:
            sub.keys.popleft()
            self.c["discarded"] += 1

    def take(self, slave: str, number: int, size_bits: int) -> tuple[list[QKDKey] | None, bool]:
        """Keys from the pool, or ``None`` (fetch directly); second item: wake the refill worker."""
        if self.closed:
            raise AlreadyFinalized("the key pool is closed")
        if size_bits != self.size_bits or number > self.high:
            self.c["direct"] += 1
            return None, False
        wake = False
        sub = self.subs.get(slave)
        if sub is None:
            sub = self.subs[slave] = _SubPool(slave)
            wake = True
        self._expire(sub, self.clock())
        if len(sub.keys) < number:
            self.c["direct"] += 1
            return None, True
        keys = [sub.keys.popleft()[0] for _ in range(number)]
        self.c["hits"] += 1
        self.c["handed_out"] += number
        if len(sub.keys) <= self.low and not sub.filling:
            sub.filling = True
            wake = True
        return keys, wake

    def note_direct(self, slave: str, keys: Sequence[QKDKey]) -> None:
        self.c["handed_out"] += len(keys)
        sub = self.subs.get(slave)
        if sub is not None:
            self._remember(sub, keys)

    def _remember(self, sub: _SubPool, keys: Sequence[QKDKey]) -> None:
        for k in keys:
            self.issued[k.key_id.lower()] = (sub.slave, sub.generation)
        while len(self.issued) > _ISSUED_MEMORY:
            self.issued.popitem(last=False)

    def discard_stale(self, slave: str, key_ids: Sequence[str], reporter: str) -> int:
        """A KME does not know ``key_ids`` (shared with ``slave``): drop that slave's queue, if due.

        Returns the number of keys dropped (0 when the report changes nothing).
        """
        sub = self.subs.get(slave)
        if sub is None or self.closed:
            return 0
        generations = [entry[1] for i in key_ids if (entry := self.issued.get(i.lower())) and entry[0] == slave]
        if generations and max(generations) < sub.generation:
            return 0  # keys of an earlier generation: that queue was dropped already
        now = self.clock()
        if sub.stale_at is not None:
            refill = (now - sub.stale_at) / self.stale_interval if self.stale_interval else _STALE_BURST
            sub.stale_tokens = min(_STALE_BURST, sub.stale_tokens + refill)
        sub.stale_at = now
        if sub.stale_tokens < 1:
            log.info("key pool: stale-key report for slave %s (%s) ignored: too many lately (one per %g s)",
                     slave, reporter, self.stale_interval)
            return 0
        sub.stale_tokens -= 1
        dropped = len(sub.keys)
        sub.keys.clear()
        sub.generation += 1
        sub.filling = True
        self.c["discarded"] += dropped
        self.c["stale"] += 1
        log.warning("key pool: %s does not know QKD key(s) %s for slave %s (did the KME restart without --db?); "
                    "dropped %d pooled key(s) and refilling", reporter, ", ".join(key_ids) or "of this pool", slave,
                    dropped)
        return dropped

    def plan(self) -> tuple[list[tuple[_SubPool, int]], float | None]:
        """Batches to fetch now, and how long to sleep if there is nothing to do (``None``: until woken)."""
        now = self.clock()
        work: list[tuple[_SubPool, int]] = []
        wait: float | None = None
        if self.source_closed:
            return work, None
        for sub in self.subs.values():
            self._expire(sub, now)
            level = len(sub.keys)
            if level <= self.low:
                sub.filling = True
            if level >= self.high:
                sub.filling = False
            if not sub.filling or sub.in_flight:
                continue
            if sub.retry_at > now:
                wait = min(wait, sub.retry_at - now) if wait is not None else sub.retry_at - now
                continue
            limit = self.batch_size or sub.batch or _DEFAULT_BATCH
            if sub.batch is not None:
                limit = min(limit, sub.batch)
            work.append((sub, max(1, min(limit, self.high - level))))
            sub.in_flight = True
            sub.fetch_generation = sub.generation
        if self.max_key_age is not None:
            oldest = [sub.keys[0][1] for sub in self.subs.values() if sub.keys]
            if oldest:
                until = min(oldest) + self.max_key_age - now
                wait = min(wait, until) if wait is not None else until
        return work, (max(wait, 0.01) if wait is not None else None)

    def deposit(self, sub: _SubPool, keys: Sequence[QKDKey], latency: float) -> None:
        sub.in_flight = False
        if self.closed or sub.fetch_generation != sub.generation:  # closed, or fetched before a stale-key report
            self.c["discarded"] += len(keys)
            return
        now = self.clock()
        sub.keys.extend((k, now) for k in keys)
        self._remember(sub, keys)
        sub.failures = 0
        sub.retry_at = 0.0
        self.c["fetched"] += len(keys)
        self.last_latency = latency
        self.mean_latency = latency if self.mean_latency is None else (
            (1 - _EWMA_WEIGHT) * self.mean_latency + _EWMA_WEIGHT * latency
        )
        if len(sub.keys) >= self.high:
            sub.filling = False

    def failed(self, sub: _SubPool, exc: BaseException) -> None:
        sub.in_flight = False
        if self.closed or isinstance(exc, AlreadyFinalized):
            # Shutdown, not a KME failure: the pool, or the source under it, was closed while this fetch
            # was in flight (an owner closing the source first).  A closed source serves nothing more,
            # so the refill stops; keys already pooled can still be handed out.
            self.source_closed = self.source_closed or not self.closed
            log.debug("key pool: fetch for slave %s ended by shutdown (%s)", sub.slave, type(exc).__name__)
            return
        sub.failures += 1
        delay = min(self.max_retry_backoff, self.retry_backoff * 2 ** (sub.failures - 1))
        sub.retry_at = self.clock() + delay
        self.c["failures"] += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("key pool: fetch for slave %s failed (%s); retrying in %.1f s", sub.slave, self.last_error, delay)

    def learned_batch(self, sub: _SubPool, max_key_per_request: int) -> None:
        sub.batch = max(1, max_key_per_request)

    def close(self) -> int:
        self.closed = True
        dropped = sum(len(s.keys) for s in self.subs.values())
        for s in self.subs.values():
            s.keys.clear()
        self.c["discarded"] += dropped
        return dropped

    def stats(self, running: bool) -> PoolStats:
        levels = {s.slave: len(s.keys) for s in self.subs.values()}
        c = self.c
        return PoolStats(
            level=sum(levels.values()), levels=levels, fetched=c["fetched"], handed_out=c["handed_out"],
            pool_hits=c["hits"], direct_fetches=c["direct"], discarded=c["discarded"],
            fetch_failures=c["failures"],
            consecutive_failures=max((s.failures for s in self.subs.values()), default=0),
            last_error=self.last_error, last_fetch_latency=self.last_latency,
            mean_fetch_latency=self.mean_latency, running=running, stale_discards=c["stale"],
        )

    def level(self, slave: str | None) -> int:
        if slave is not None:
            sub = self.subs.get(slave)
            return len(sub.keys) if sub else 0
        return sum(len(s.keys) for s in self.subs.values())
