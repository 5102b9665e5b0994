"""Connection limits: token buckets per remote address and per authenticated peer, and quiet logs.

Two limits meter new connections on the tunnel server (see docs/tunnel.md, "Limits"):

* **per remote address, before authentication** (``limits.address_rate/address_burst``): a
  connection takes a token from its address's bucket when it is accepted, before any handshake
  work, and is refused when the bucket is empty; a handshake that authenticates gives its token
  back.  So the bucket counts handshakes that are in flight or failed: a flood of bad handshakes
  from one address is cut off, while a whole site behind one tunnel client, however many
  connections it opens, only needs room for the handshakes it runs at once.
* **per authenticated peer identity** (``limits.handshake_rate/handshake_burst``): checked when
  the peer's Hello names its identity (before any QKD key is taken), charged only when the
  handshake has authenticated that identity, so nobody can use up another peer's budget by
  claiming its name.  Concurrent handshakes of one peer may overshoot by their number; the
  bucket then goes into debt and recovers at the configured rate.

A refused connection on the server is told so with Abort "rate limited" (code 9).
"""

from __future__ import annotations

import contextvars
import ipaddress
import time
from collections.abc import Callable
from typing import Final

from ..exceptions import RateLimited

__all__ = ["ADMISSION", "HandshakeRateLimiter", "LogThrottle", "admit_peer", "rate_key"]

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


#: The admission check of the connection being served, set by the runtime around the channel's
#: ``accept``: called with the identity a peer claims, ``False`` refuses it.  A context variable,
#: because the check runs deep inside the handshake, in the connection's own task.
ADMISSION: contextvars.ContextVar[Callable[[str], bool] | None] = contextvars.ContextVar("hybridkex_admission",
                                                                                          default=None)


def admit_peer(identity: str) -> None:
    """For a channel (``ResponderConfig.admit``): raise :class:`RateLimited` if the runtime's per-peer
    limit refuses ``identity`` now; a no-op outside a tunnel connection."""
    check = ADMISSION.get()
    if check is not None and not check(identity):
        raise RateLimited(f"peer {identity!r} is over its handshake rate (limits.handshake_rate)",
                          peer_identity=identity)


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
