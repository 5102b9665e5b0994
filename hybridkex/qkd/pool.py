"""A pre-fetching QKD key pool for the master side, so a handshake never waits on the KME.

:class:`KeyPool` wraps a :class:`~hybridkex.qkd.KeySource` (typically an
:class:`~hybridkex.qkd.ETSI014Client`) and is a ``KeySource`` itself.  For each slave SAE it keeps a
queue of keys, refilled by one background thread: when a queue falls to ``low_watermark`` keys it
is topped up to ``high_watermark``, in batches of at most ``batch_size`` (and never more than the
KME's ``max_key_per_request``).  :class:`AsyncKeyPool` is the same over an
:class:`~hybridkex.qkd.AsyncKeySource`, refilled by an asyncio task.

Rules the pool keeps:

* a key leaves the pool exactly once: it is removed under the lock before it is returned, and
  there is no way to put it back, so a key whose handshake failed is never handed out again;
* keys live only in memory, never on disk; ``close()`` drops every pooled key;
* shutting down is not a KME failure: a fetch that ends because the pool or its source was closed
  is neither counted nor logged, and a closed source ends the refill (close the pool first);
* ``get_keys`` answers from the pool without touching the KME when the queue holds enough keys;
  otherwise it fetches directly from the source (the pool is left as it is);
* keys older than ``max_key_age`` (if set) are discarded, never handed out;
* the slave side is not pooled: ``get_keys_by_id`` and ``status`` go straight to the source.

:meth:`KeyPool.stats` reports the level, fetch latency and failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar, Unpack

from .. import workers
from ..exceptions import AlreadyFinalized, KeySourceError
from ._pool_core import _DEFAULT_BATCH, PoolSettings, PoolStats, _PoolCore, _SubPool
from .base import AsyncKeySource, KeySource, KeySourceStatus, QKDKey

__all__ = ["AsyncKeyPool", "KeyPool", "PoolStats", "ThreadedAsyncKeySource"]

log = logging.getLogger("hybridkex.qkd.pool")

S = TypeVar("S", bound=KeySource | AsyncKeySource)


def _check_keys(keys: Sequence[QKDKey], number: int, size_bits: int) -> None:
    # The source validated them already; this guards against a source that ignores the request.
    if len(keys) != number or any(len(k.key) * 8 != size_bits for k in keys):
        raise KeySourceError("the key source returned a different number or size of keys than requested")


class _Wrapper(Generic[S]):
    """A key source over another one, with that one's identities."""

    def __init__(self, source: S) -> None:
        self._source: S = source

    @property
    def sae_id(self) -> str:
        """The underlying source's SAE ID."""
        return self._source.sae_id

    @property
    def kme_id(self) -> str:
        """The underlying source's KME ID."""
        return self._source.kme_id


