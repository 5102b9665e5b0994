"""The server's background fetch of announced QKD keys, by ID (a part of :class:`SteadyRegistry`).

A steady-state connection announces key IDs the client reserved for later connections; once it is
established the server fetches them from its KME, so the connection that uses one finds it here.
A parent has at most one such request in flight: what is announced meanwhile waits and goes in one
request after it (a KME round trip per connection cost more than the keys: docs/benchmarks.md,
"Where a steady-state connection's CPU goes"), unless the request in flight is older than the KME
timeout.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .. import workers
from ..exceptions import KeySourceError
from ..protocol import QKDKeysByIdRequired
from ..qkd.base import QKDKey

if TYPE_CHECKING:
    from ..io.config import SteadyPolicy
    from ..io.keys import QKDKeyManager
    from ..policy import Policy
    from .peers import SteadyPeers
    from .registry import SteadyClaim, SteadyStats, _Parent

__all__ = ["MAX_HELD", "AnnouncedKeys", "Fetch"]

_log = logging.getLogger("hybridkex.steady")

#: Announced keys one parent may hold (ready or being fetched): bounded memory per client, and room
#: for what a client's widest window (steady.ticket.MAX_WINDOW, twice that held) announces.
MAX_HELD: Final = 128


class Fetch:
    """One background fetch of announced key IDs; connections that need one of them wait for it."""

    __slots__ = ("done", "error", "keys")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.keys: dict[str, QKDKey] = {}
        self.error: BaseException | None = None


class AnnouncedKeys:
    """The pre-fetch half of :class:`~hybridkex.steady.SteadyRegistry` (its lock, parents and stats)."""

    policy: SteadyPolicy
    stats: SteadyStats
    _keys: QKDKeyManager | None
    _qkd: Policy
    _lock: threading.Lock
    _clock: Callable[[], float]
    _parents: OrderedDict[bytes, _Parent]
    _share: bool

    def _share_keys(self, peers: SteadyPeers, keys: list[QKDKey]) -> None:  # pragma: no cover - the registry's
        raise NotImplementedError

    def _prefetch(self, claim: SteadyClaim) -> None:
        manager = self._keys
        ids = list(claim.content.announced)
        if not ids or manager is None or claim.peers is None:
            return
        with self._lock:
            parent = self._parents.get(claim.parent_handle)
            if parent is None:
                return
            ids = [k for k in dict.fromkeys(ids)
                   if k not in parent.spent and k not in parent.ready and k not in parent.fetching]
            room = MAX_HELD - len(parent.ready) - len(parent.fetching)
            ids = ids[:max(room, 0)]
            if not ids:
                return
            now = self._clock()
            if parent.in_flight is not None and now - parent.in_flight < self._qkd.timeouts.kme:
                # One KME request per connection costs the KME and this process more than the keys
                # (a dec_keys round trip: issue 14's profile): what arrives while one is in flight
                # goes in the next, for every connection announcing meanwhile.  Not behind a request
                # older than the KME timeout: a hung one must not hold up the later keys.
                fetch = parent.next_fetch = parent.next_fetch or Fetch()
                parent.next_batch.extend(ids)
                for k in ids:
                    parent.fetching[k] = fetch
                return
            parent.in_flight = now
            fetch = Fetch()
            for k in ids:
                parent.fetching[k] = fetch
        self._fetch(manager, claim.parent_handle, parent, ids, fetch)

    def _fetch(self, manager: QKDKeyManager, handle: bytes, parent: _Parent, ids: list[str], fetch: Fetch) -> None:
        """Fetch announced ``ids`` by ID on a worker thread; then the batch that waited, if any."""
        peers, peer = parent.peers, parent.info.peer_identity
        assert peers is not None  # claims carry announced IDs only under a parent with QKD
        request = QKDKeysByIdRequired(peers.client_sae_id, tuple(ids), "fresh")
        with self._lock:
            self.stats.prefetch_requests += 1

        def done(value: object, error: BaseException | None) -> None:
            with self._lock:
                now = self._clock()  # under the lock: ``ready`` stays in arrival order (expiry stops early)
                for k in ids:
                    parent.fetching.pop(k, None)
                if error is None and isinstance(value, list):
                    for key in value:
                        kid = key.key_id.lower() if isinstance(key, QKDKey) else ""
                        if kid in ids:
                            fetch.keys[kid] = key
                            if kid not in parent.spent:
                                parent.ready[kid] = (key, now)
                        # a key spent meanwhile was waited for by its connection (fetch.keys)
                    self._expire_ready_locked(parent, now)
                else:
                    fetch.error = error
                    self.stats.prefetch_failures += 1
                after: tuple[list[str], Fetch] | None = None
                if parent.next_batch and parent.next_fetch is not None:
                    after = (parent.next_batch, parent.next_fetch)
                    parent.next_batch, parent.next_fetch = [], None
                    if self._parents.get(handle) is not parent:  # forgotten meanwhile: its keys are not wanted
                        for k in after[0]:
                            parent.fetching.pop(k, None)
                        after[1].error = KeySourceError("the steady-state parent was forgotten")
                        after[1].done.set()  # a connection waiting for one of them fetches it on demand
                        after = None
                if after is None:
                    parent.in_flight = None
                else:
                    parent.in_flight = now
            if error is not None:
                _log.warning("pre-fetching announced QKD keys of %r failed: %s", peer, error)
            fetch.done.set()
            if self._share and error is None and fetch.keys:
                self._share_keys(peers, list(fetch.keys.values()))
            if after is not None:
                self._fetch(manager, handle, parent, *after)

        workers.submit(lambda: manager.fetch(request), done)

    def _expire_ready_locked(self, parent: _Parent, now: float) -> None:
        # ``ready`` is in arrival order (times taken under the lock): the expired keys are a prefix,
        # so a claim looks at those and one more, not at every key held (up to MAX_HELD, per claim).
        limit = now - self.policy.key_lifetime
        ready = parent.ready
        while ready:
            k = next(iter(ready))
            if ready[k][1] > limit:
                return
            del ready[k]
