"""The client's side of the steady state: :class:`SteadyTicket` and one connection's :class:`SteadyAttempt`.

The ticket holds the parent's authentication key ``A`` and handle, a counter, and the QKD keys the
client (ETSI master) has reserved for the server: *announced* keys (named in an earlier, completed
connection, so the server has fetched them) and *reserved* keys (taken from the KME in the
background, not yet announced).  Each connection takes one key — announced first — and announces
reserved ones; a background refill keeps ``policy.announce`` keys ahead.  A key is handed to one
connection only, and dropped whatever that connection's outcome, so no key is ever used twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from .. import workers
from ..combiner import CombinedSecret
from ..exceptions import AlreadyFinalized, PolicyViolation
from ..protocol import QKDKeysRequired, SessionInfo
from ..qkd.base import QKDKey
from . import derive
from .peers import SteadyPeers, steady_peers

if TYPE_CHECKING:
    from ..io.config import SteadyPolicy
    from ..io.keys import QKDKeyManager
    from ..policy import Policy

__all__ = ["SteadyAttempt", "SteadyFacts", "SteadyTicket"]

_log = logging.getLogger("hybridkex.steady")

#: The most keys a ticket keeps announced ahead (twice that held), however often it misses.
MAX_WINDOW = 64


@dataclass(frozen=True, slots=True)
class SteadyFacts:
    """What a steady-state connection was (``session.steady``): public values only."""

    #: The connection's counter under its parent (1, 2, ...).
    index: int
    #: The QKD key IDs in its PSK (empty: none, which the policy allowed and both ends logged).
    qkd_key_ids: tuple[str, ...]
    #: ``"fresh"``, ``"epoch"`` or ``"none"``.
    qkd_usage: str
    #: Whether the key was announced (and so pre-fetched by the server) before this connection.
    prefetched: bool
    #: Key IDs this connection announced for later ones.
    announced: tuple[str, ...]
    #: The public handle (hex) of the parent's authentication key: one per full handshake.
    auth_key_id: str
    #: Why no QKD key was used (None when one was).
    qkd_note: str | None = None


@dataclass(slots=True, eq=False)
class _Held:
    key: QKDKey = field(repr=False)
    taken: float


class SteadyAttempt:
    """One steady-state connection as the client plans it.

    If :attr:`request` is set, the connection needs a QKD key from the key manager first (none was
    reserved): answer with :meth:`provide` or :meth:`unavailable`.  Then :meth:`credentials` gives
    the TLS identity and PSK.
    """

    __slots__ = ("_ids", "_keys", "_note", "announced", "epoch", "index", "prefetched", "request", "ticket")

    def __init__(self, ticket: SteadyTicket, index: int, keys: list[QKDKey], announced: list[QKDKey], *,
                 epoch: bool, prefetched: bool, request: QKDKeysRequired | None) -> None:
        self.ticket = ticket
        self.index = index
        self._keys = keys
        self.announced = announced
        self.epoch = epoch
        self.prefetched = prefetched
        self.request = request
        self._note: str | None = None
        #: The canonical key IDs (used, announced) :meth:`credentials` put in the identity.
        self._ids: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def __repr__(self) -> str:
        return f"<SteadyAttempt #{self.index} keys={[k.key_id for k in self._keys]} prefetched={self.prefetched}>"

    def provide(self, keys: list[QKDKey]) -> None:
        """The key manager's answer to :attr:`request`."""
        self.request = None
        self._keys = list(keys)

    def unavailable(self, reason: BaseException) -> None:
        """No QKD key could be had; the policy (checked by :meth:`credentials`) decides."""
        self.request = None
        self._note = f"no QKD key for this steady-state connection: {reason}"

    @property
    def info(self) -> SessionInfo:
        return self.ticket.info

    @property
    def cipher(self) -> str:
        return self.ticket.suite.tls_cipher

    def facts(self) -> SteadyFacts:
        if self._ids is not None:  # as the identity carries them
            ids, announced = self._ids
        else:
            ids = tuple([k.key_id.lower() for k in self._keys])
            announced = tuple([k.key_id.lower() for k in self.announced])
        usage = "none" if not ids else "epoch" if self.epoch else "fresh"
        return SteadyFacts(self.index, ids, usage, self.prefetched and bool(ids), announced, self.ticket.auth_key_id,
                           self._note)

    def credentials(self) -> tuple[bytes, bytes]:
        """``(identity, psk)``; raises the policy's error when QKD is required and there is no key."""
        return self.ticket.credentials(self)


