"""The gate in front of the shared-state reads that parents not in memory cause.

A steady-state identity names its parent by a 128-bit handle, and its tag can only be checked with
the parent's key: a handle this process does not hold costs one database read before the identity
can be refused.  :class:`ParentReads` bounds those reads (:class:`~hybridkex.io.StateReads`): a
negative cache of handles the state did not hold, then token buckets per process and per source
address, taken before the read and given back when it found a parent whose tag verified.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..ratelimit import HandshakeRateLimiter, rate_key

if TYPE_CHECKING:
    from ..io.config import StateReads

__all__ = ["ParentReads"]

_PROCESS = "*"  # the per-process bucket's key


class ParentReads:
    """Whether a parent not in memory may be read from the shared state now (thread-safe).

    :meth:`begin` before the read (None: read it; else why not); then :meth:`unknown` when the state
    did not hold the handle, or :meth:`found` once the parent's tag has verified.
    """

    def __init__(self, limits: StateReads, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # handle -> until; least recently seen first
        self._process = HandshakeRateLimiter(limits.rate, limits.burst, clock=clock)
        self._address = HandshakeRateLimiter(limits.address_rate, limits.address_burst, clock=clock)
        #: Reads let through; refused by the negative cache; refused by a bucket.
        self.reads = 0
        self.cached = 0
        self.limited = 0

    def __repr__(self) -> str:
        return f"<ParentReads reads={self.reads} cached={self.cached} limited={self.limited}>"

    def begin(self, handle: bytes, source: str | None) -> str | None:
        """Take the read's tokens; or, without taking any, why it may not run now."""
        with self._lock:
            now = self._clock()
            until = self._unknown.get(handle)
            if until is not None:
                if until > now:
                    self._unknown.move_to_end(handle)
                    self.cached += 1
                    return (f"unknown parent session (the shared state did not hold it less than "
                            f"{self.limits.unknown_ttl:g} s ago)")
                del self._unknown[handle]
            key = rate_key(source) if source else None
            if key is not None and not self._address.peek(key):
                self.limited += 1
                return ("unknown parent session, not read: too many reads for unknown parents from this "
                        "address (state_reads.address_rate)")
            if not self._process.allow(_PROCESS):
                self.limited += 1
                return "unknown parent session, not read: too many reads for unknown parents (state_reads.rate)"
            if key is not None:
                self._address.allow(key)
            self.reads += 1
            return None

    def unknown(self, handle: bytes) -> None:
        """The state did not hold ``handle``: refuse it without a read for ``unknown_ttl`` seconds."""
        with self._lock:
            self._unknown[handle] = self._clock() + self.limits.unknown_ttl
            self._unknown.move_to_end(handle)
            while len(self._unknown) > self.limits.unknown_max:
                self._unknown.popitem(last=False)

    def known(self, handle: bytes) -> None:
        """``handle`` is a parent now (this process registered it): never refuse it from the cache."""
        with self._lock:
            self._unknown.pop(handle, None)

    def found(self, source: str | None) -> None:
        """The read found a parent whose tag verified: its tokens go back (a real client's read)."""
        with self._lock:
            self._process.refund(_PROCESS)
            if source:
                self._address.refund(rate_key(source))

    def __len__(self) -> int:
        """Handles in the negative cache (expired ones included until they are seen or pushed out)."""
        with self._lock:
            return len(self._unknown)
