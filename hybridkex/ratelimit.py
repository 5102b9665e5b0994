"""Token buckets keyed by remote address or peer identity (the tunnel's limits, the state's reads).

Neutral ground: :mod:`hybridkex.tunnel.limits` meters connections with them (and re-exports them),
:mod:`hybridkex.steady.reads` the shared-state reads that unknown parents cause.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Final

__all__ = ["HandshakeRateLimiter", "rate_key"]

_MAX_TRACKED: Final = 65536


def rate_key(ip: str) -> str:
    """The bucket for a remote address: the address itself for IPv4, its /64 for IPv6.

    One IPv6 host usually controls a whole /64, so per-address buckets would not limit it at all.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


class HandshakeRateLimiter:
    """Token bucket per key (remote address or peer identity). ``rate = 0`` disables limiting."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = _MAX_TRACKED) -> None:
        self._clock = clock
        self._max = max_tracked
        self._buckets: dict[str, tuple[float, float]] = {}
        self.rate = rate
        self.burst = burst

    def configure(self, rate: float, burst: int) -> None:
        """Apply new limits (reload); existing buckets keep their tokens, capped at the new burst."""
        self.rate = rate
        self.burst = burst

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max:
            self._prune(now)

    def allow(self, key: str) -> bool:
        """Take one token for ``key``; ``False`` (nothing taken) when its bucket is empty."""
        if self.rate <= 0:
            return True
        now = self._clock()
        tokens = self._tokens(key, now)
        allowed = tokens >= 1.0
        self._store(key, tokens - 1.0 if allowed else tokens, now)
        return allowed

    def peek(self, key: str) -> bool:
        """Whether ``key`` has a token, taking none."""
        return self.rate <= 0 or self._tokens(key, self._clock()) >= 1.0

    def charge(self, key: str) -> None:
        """Take one token for something already done; the bucket may go into debt (down to ``-burst``)."""
        if self.rate > 0:
            now = self._clock()
            self._store(key, max(-float(self.burst), self._tokens(key, now) - 1.0), now)

    def refund(self, key: str) -> None:
        """Give back a token taken by :meth:`allow` (capped at the burst)."""
        if self.rate > 0 and key in self._buckets:
            now = self._clock()
            self._store(key, min(float(self.burst), self._tokens(key, now) + 1.0), now)

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely behaves exactly like an absent one.
        self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
        if len(self._buckets) > self._max:
            # Still too many distinct keys (a flood): keep the most recently seen half.
            recent = sorted(self._buckets.items(), key=lambda kv: kv[1][1], reverse=True)[: self._max // 2]
            self._buckets = dict(recent)

    def __len__(self) -> int:
        return len(self._buckets)