class _Pool(_Wrapper[S]):
    """What both pools do without I/O, over their shared :class:`_PoolCore`; the subclasses add the
    refill worker (a thread, a task) and the calls to their source."""

    def __init__(self, source: S, slaves: Iterable[str] = (), **settings: Unpack[PoolSettings]) -> None:
        super().__init__(source)
        self._core = _PoolCore(slaves, **settings)

    def _wake_refill(self) -> None:
        """Tell the refill worker that the pool changed; called with the core's lock held."""
        raise NotImplementedError

    def _running(self) -> bool:
        raise NotImplementedError

    def _take(self, slave_sae_id: str, number: int, size_bits: int) -> list[QKDKey] | None:
        """Keys from the pool, or ``None``: the caller fetches them directly (then :meth:`_direct`)."""
        with self._core.lock:
            keys, wake = self._core.take(slave_sae_id, number, size_bits)
            if wake:
                self._wake_refill()
        return keys

    def _direct(self, slave_sae_id: str, keys: list[QKDKey], number: int, size_bits: int) -> list[QKDKey]:
        _check_keys(keys, number, size_bits)
        with self._core.lock:
            self._core.note_direct(slave_sae_id, keys)
        return keys

    def discard_stale(self, slave_sae_id: str, key_ids: Sequence[str] = (), *, reported_by_peer: bool = True) -> int:
        """A KME does not know ``key_ids``, keys shared with ``slave_sae_id``: drop that slave's queue.

        Called by the handshake drivers (through :class:`~hybridkex.io.QKDKeyManager`) after a
        "key not found" from the peer's Abort or from this side's KME.  Dropped keys are never handed
        out; the queue refills with fresh keys.  A report about keys already dropped changes nothing,
        and drops are rate-limited (3 in a row, then one per ``stale_discard_interval``), since the
        report may come from an unauthenticated peer.  Callable from any thread.  Returns the keys
        dropped.
        """
        reporter = "the peer's KME" if reported_by_peer else "this side's KME"
        with self._core.lock:
            dropped = self._core.discard_stale(slave_sae_id, key_ids, reporter)
            self._wake_refill()
        return dropped

    def level(self, slave_sae_id: str | None = None) -> int:
        """Keys ready for ``slave_sae_id`` (all slaves if ``None``)."""
        with self._core.lock:
            return self._core.level(slave_sae_id)

    def stats(self) -> PoolStats:
        """Level, counters, fetch latency and failures."""
        with self._core.lock:
            return self._core.stats(self._running())

    def _batch(self, sub: _SubPool, n: int, status: KeySourceStatus | Exception) -> int:
        """How many keys to fetch after asking the KME's ``max_key_per_request``.

        Raises the status request's exception if it failed because of a shutdown.
        """
        if isinstance(status, Exception):
            if self._core.closed or isinstance(status, AlreadyFinalized):
                raise status
            # No usable status (yet): the default batch, and ask again next time.
            log.info("key pool: no status for slave %s (%s); batches of %d", sub.slave, status, _DEFAULT_BATCH)
            return n
        with self._core.lock:
            self._core.learned_batch(sub, status.max_key_per_request)
        return min(n, status.max_key_per_request)

    def _filled(self, sub: _SubPool, n: int, keys: list[QKDKey] | Exception, latency: float) -> None:
        """Deposit a background fetch, or count its failure (retried later)."""
        if not isinstance(keys, Exception):
            try:
                _check_keys(keys, n, self._core.size_bits)
            except KeySourceError as exc:
                keys = exc
        with self._core.lock:
            if isinstance(keys, Exception):
                self._core.failed(sub, keys)
            else:
                self._core.deposit(sub, keys, latency)
            self._wake_refill()