class SteadyTicket:
    """The client's right to steady-state connections to one server (thread-safe; never pickled).

    Made by a full handshake when both ends enable the steady state; kept by
    :class:`hybridkex.HybridClient` per server address, or passed as ``ticket=``.  :meth:`erase`
    drops the authentication key and every reserved QKD key.
    """

    def __init__(self, secret: CombinedSecret, info: SessionInfo, policy: SteadyPolicy, qkd: Policy,
                 keys: QKDKeyManager | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.info = info
        self.suite = secret.suite
        self.handle = derive.steady_handle(secret)
        #: The handle in hex (``SteadyFacts.auth_key_id``), made once.
        self.auth_key_id = self.handle.hex()
        self._key: bytearray | None = bytearray(derive.auth_key(secret))
        self._policy = policy
        self._qkd = qkd
        self._manager = keys
        self._clock = clock
        self._expires = clock() + policy.lifetime
        self._next = 1
        self._lock = threading.Lock()
        self._announced: deque[_Held] = deque()
        self._reserved: deque[_Held] = deque()
        self._refilling = False
        #: Keys to keep announced ahead: ``policy.announce``, doubled (up to MAX_WINDOW) each time a
        #: connection finds none announced, so a client opening connections faster than its keys
        #: are announced and fetched (concurrency, a slow KME) keeps them off the critical path.
        self._window = policy.announce
        self._in_flight = 0  # keys announced by connections still being set up
        #: Connections established with this ticket.
        self.connections = 0
        local = keys.source.sae_id if keys is not None else None
        self.peers: SteadyPeers | None = steady_peers(info, local) if self.suite.qkd else None
        self.qkd_possible = self.peers is not None and keys is not None
        self._psk = derive.PskContext(self.suite, client_identity=info.local_identity,
                                      server_identity=info.peer_identity,
                                      qkd_ids=self.peers.ids if self.peers is not None else None)
        # No refill yet: a ticket nobody keeps must not take QKD keys (HybridClient calls refill()).

    def __repr__(self) -> str:
        return (f"<SteadyTicket peer={self.info.peer_identity!r} suite={self.suite.name} next={self._next} "
                f"announced={len(self._announced)} reserved={len(self._reserved)}>")

    def __reduce__(self) -> NoReturn:
        raise TypeError("SteadyTicket cannot be pickled: it holds an authentication key and QKD keys")

    @property
    def usable(self) -> bool:
        with self._lock:
            return self._usable_locked()

    def _usable_locked(self) -> bool:
        return self._key is not None and self._clock() < self._expires and self._next <= self._policy.max_uses

    @property
    def announced_keys(self) -> int:
        """Announced, unused QKD keys held (tests, metrics)."""
        with self._lock:
            return len(self._announced)

    @property
    def refilling(self) -> bool:
        """A background reservation of QKD keys for later connections is in flight (tests, metrics)."""
        with self._lock:
            return self._refilling

    # --- one connection ---------------------------------------------------------------------------

    def take(self) -> SteadyAttempt | None:
        """The next connection's plan, or None when the ticket is used up or expired (then erased)."""
        with self._lock:
            if not self._usable_locked():
                self._erase_locked()
                return None
            index = self._next
            self._next += 1
            self._expire_locked()
            request: QKDKeysRequired | None = None
            keys: list[QKDKey] = []
            prefetched = False
            epoch = self._qkd.key_budget.mode == "epoch"
            announced: list[QKDKey] = []
            if self.suite.qkd and self.peers is not None:
                if epoch:  # the epoch key: the manager's cache answers (docs/spec.md, "QKD key budget")
                    request = QKDKeysRequired(self.peers.server_sae_id, 1, self.suite.qkd_key_bits, "epoch")
                elif self._announced:
                    keys, prefetched = [self._announced.popleft().key], True
                elif self._reserved:
                    keys = [self._reserved.popleft().key]
                else:
                    request = QKDKeysRequired(self.peers.server_sae_id, 1, self.suite.qkd_key_bits, "fresh")
                if not prefetched and self._policy.announce and self.connections:
                    self._window = min(max(self._window * 2, 1), MAX_WINDOW)  # a miss: hold more ahead
                if not epoch:
                    while self._reserved and len(announced) < derive.MAX_ANNOUNCED:
                        announced.append(self._reserved.popleft().key)
                    self._in_flight += len(announced)
        if not epoch:
            self.refill()
        return SteadyAttempt(self, index, keys, announced, epoch=epoch, prefetched=prefetched, request=request)

    def credentials(self, attempt: SteadyAttempt) -> tuple[bytes, bytes]:
        keys = attempt._keys
        if self.suite.qkd and not keys and self._qkd.qkd.value == "required":
            raise PolicyViolation(attempt._note or "no QKD key for this steady-state connection, and the "
                                  "policy requires one", ("qkd",))
        if self.suite.qkd and not keys:
            _log.warning("steady-state connection #%d to %s runs WITHOUT QKD (policy: optional): %s",
                         attempt.index, self.info.peer_identity, attempt._note)
        # Canonical (lower-case) key IDs, as the server reads them back from the identity: a KME may
        # deliver upper-case UUIDs, and the binding must be the same bytes on both ends.
        content = derive.SteadyIdentity(self.handle, attempt.index, attempt.epoch and bool(keys),
                                        tuple([k.key_id.lower() for k in keys]),
                                        tuple([k.key_id.lower() for k in attempt.announced]))
        with self._lock:
            key = bytes(self._key) if self._key is not None else None
        if key is None:
            raise AlreadyFinalized("this steady-state ticket was erased")
        attempt._ids = (content.used, content.announced)
        body = content.body()
        psk = self._psk.psk(key=key, qkd_key=b"".join([k.key for k in keys]), body=body, key_ids=content.used)
        return content.encode(key, self.suite, body), psk

    def succeeded(self, attempt: SteadyAttempt) -> None:
        """The connection is established: its announced keys are now the server's to pre-fetch."""
        now = self._clock()
        with self._lock:
            self.connections += 1
            self._in_flight -= len(attempt.announced)
            if self._key is not None:
                self._announced.extend([_Held(k, now) for k in attempt.announced])
        attempt.announced = []

    def failed(self, attempt: SteadyAttempt) -> None:
        """The connection failed: its own key is spent (the server may have used it); the keys it
        announced were never used and go back to the reserve, to be announced again."""
        now = self._clock()
        with self._lock:
            self._in_flight -= len(attempt.announced)
            if self._key is not None:
                self._reserved.extendleft(_Held(k, now) for k in reversed(attempt.announced))
        attempt.announced = []

    # --- reserve ----------------------------------------------------------------------------------

    def refill(self) -> None:
        """Once the window's worth of keys or fewer are held (``policy.announce``, grown on misses),
        take enough for twice as many in the background: one KME call per window of connections,
        so a KME round trip longer than a connection never drains the reserve."""
        manager, peers = self._manager, self.peers
        if manager is None or peers is None or not self.suite.qkd or self._qkd.key_budget.mode == "epoch":
            return
        with self._lock:
            held = len(self._announced) + len(self._reserved) + self._in_flight
            want = 2 * self._window - held
            if held > self._window or want <= 0 or self._refilling or not self._usable_locked():
                return
            self._refilling = True
        request = QKDKeysRequired(peers.server_sae_id, want, self.suite.qkd_key_bits, "fresh")
        workers.submit(lambda: manager.take(request), self._refilled)

    def _refilled(self, value: object, error: BaseException | None) -> None:
        now = self._clock()
        with self._lock:
            self._refilling = False
            if error is not None:
                _log.warning("could not reserve QKD keys for steady-state connections to %s: %s",
                             self.info.peer_identity, error)
                return
            if self._key is not None and isinstance(value, list):
                self._reserved.extend(_Held(k, now) for k in value if isinstance(k, QKDKey))

    def _expire_locked(self) -> None:
        limit = self._clock() - self._policy.key_lifetime
        for held in (self._announced, self._reserved):
            while held and held[0].taken <= limit:
                held.popleft()

    def _erase_locked(self) -> None:
        if self._key is not None:
            for i in range(len(self._key)):
                self._key[i] = 0
            self._key = None
        self._announced.clear()
        self._reserved.clear()

    def erase(self) -> None:
        """Drop the authentication key and every reserved QKD key; the ticket is unusable afterwards."""
        with self._lock:
            self._erase_locked()
