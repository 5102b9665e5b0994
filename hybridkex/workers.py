"""The one thread policy for blocking work that a handshake waits on: KME calls and hooks.

Every driver (blocking, asyncio, tunnel, benchmark) and the asyncio key-source adapter run such
work here: :func:`call` from a thread, :func:`call_async` from an event loop.  Neither uses
``asyncio.to_thread`` or the loop's default executor: a key source that hangs would hold one of its
few threads for every other user of the loop.

A KME call may hang, so it never runs on a server worker or the event loop: the caller waits for it
with a deadline and gives up when it passes (a late answer is dropped; a late QKD key is never
used).  Starting a thread per call cost a measurable share of a handshake (docs/benchmarks.md), so
idle threads wait for the next call for a while instead of exiting.  A call that hangs keeps only
its own thread; the pool starts another for the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .exceptions import HandshakeTimeout

__all__ = ["call", "call_async", "submit"]

T = TypeVar("T")

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


def call(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn()`` on a worker thread and wait at most ``timeout`` seconds for it.

    A call that gives up (:class:`~hybridkex.HandshakeTimeout`, naming ``what``) leaves the worker
    to finish on its own; whatever it returns then is dropped (late QKD keys are never used).
    """
    box: dict[str, object] = {}
    done = threading.Event()

    def settle(value: object, error: BaseException | None) -> None:
        if error is not None:
            box["error"] = error
        else:
            box["value"] = value
        done.set()

    submit(fn, settle)
    if not done.wait(max(timeout, 0.0)):
        raise HandshakeTimeout(f"{what} did not answer within {timeout:.3g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


async def call_async(fn: Callable[[], T], timeout: float | None, what: str) -> T:
    """:func:`call` for a coroutine: the event loop keeps running while the worker works.

    ``timeout=None`` waits as long as the call takes (the caller bounds it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    def done(value: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, value, error)

    submit(fn, done)
    if timeout is None:
        return await future
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            return await future
    except TimeoutError:
        raise HandshakeTimeout(f"{what} did not answer within {timeout:.3g} s") from None
