"""Bidirectional copy between two streams, with half-close, an idle timeout and byte counters.

Each direction is one task.  When one side finishes sending (``read`` returns ``b""``), the relay
half-closes the other side (``write_eof``) and keeps the opposite direction flowing, so protocols
that signal "request complete" by shutting down their write side work unchanged.  The connection
ends when both directions have ended, when one fails, or when nothing has moved in either
direction for the idle timeout; both streams are then closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, cast

from .fastpath import classify_error, run_fast
from .streams import SecureStream

__all__ = ["CHUNK_SIZE", "RelayResult", "relay"]

CHUNK_SIZE: Final = 64 * 1024
_CLOSE_GRACE: Final = 2.0

Direction = Literal["in", "out"]
Outcome = Literal["closed", "idle_timeout", "reset", "stream_error", "io_error", "internal_error"]


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relayed connection ended and how many bytes went each way.

    ``bytes_in`` went from the listening side to the target, ``bytes_out`` back.
    """

    outcome: Outcome
    bytes_in: int
    bytes_out: int
    error: str | None = None


def _classify(exc: BaseException) -> tuple[Outcome, str]:
    outcome, reason = classify_error(exc)
    return cast(Outcome, outcome), reason


async def relay(listen_side: SecureStream, target_side: SecureStream, *, idle_timeout: float | None,
                on_bytes: Callable[[Direction, int], None] | None = None) -> RelayResult:
    """Copy both ways until both directions end, one fails, or the connection is idle too long.

    Both streams are closed when this returns (or is cancelled).  ``idle_timeout`` of ``None`` or
    0 disables the idle check.  ``on_bytes(direction, n)`` gets the bytes delivered: per chunk on
    the stream path; in batches (at least every second, and at the end) on the fast path, which
    runs when both streams offer ``endpoint()`` (:mod:`hybridkex.tunnel.fastpath`).
    """
    fast_a, fast_b = getattr(listen_side, "endpoint", None), getattr(target_side, "endpoint", None)
    if fast_a is not None and fast_b is not None:
        ep_a = fast_a()
        ep_b = fast_b() if ep_a is not None else None
        if ep_a is not None and ep_b is not None:
            fast_outcome, n_in, n_out, fast_error = await run_fast(ep_a, ep_b, idle_timeout=idle_timeout,
                                                                   on_bytes=on_bytes)
            return RelayResult(cast(Outcome, fast_outcome), n_in, n_out, fast_error)
        assert ep_a is None, "one side detached for the fast path, the other cannot follow"
    counts = {"in": 0, "out": 0}
    last_activity = time.monotonic()

    async def pump(src: SecureStream, dst: SecureStream, direction: Direction) -> None:
        nonlocal last_activity
        while True:
            data = await src.read(CHUNK_SIZE)
            if not data:
                break
            last_activity = time.monotonic()
            dst.write(data)
            await dst.drain()
            # A peer that keeps draining slowly is not idle: progress counts as activity too.
            last_activity = time.monotonic()
            counts[direction] += len(data)
            if on_bytes is not None:
                on_bytes(direction, len(data))
        await dst.write_eof()

    tasks = {asyncio.create_task(pump(listen_side, target_side, "in")),
             asyncio.create_task(pump(target_side, listen_side, "out"))}
    outcome: Outcome = "closed"
    error: str | None = None
    pending = set(tasks)
    try:
        while pending:
            timeout = None
            if idle_timeout:
                timeout = max(0.0, last_activity + idle_timeout - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t.exception() is not None]
            if failed:
                exc = failed[0].exception()
                assert exc is not None
                outcome, error = _classify(exc)
                break
            if not done and idle_timeout and time.monotonic() - last_activity >= idle_timeout:
                outcome = "idle_timeout"
                break
    finally:
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await _close_both(listen_side, target_side)
    return RelayResult(outcome, counts["in"], counts["out"], error)


async def _close_both(a: SecureStream, b: SecureStream) -> None:
    for s in (a, b):
        with contextlib.suppress(Exception):
            s.close()
    for s in (a, b):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_GRACE):
                await s.wait_closed()
