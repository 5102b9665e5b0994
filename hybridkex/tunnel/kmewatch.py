"""What the tunnel knows about its KME: every call's outcome, counted by kind, and health from it.

:class:`WatchedKeySource` sits between the secure channel (and the server's key pool) and the
ETSI GS QKD 014 client, so every KME request of the process passes through it: the background
refill of the pool, direct fetches, fetches by key ID, status requests and probes.  Each failure
is counted in ``hybridkex_kme_errors_total{kind=...}`` (:data:`KME_ERROR_KINDS`) and remembered by
:class:`KMEWatch`, which turns the state into the ``kme`` health component:

* **unhealthy** when QKD is required and the next handshake cannot get its key: the KME is
  unreachable and the pool holds too few keys for a peer (the client side has no pool), or the KME
  refuses requests for a configured peer's SAE (e.g. it does not know that SAE);
* **degraded** when the KME is unreachable but the pool still covers the next handshake, or when
  QKD is only optional;
* ok otherwise.

A refused peer SAE is logged once, as one ``kme_peer_refused`` error naming the configuration
field to fix, and once more (``kme_peer_ok``) when the KME serves it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..exceptions import AlreadyFinalized, HandshakeTimeout, KeyReuseError, KeySourceError
from ..qkd import KeySource, KeySourceStatus, QKDKey
from ..qkd import errors as kme
from .logs import log_event
from .metrics import KME_ERROR_KINDS, HealthState

__all__ = ["KME_ERROR_KINDS", "KMEWatch", "PeerSAE", "WatchedKeySource", "kme_error_kind"]

T = TypeVar("T")

#: Exception class -> ``kind`` label of ``hybridkex_kme_errors_total``, most specific class first.
_KINDS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (kme.KMETimeoutError, "timeout"), (kme.KMEConnectionError, "connection"),
    (kme.KMEUnavailableError, "unavailable"), (kme.KMEKeyNotFoundError, "key_not_found"),
    (kme.KMEUnauthorizedError, "unauthorized"), (kme.KMEBadRequestError, "bad_request"),
    (kme.KMEResponseError, "bad_response"), (KeyReuseError, "key_reuse"),
    (HandshakeTimeout, "timeout"), (OSError, "connection"),
)
#: Failures that mean "no key can come from the KME now", whoever is asking.
_OUTAGE: Final = frozenset({"connection", "timeout", "unavailable"})
#: Failures of a request about one peer SAE that only the configuration (or the KME's) can fix.
_REFUSAL: Final = frozenset({"unauthorized", "bad_request"})

def kme_error_kind(exc: BaseException) -> str | None:
    """The counter label for a failed KME call; ``None`` for what is not a KME failure (a closed client)."""
    if isinstance(exc, AlreadyFinalized):
        return None
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    return "other" if isinstance(exc, KeySourceError) else None


@dataclass(frozen=True, slots=True)
class PeerSAE:
    """A configured peer's SAE, as a health line names it."""

    sae_id: str
    identity: str
    field: str  # e.g. "peers[0].sae_id"