class KeyPool(_Pool[KeySource]):
    """Master-side pre-fetching pool over a blocking :class:`~hybridkex.qkd.KeySource`; thread-safe.

    Args:
        source: where keys come from (must be safe to call from the refill thread).
        slaves: slave SAE IDs to pre-fetch for from the start; others get a queue on first use.
        size_bits: key size the pool holds; other sizes are fetched directly (default 256).
        low_watermark, high_watermark: refill when a queue has ``<= low`` keys, up to ``high``
            (defaults 16, 64).
        batch_size: keys per KME request; default the KME's ``max_key_per_request`` (from ``status``),
            else 32.  Never more than the space up to ``high_watermark``.
        max_key_age: seconds after which an unused pooled key is discarded (default ``None``: never).
        retry_backoff, max_retry_backoff: delay after a failed refill, doubling up to the cap
            (defaults 0.5 s, 30 s).
        stale_discard_interval: a slave's queue is dropped as stale (:meth:`discard_stale`) up to 3
            times in a row, then at most once per this many seconds (default 5 s).
        clock: the monotonic clock key ages are measured with (tests).
        start: start the refill thread now (else call :meth:`start`).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, source: KeySource, slaves: Iterable[str] = (), *, start: bool = True, **settings: Unpack[PoolSettings]
    ) -> None:
        super().__init__(source, slaves, **settings)
        self._cond = threading.Condition(self._core.lock)
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def __repr__(self) -> str:
        return f"KeyPool(source={self._source!r}, level={self.level()}, high_watermark={self._core.high})"

    def _wake_refill(self) -> None:
        self._cond.notify_all()

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- KeySource --------------------------------------------------------------------------------

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        """``number`` keys shared with ``slave_sae_id``: from the pool if it holds enough, else from the KME.

        Each key is returned once, ever; it is gone from the pool whatever the caller does with it.
        """
        keys = self._take(slave_sae_id, number, size_bits)
        if keys is not None:
            return keys
        return self._direct(slave_sae_id, self._source.get_keys(slave_sae_id, number, size_bits), number, size_bits)

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Slave role: passed straight to the source (keys are fetched by ID on demand)."""
        return self._source.get_keys_by_id(master_sae_id, key_ids)

    def status(self, slave_sae_id: str) -> KeySourceStatus:
        """The KME's status, from the source."""
        return self._source.status(slave_sae_id)

    # -- pool -------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 10.0, minimum: int | None = None) -> bool:
        """Block until every known slave has ``minimum`` keys (default: the high watermark).

        Returns:
            True if reached, False on timeout.
        """
        target = self._core.high if minimum is None else minimum
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(len(s.keys) >= target for s in self._core.subs.values()):
                left = deadline - time.monotonic()
                if left <= 0 or self._core.closed:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def start(self) -> None:
        """Start the refill thread (idempotent)."""
        with self._cond:
            if self._core.closed:
                raise AlreadyFinalized("the key pool is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="hybridkex-key-pool", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop refilling, drop every pooled key, wait up to ``timeout`` for the thread. Idempotent."""
        with self._cond:
            dropped = self._core.close()
            self._cond.notify_all()
            thread = self._thread
        if dropped:
            log.info("key pool closed: %d unused key(s) dropped", dropped)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> KeyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._core.closed or self._core.source_closed:
                    return
                work, wait = self._core.plan()
                if not work:
                    self._cond.wait(wait)
                    continue
            for sub, n in work:
                self._fill(sub, n)

    def _fill(self, sub: _SubPool, n: int) -> None:
        t0 = time.perf_counter()
        keys: list[QKDKey] | Exception
        try:
            if sub.batch is None and self._core.batch_size is None:
                try:
                    status: KeySourceStatus | Exception = self._source.status(sub.slave)
                except Exception as exc:  # judged by _batch
                    status = exc
                n = self._batch(sub, n, status)
            t0 = time.perf_counter()
            keys = self._source.get_keys(sub.slave, n, self._core.size_bits)
        except Exception as exc:  # any failure is counted, logged and retried later
            keys = exc
        self._filled(sub, n, keys, time.perf_counter() - t0)


class AsyncKeyPool(_Pool[AsyncKeySource]):
    """:class:`KeyPool` for asyncio: the same pool over an :class:`~hybridkex.qkd.AsyncKeySource`.

    The refill runs as a task in the event loop that first uses the pool (or calls :meth:`start`).
    Use ``async with`` or call :meth:`aclose`.  Same arguments as :class:`KeyPool` (without ``start``).
    """

    def __init__(self, source: AsyncKeySource, slaves: Iterable[str] = (), **settings: Unpack[PoolSettings]) -> None:
        super().__init__(source, slaves, **settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._fills: set[asyncio.Task[None]] = set()

    def _wake_refill(self) -> None:
        # discard_stale() may come from another thread: the events belong to the pool's loop.
        loop, wake, changed = self._loop, self._wake, self._changed
        if loop is not None and wake is not None and changed is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_set_both, wake, changed)

    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the refill task in the running loop (idempotent)."""
        if self._core.closed:
            raise AlreadyFinalized("the key pool is closed")
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._changed = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hybridkex-key-pool")

    async def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        """As :meth:`KeyPool.get_keys`."""
        self.start()
        keys = self._take(slave_sae_id, number, size_bits)
        if keys is not None:
            return keys
        keys = await self._source.get_keys(slave_sae_id, number, size_bits)
        return self._direct(slave_sae_id, keys, number, size_bits)

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Slave role: passed straight to the source."""
        return await self._source.get_keys_by_id(master_sae_id, key_ids)

    async def status(self, slave_sae_id: str) -> KeySourceStatus:
        """The KME's status, from the source."""
        return await self._source.status(slave_sae_id)

    async def wait_ready(self, timeout: float = 10.0, minimum: int | None = None) -> bool:
        """Wait until every known slave has ``minimum`` keys (default: the high watermark)."""
        self.start()
        assert self._changed is not None
        target = self._core.high if minimum is None else minimum
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._core.lock:
                if all(len(s.keys) >= target for s in self._core.subs.values()):
                    return True
                if self._core.closed:
                    return False
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def aclose(self) -> None:
        """Stop refilling and drop every pooled key. Idempotent."""
        with self._core.lock:
            dropped = self._core.close()
        if dropped:
            log.info("key pool closed: %d unused key(s) dropped", dropped)
        tasks = [t for t in (self._task, *self._fills) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> AsyncKeyPool:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with self._core.lock:
                if self._core.closed:
                    return
                work, wait = self._core.plan()
            for sub, n in work:
                task = asyncio.get_running_loop().create_task(self._fill(sub, n))
                self._fills.add(task)
                task.add_done_callback(self._fills.discard)
            if work:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _fill(self, sub: _SubPool, n: int) -> None:
        t0 = time.perf_counter()
        keys: list[QKDKey] | Exception
        try:
            if sub.batch is None and self._core.batch_size is None:
                try:
                    status: KeySourceStatus | Exception = await self._source.status(sub.slave)
                except Exception as exc:  # judged by _batch
                    status = exc
                n = self._batch(sub, n, status)
            t0 = time.perf_counter()
            keys = await self._source.get_keys(sub.slave, n, self._core.size_bits)
        except asyncio.CancelledError:
            with self._core.lock:
                sub.in_flight = False
            raise
        except Exception as exc:  # counted, logged, retried later
            keys = exc
        self._filled(sub, n, keys, time.perf_counter() - t0)


def _set_both(wake: asyncio.Event, changed: asyncio.Event) -> None:
    wake.set()
    changed.set()


class ThreadedAsyncKeySource(_Wrapper[KeySource]):
    """An :class:`~hybridkex.qkd.AsyncKeySource` over a blocking source, calling it in a worker thread.

    Lets asyncio code use a :class:`KeyPool` or :class:`~hybridkex.qkd.ETSI014Client`.
    """

    async def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        """As :meth:`KeySource.get_keys`, in a worker thread."""
        return await workers.call_async(lambda: self._source.get_keys(slave_sae_id, number, size_bits), None,
                                        "the key source")

    async def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """As :meth:`KeySource.get_keys_by_id`, in a worker thread."""
        return await workers.call_async(lambda: self._source.get_keys_by_id(master_sae_id, list(key_ids)), None,
                                      "the key source")

    async def status(self, slave_sae_id: str) -> KeySourceStatus:
        """As :meth:`KeySource.status`, in a worker thread."""
        return await workers.call_async(lambda: self._source.status(slave_sae_id), None, "the key source")

    def discard_stale(self, slave_sae_id: str, key_ids: Sequence[str] = (), *, reported_by_peer: bool = True) -> int:
        """Passed on to the wrapped source if it pools keys (:meth:`KeyPool.discard_stale`), else 0."""
        discard = getattr(self._source, "discard_stale", None)
        return int(discard(slave_sae_id, key_ids, reported_by_peer=reported_by_peer)) if callable(discard) else 0

    def __repr__(self) -> str:
        return f"ThreadedAsyncKeySource({self._source!r})"

