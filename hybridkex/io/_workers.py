"""Reused daemon threads for blocking key-source (KME) calls.

A KME call may hang, so it never runs on a server worker or the event loop: the caller waits for it
with a deadline and gives up when it passes (a late answer is dropped; a late QKD key is never
used).  Starting a thread per call cost a measurable share of a handshake (docs/benchmarks.md), so
idle threads wait for the next call for a while instead of exiting.  A call that hangs keeps only
its own thread; the pool starts another for the next call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["submit"]

#: How long an idle worker waits for another call before it exits.
IDLE_SECONDS = 30.0

Done = Callable[[Any, BaseException | None], None]


class _Pool:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Done]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # workers waiting for a job that no submit() has claimed yet

    def submit(self, fn: Callable[[], Any], done: Done) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # claim one waiting worker for this job
        self._jobs.put((fn, done))
        if spawn:
            threading.Thread(target=self._work, name="hybridkex-key-source", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                fn, done = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody claimed a worker: this one may go
                        self._idle -= 1
                        return
                continue  # every waiting worker is claimed: a job is on its way
            try:
                value, error = fn(), None
            except BaseException as exc:  # handed to whoever waits for the call
                value, error = None, exc
            done(value, error)
            with self._lock:
                self._idle += 1


_pool = _Pool()


def submit(fn: Callable[[], Any], done: Done) -> None:
    """Run ``fn()`` on a worker thread; then ``done(value, None)`` or ``done(None, exception)``.

    ``done`` runs on the worker thread and must not block.
    """
    _pool.submit(fn, done)
