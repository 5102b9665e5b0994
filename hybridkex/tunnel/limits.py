"""Per-peer handshake rate limiting (token buckets) and rate-limited log lines.

A handshake costs CPU and, with QKD, a key from a scarce pool, so new connections are metered per
remote IP address *before* any handshake work is done: each address has a bucket of ``burst``
tokens refilled at ``rate`` per second, and a connection that finds the bucket empty is refused.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Final

__all__ = ["HandshakeRateLimiter", "LogThrottle", "rate_key"]

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
    """Token bucket per key (remote IP). ``rate = 0`` disables limiting."""

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

    def allow(self, key: str) -> bool:
        """Take one token for ``key``; ``False`` when its bucket is empty."""
        if self.rate <= 0:
            return True
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely behaves exactly like an absent one.
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        if len(self._buckets) > self._max:
            # Still too many distinct addresses (a flood): keep the most recently seen half.
            recent = sorted(self._buckets.items(), key=lambda kv: kv[1][1], reverse=True)[: self._max // 2]
            self._buckets = dict(recent)

    def __len__(self) -> int:
        return len(self._buckets)


class LogThrottle:
    """Allows one log line per key per ``interval`` seconds and counts what it suppressed."""

    def __init__(self, interval: float = 1.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._state: dict[str, tuple[float, int]] = {}

    def check(self, key: str) -> int | None:
        """``None`` to stay quiet; otherwise the number of lines suppressed since the last one."""
        now = self._clock()
        last, suppressed = self._state.get(key, (float("-inf"), 0))
        if now - last >= self._interval:
            self._state[key] = (now, 0)
            return suppressed
        self._state[key] = (last, suppressed + 1)
        return None
