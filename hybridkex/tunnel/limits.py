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
import time
from collections.abc import Callable

from ..exceptions import RateLimited
from ..ratelimit import HandshakeRateLimiter, rate_key

__all__ = ["ADMISSION", "HandshakeRateLimiter", "LogThrottle", "admit_peer", "rate_key"]

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
