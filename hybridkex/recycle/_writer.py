"""Write-behind for key rotations: one background thread commits queued rotations in batches.

A handshake hands its rotation over (:meth:`WriteBehind.submit`) and goes on to TLS; the thread
commits everything queued so far in one transaction (one fsync for the batch: group commit).  The
queue is never read: the store's reads see only committed state, so no key is offered or accepted
before it is durable (docs/recycle.md, section 5: the condition for "no lockout").  A read of a pair
first waits for that pair's jobs submitted before it (:meth:`WriteBehind.wait`), so each handshake
sees the rotations of the handshakes that finished before it started.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["WriteBehind"]

log = logging.getLogger("hybridkex.recycle")

T = TypeVar("T")
#: Most rotations committed in one transaction (bounds a transaction's duration, not throughput).
MAX_BATCH = 256
#: Seconds an idle writer thread waits before it exits (the next submission starts a new one), so a
#: store nobody closes is not kept alive by its thread forever.
IDLE_EXIT = 30.0

_live: weakref.WeakSet[WriteBehind[object]] = weakref.WeakSet()


@atexit.register
def _drain_all() -> None:
    # An application that never closes its store still gets its last rotations written at exit.
    for writer in list(_live):
        writer.close()


class WriteBehind(Generic[T]):
    """Queue of jobs, each for one key (a pair); ``apply`` commits a batch and returns, per job,
    None or the exception that job failed with (the others of the batch still commit)."""

    def __init__(self, apply: Callable[[Sequence[T]], list[BaseException | None]], name: str,
                 closed_error: Callable[[], Exception]) -> None:
        self._apply = apply
        self._name = name
        self._closed_error = closed_error
        self._cond = threading.Condition()
        self._queue: list[tuple[Hashable, T]] = []
        # Jobs are numbered as submitted and finish in that order (FIFO batches): a reader waits for
        # the last job of its pair submitted *before* it started, never for later ones, so a pair
        # under constant load cannot starve its readers.
        self._submitted = 0
        self._done = 0
        self._last: dict[Hashable, int] = {}  # the newest job number per key, while unfinished
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        _live.add(self)  # type: ignore[arg-type]

    def submit(self, key: Hashable, job: T) -> None:
        with self._cond:
            if self._closed:
                raise self._closed_error()
            self._queue.append((key, job))
            self._submitted += 1
            self._last[key] = self._submitted
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self, key: Hashable | None = None) -> int:
        """Unfinished jobs (None: of every key; a key: 1 if any of its jobs is unfinished, else 0)."""
        with self._cond:
            if key is None:
                return self._submitted - self._done
            return int(self._last.get(key, 0) > self._done)

    def wait(self, key: Hashable | None = None, timeout: float | None = None) -> bool:
        """Wait until every job of ``key`` (None: of any key) submitted so far has finished; False on timeout."""
        with self._cond:
            target = self._submitted if key is None else self._last.get(key, 0)
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued job; raise the first failure since the last flush (then forget them)."""
        if not self.wait(None, timeout):
            raise TimeoutError(f"rotations still queued after {timeout} s")
        with self._cond:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Commit what is queued, then stop the thread (later submissions fail)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed, IDLE_EXIT)
                if not self._queue:
                    self._thread = None  # closed and drained, or idle: submit() starts a new one
                    return
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                results = self._apply([job for _, job in batch])
            except BaseException as exc:  # every job of the batch failed; the thread lives on
                results = [exc] * len(batch)
            failed = [r for r in results if r is not None]
            if failed:
                # Safe to go on: a rotation that is not recorded leaves the pair on its current key.
                log.error("recycled authentication: %d of %d rotations not recorded (%s); the pairs keep "
                          "their current keys", len(failed), len(batch), failed[0])
            with self._cond:
                self._errors.extend(failed)
                self._done += len(batch)
                for key, _ in batch:
                    if self._last.get(key, 0) <= self._done:
                        self._last.pop(key, None)
                self._cond.notify_all()
