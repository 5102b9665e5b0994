"""Answering the handshake's QKD requests from a key source, under a key budget.

:class:`QKDKeyManager` is the explicit object that holds QKD key state between handshakes (the
sans-IO core holds none):

* as ETSI master, ``fresh`` requests take new keys from the KME every time; ``epoch`` requests
  reuse the peer pair's current epoch key until it has served ``epoch_max_handshakes`` handshakes
  or is ``epoch_max_age`` seconds old, then take a new one;
* as slave, a key ID is fetched from the KME once; an ``epoch`` key is cached (in memory only) and
  served again for later handshakes within the same limits; a ``fresh`` key ID that was seen
  before is refused with :class:`~hybridkex.exceptions.KeyReuseError`.

Keys live only in this object's memory, never on disk; :meth:`QKDKeyManager.clear` drops them.
Each handshake mixes the (possibly shared) QKD key with its own X25519 and ML-KEM secrets and
nonces, so no two handshakes share a PSK.  Use one long-lived manager per local SAE.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from ..exceptions import KeyReuseError, PolicyViolation
from ..policy import KeyBudget
from ..protocol.events import QKDKeysByIdRequired, QKDKeysRequired
from ..qkd.base import AsyncKeySource, KeySource, QKDKey

__all__ = ["KeySourceArg", "QKDKeyManager"]


@dataclass(slots=True)
class _Epoch:
    keys: list[QKDKey] = field(repr=False)
    taken_at: float
    uses: int = 0


class QKDKeyManager:
    """Answers :class:`QKDKeysRequired` / :class:`QKDKeysByIdRequired` from a :class:`KeySource`.

    Args:
        source: the local SAE's key source (KME client, pool, or in-memory link).
        budget: the key budget (normally ``policy.key_budget``); limits epoch keys on both roles.
        clock: monotonic seconds (injectable for tests).
        remember_ids: how many recently seen key IDs are kept to refuse a reused fresh key ID
            (the KME refuses a second delivery too; this is the local, cheaper check).
    """

    def __init__(self, source: KeySource, budget: KeyBudget | None = None, *,
                 clock: Callable[[], float] = time.monotonic, remember_ids: int = 65536) -> None:
        self._source = source
        self._budget = budget or KeyBudget()
        self._clock = clock
        self._lock = threading.Lock()
        self._master_epochs: dict[str, _Epoch] = {}
        self._slave_epochs: OrderedDict[tuple[str, tuple[str, ...]], _Epoch] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_ids
        self._peer_locks: dict[str, threading.Lock] = {}
        #: Counters for tests and metrics: KME calls made.
        self.kme_takes = 0
        self.kme_fetches = 0

    def __repr__(self) -> str:
        return (f"QKDKeyManager(source={self._source!r}, budget={self._budget.mode!r}, "
                f"epochs={len(self._master_epochs) + len(self._slave_epochs)})")

    @property
    def source(self) -> KeySource:
        return self._source

    @property
    def budget(self) -> KeyBudget:
        return self._budget

    def answer(self, request: QKDKeysRequired | QKDKeysByIdRequired) -> list[QKDKey]:
        """The keys for ``request``; raises KeySourceError (or a subclass) when there are none."""
        if isinstance(request, QKDKeysRequired):
            return self.take(request)
        return self.fetch(request)

    # --- master ---------------------------------------------------------------------------------

    def _fresh_epoch_ok(self, epoch: _Epoch, now: float) -> bool:
        b = self._budget
        if b.epoch_max_handshakes is not None and epoch.uses >= b.epoch_max_handshakes:
            return False
        return b.epoch_max_age is None or now - epoch.taken_at < b.epoch_max_age

    def take(self, request: QKDKeysRequired) -> list[QKDKey]:
        """Master role: fresh keys, or the peer's current epoch key under an epoch budget."""
        if request.usage == "fresh" or self._budget.mode != "epoch":
            if request.usage == "epoch":
                raise PolicyViolation("an epoch key was requested but this key manager's budget is 'fresh'",
                                      ("key_budget",))
            return self._take_from_source(request)
        with self._lock:
            peer_lock = self._peer_locks.setdefault(request.slave_sae_id, threading.Lock())
        with peer_lock:  # one KME request per peer when an epoch ends, not one per waiting handshake
            with self._lock:
                epoch = self._master_epochs.get(request.slave_sae_id)
                if (epoch is not None and self._fresh_epoch_ok(epoch, self._clock())
                        and len(epoch.keys) == request.number
                        and all(len(k.key) * 8 == request.size_bits for k in epoch.keys)):
                    epoch.uses += 1
                    return list(epoch.keys)
            keys = self._take_from_source(request)
            with self._lock:
                self._master_epochs[request.slave_sae_id] = _Epoch(keys, self._clock(), 1)
            return list(keys)

    def _take_from_source(self, request: QKDKeysRequired) -> list[QKDKey]:
        keys = list(self._source.get_keys(request.slave_sae_id, request.number, request.size_bits))
        with self._lock:
            self.kme_takes += 1
            for k in keys:
                if k.key_id.lower() in self._seen:
                    raise KeyReuseError(f"the key source handed out key ID {k.key_id} a second time")
            self._remember_ids(keys)
        return keys

    # --- slave ----------------------------------------------------------------------------------

    def fetch(self, request: QKDKeysByIdRequired) -> list[QKDKey]:
        """Slave role: the keys by ID (each ID fetched from the KME at most once)."""
        ids = tuple(request.key_ids)
        cache_key = (request.master_sae_id, tuple(i.lower() for i in ids))
        with self._lock:
            epoch = self._slave_epochs.get(cache_key)
            if epoch is not None:
                if request.usage != "epoch":
                    raise KeyReuseError(f"key ID(s) {', '.join(ids)} were used before and are now offered as fresh")
                if not self._fresh_epoch_ok(epoch, self._clock()):
                    raise KeyReuseError(f"epoch key {', '.join(ids)} has exceeded this side's epoch limits "
                                        f"(max {self._budget.epoch_max_handshakes} handshakes, "
                                        f"{self._budget.epoch_max_age} s)")
                epoch.uses += 1
                return list(epoch.keys)
            if request.usage == "epoch" and self._budget.mode != "epoch":
                raise PolicyViolation("the peer uses epoch keys but this key manager's budget is 'fresh'",
                                      ("key_budget",))
            reused = [i for i in ids if i.lower() in self._seen]
            if reused:
                raise KeyReuseError(f"key ID(s) {', '.join(reused)} were used before")
        keys = list(self._source.get_keys_by_id(request.master_sae_id, list(ids)))
        with self._lock:
            self.kme_fetches += 1
            self._remember_ids(keys)
            if request.usage == "epoch":
                self._slave_epochs[cache_key] = _Epoch(keys, self._clock(), 1)
                self._evict()
        return keys

    def _remember_ids(self, keys: list[QKDKey]) -> None:
        for k in keys:
            self._seen[k.key_id.lower()] = None
            self._seen.move_to_end(k.key_id.lower())
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._slave_epochs.items() if not self._fresh_epoch_ok(e, now)]:
            del self._slave_epochs[key]
        while len(self._slave_epochs) > 4096:
            self._slave_epochs.popitem(last=False)

    # --- stale keys -----------------------------------------------------------------------------

    def key_unknown(self, peer_sae_id: str, key_ids: Sequence[str], *, reported_by_peer: bool) -> int:
        """A KME does not know ``key_ids``, QKD keys shared with ``peer_sae_id`` (e.g. it restarted).

        Drops what is held for that peer so that no later handshake is offered a stale key: the epoch
        key (as master) if it is one of them, or any epoch key for the peer when this side's own KME
        said so; and the pooled keys of the source (:meth:`hybridkex.qkd.KeyPool.discard_stale`), if it
        pools.  The key IDs stay remembered as used: they are never accepted again.  Returns the
        number of pooled keys dropped.
        """
        wanted = {i.lower() for i in key_ids}
        with self._lock:
            epoch = self._master_epochs.get(peer_sae_id)
            if epoch is not None and (not reported_by_peer or wanted & {k.key_id.lower() for k in epoch.keys}):
                del self._master_epochs[peer_sae_id]
        discard = getattr(self._source, "discard_stale", None)
        if not callable(discard):
            return 0
        return int(discard(peer_sae_id, list(key_ids), reported_by_peer=reported_by_peer))

    def clear(self) -> None:
        """Drop every cached epoch key (e.g. on shutdown or key rotation)."""
        with self._lock:
            self._master_epochs.clear()
            self._slave_epochs.clear()



#: What every ``key_source=`` parameter accepts: a long-lived :class:`QKDKeyManager` (required for an
#: epoch key budget), a blocking :class:`~hybridkex.qkd.KeySource`, an asyncio
#: :class:`~hybridkex.qkd.AsyncKeySource` (asyncio API only), or None when the policy disables QKD.
KeySourceArg: TypeAlias = "QKDKeyManager | KeySource | AsyncKeySource | None"