class KMEWatch:
    """Thread-safe record of KME outcomes (pool thread, worker threads and the event loop all report)."""

    def __init__(self, count: Callable[[str], None], *, url: str, master: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self.url = url
        self.master = master  # the server side: asks for keys (and status) per slave SAE
        self._clock = clock
        self._lock = threading.Lock()
        self._outage: tuple[float, str] | None = None  # since, what failed
        self._refused: dict[str, str] = {}  # peer SAE -> the KME's reason
        self._unsaid: set[str] = set()  # refused before configure() named a peer for it
        self._last_ok = clock()
        self.peers: tuple[PeerSAE, ...] = ()
        self.qkd = "required"

    def configure(self, peers: Sequence[PeerSAE], qkd: str, *, url: str | None = None) -> None:
        with self._lock:
            if url is not None:
                self.url = url
            self.peers = tuple(peers)
            self.qkd = qkd
            known = {p.sae_id for p in peers}
            self._refused = {k: v for k, v in self._refused.items() if k in known}
            # The server's key pool starts filling before its peers are configured here: a refusal it
            # met then named no peer, so it is said now (still under the lock, see failure()).
            for p in self.peers:
                if p.sae_id in self._unsaid and p.sae_id in self._refused:
                    self._say_refused(p, self._refused[p.sae_id])
            self._unsaid.clear()

    def idle_for(self) -> float:
        """Seconds since the last successful KME call."""
        with self._lock:
            return self._clock() - self._last_ok

    def success(self, peer_sae: str | None) -> None:
        recovered: list[PeerSAE] = []
        with self._lock:
            self._outage = None
            self._last_ok = self._clock()
            if peer_sae is not None and self._refused.pop(peer_sae, None) is not None:
                recovered = [p for p in self.peers if p.sae_id == peer_sae]
        for p in recovered:
            log_event(logging.INFO, "kme_peer_ok", f"the KME at {self.url} serves peer SAE {p.sae_id!r} again",
                      peer=p.identity, sae_id=p.sae_id)

    def failure(self, peer_sae: str | None, exc: BaseException, *, probe: bool = False) -> None:
        kind = kme_error_kind(exc)
        if kind is None:
            return
        if probe and not self.master and kind in _REFUSAL:
            # The slave side's probe asks for the status of its pair with the master's SAE, which a
            # KME may refuse: it answered, so it is reachable, and nothing failed that matters.
            self.success(None)
            return
        self._count(kind)
        text = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if kind in _OUTAGE:
                if self._outage is None:
                    self._outage = (self._clock(), text)
                else:
                    self._outage = (self._outage[0], text)
            elif kind in _REFUSAL and peer_sae is not None:
                self._outage = None  # it answered
                if peer_sae not in self._refused:  # said once per refusal, however often the pool retries
                    # Said under the lock: a thread that then finds the refusal recorded (the server's
                    # probe before "listening", racing the pool's first refill) knows it was said.
                    named = [p for p in self.peers if p.sae_id == peer_sae]
                    for p in named:
                        self._say_refused(p, str(exc))
                    if not named:
                        self._unsaid.add(peer_sae)
                self._refused[peer_sae] = str(exc)

    def _say_refused(self, p: PeerSAE, reason: str) -> None:
        log_event(logging.ERROR, "kme_peer_refused",
                  f"the KME at {self.url} refuses QKD keys for peer {p.identity!r} (SAE {p.sae_id!r}); every "
                  f"handshake with this peer will fail until {p.field} names an SAE the KME serves for this "
                  f"side (or the KME is configured for it): {reason}", peer=p.identity, sae_id=p.sae_id,
                  field=p.field)

    def refused(self, peer_sae: str) -> bool:
        """Whether the KME refused ``peer_sae`` (and that was said)."""
        with self._lock:
            return peer_sae in self._refused

    def health(self, pool_levels: Mapping[str, int] | None, keys_per_handshake: int) -> tuple[HealthState, str]:
        """The ``kme`` health component; ``pool_levels`` (slave SAE -> keys) only on the pooled master side."""
        with self._lock:
            outage, refused, peers, qkd = self._outage, dict(self._refused), self.peers, self.qkd
            now = self._clock()
        if qkd == "disabled":
            return "ok", ""
        problems: list[str] = []
        blocked = False
        for p in peers:
            if p.sae_id in refused:
                problems.append(f"the KME refuses peer SAE {p.sae_id!r} ({p.field}, peer {p.identity!r}): "
                                f"{refused[p.sae_id]}")
                blocked = True
        if outage is not None:
            since, what = outage
            line = f"KME {self.url} unreachable for {now - since:.0f} s ({what})"
            if pool_levels is None:
                line += "; every handshake needs it"
                blocked = True
            else:
                short = [p for p in peers if pool_levels.get(p.sae_id, 0) < keys_per_handshake]
                if short:
                    line += "; no pooled QKD key for " + ", ".join(f"{p.identity!r} (SAE {p.sae_id!r})"
                                                                    for p in short)
                    blocked = True
                else:
                    line += "; the key pool still covers the next handshake: " + ", ".join(
                        f"{pool_levels.get(p.sae_id, 0)} key(s) for {p.sae_id!r}" for p in peers)
            problems.append(line)
        if not problems:
            return "ok", ""
        state: HealthState = "unhealthy" if blocked and qkd == "required" else "degraded"
        return state, "; ".join(problems)


class WatchedKeySource:
    """A :class:`~hybridkex.qkd.KeySource` that reports every call's outcome to a :class:`KMEWatch`.

    Anything else (``close``, ``url``...) is passed through to the wrapped source.
    """

    def __init__(self, source: KeySource, watch: KMEWatch) -> None:
        self._source = source
        self._watch = watch

    def __repr__(self) -> str:
        return f"WatchedKeySource({self._source!r})"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def _call(self, peer: str | None, fn: Callable[..., T], *args: Any, probe: bool = False) -> T:
        try:
            result = fn(*args)
        except Exception as exc:
            self._watch.failure(peer, exc, probe=probe)
            raise
        self._watch.success(peer)
        return result

    @property
    def sae_id(self) -> str:
        return self._source.sae_id

    @property
    def kme_id(self) -> str:
        return self._call(None, lambda: self._source.kme_id)

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        return self._call(slave_sae_id, self._source.get_keys, slave_sae_id, number, size_bits)

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        return self._call(master_sae_id, self._source.get_keys_by_id, master_sae_id, key_ids)

    def status(self, slave_sae_id: str) -> KeySourceStatus:
        return self._call(slave_sae_id, self._source.status, slave_sae_id)

    def probe(self, peer_sae_id: str) -> bool:
        """Ask the KME for the status of the pair with ``peer_sae_id``; ``False`` if that failed."""
        try:
            self._call(peer_sae_id, self._source.status, peer_sae_id, probe=True)
        except Exception:  # recorded by _call; a probe never raises
            return False
        return True
