"""The server's side of the steady state: parent sessions, anti-replay, announced QKD keys.

:meth:`SteadyRegistry.claim` checks a steady-state identity before anything is spent for it: a known,
unexpired parent; the tag, which only a holder of the parent's authentication key can compute
(constant time); the suite; the QKD policy; a counter never accepted before (a sliding window, as
IPsec's anti-replay); QKD key IDs never used before.  Only then are the counter and the key IDs
spent — before TLS runs, so a replayed ClientHello finds them spent and is refused (fail closed: a
failed handshake spends them too).  After a connection is established, :meth:`confirm` fetches the
key IDs it announced, by ID, in the background, so the next connection finds its key here.

Without a shared state, parents are in memory: a restart forgets every parent, and a client then
runs one full handshake.  With a shared ``state`` (:mod:`hybridkex.state`: SQLite for the processes
of one host, PostgreSQL for a fleet) the counter and the fresh QKD key IDs are also spent there,
after the checks here: a key ID one process accepted is refused by every other, and a state that
cannot be reached refuses the connection (fail closed; the client then runs a full handshake).
With a state key, the parents are stored there too (sealed, :mod:`hybridkex.steady.shared`), so a
connection that reaches another process or host than its full handshake's is accepted there; the
reads of parents not in memory are bounded (:mod:`hybridkex.steady.reads`), so identities naming
random parents cannot turn into as many database queries.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .. import workers
from ..combiner import CombinedSecret
from ..exceptions import HandshakeTimeout, KeySourceError, StateError
from ..protocol import QKDKeysByIdRequired, SessionInfo
from ..qkd.base import QKDKey
from ..suites import Suite
from . import derive, shared
from .peers import SteadyPeers, steady_peers
from .prefetch import MAX_HELD, AnnouncedKeys, Fetch
from .reads import ParentReads
from .ticket import SteadyFacts

if TYPE_CHECKING:
    from ..io.config import StateReads, SteadyPolicy
    from ..io.keys import QKDKeyManager
    from ..policy import Policy
    from ..state import SharedState

__all__ = ["SteadyClaim", "SteadyRegistry", "SteadyStats"]

_log = logging.getLogger("hybridkex.steady")

#: Counters accepted out of order behind the highest one (concurrent connections of one client).
WINDOW: Final = 4096
_WINDOW_MASK: Final = (1 << WINDOW) - 1


class _Parent:
    __slots__ = ("expires", "fetching", "in_flight", "info", "key", "next_batch", "next_fetch", "peers", "psk_context",
                 "ready", "spent", "suite", "top", "window")

    def __init__(self, key: bytes, suite: Suite, info: SessionInfo, peers: SteadyPeers | None, expires: float) -> None:
        self.key = bytearray(key)
        self.suite = suite
        self.info = info
        self.peers = peers
        self.expires = expires
        self.top = 0
        self.window = 0
        self.ready: dict[str, tuple[QKDKey, float]] = {}
        self.fetching: dict[str, Fetch] = {}
        #: When the background fetch in flight started (None: none is); announced IDs that arrive
        #: meanwhile wait in ``next_batch`` (their connections wait on ``next_fetch``) and go in one
        #: request after it.
        self.in_flight: float | None = None
        self.next_batch: list[str] = []
        self.next_fetch: Fetch | None = None
        self.spent: set[str] = set()
        self.psk_context = derive.PskContext(suite, client_identity=info.peer_identity,
                                             server_identity=info.local_identity,
                                             qkd_ids=peers.ids if peers is not None else None)

    def erase(self) -> None:
        for i in range(len(self.key)):
            self.key[i] = 0
        self.ready.clear()

    def spend(self, index: int) -> str | None:
        """Mark counter ``index`` used; why not, if it cannot be."""
        if index > self.top:
            shift = index - self.top
            self.window = ((self.window << shift) | 1) & _WINDOW_MASK if shift < WINDOW else 1
            self.top = index
            return None
        offset = self.top - index
        if offset >= WINDOW:
            return "too old"
        if self.window >> offset & 1:
            return "replayed"
        self.window |= 1 << offset
        return None


@dataclass(slots=True)
class SteadyStats:
    """Counters of a :class:`SteadyRegistry` (metrics, tests)."""

    registered: int = 0
    accepted: int = 0
    refused: int = 0
    replayed: int = 0
    prefetched: int = 0
    on_demand: int = 0
    prefetch_failures: int = 0
    #: Background KME requests for announced keys (announcements arriving while one is in flight
    #: share the next).
    prefetch_requests: int = 0
    #: Parents read from the shared state (registered by another process or host).
    loaded: int = 0
    #: Announced QKD keys taken from the shared state (pre-fetched by another process or host).
    shared_keys: int = 0


class SteadyClaim:
    """An accepted steady-state identity: its counter and key IDs are spent.

    :attr:`keys` holds the QKD keys when they are here already; otherwise :meth:`wait` (blocking:
    a worker thread) waits for the background fetch or fetches them on demand.  Then :meth:`psk`.
    """

    __slots__ = ("_key", "_psk_context", "_registry", "body", "content", "facts", "fetch", "identity", "info", "keys",
                 "parent_handle", "peers", "suite")

    def __init__(self, registry: SteadyRegistry, parent: _Parent, identity: bytes, content: derive.SteadyIdentity,
                 body: bytes, *, keys: list[QKDKey] | None) -> None:
        self._registry = registry
        self._key = bytes(parent.key)
        self._psk_context = parent.psk_context
        self.suite = parent.suite
        self.info = parent.info
        self.peers = parent.peers
        self.parent_handle = content.handle
        self.identity = identity
        self.content = content
        self.body = body
        self.keys = keys
        #: The background fetch of this claim's key, when it was in flight at claim time.
        self.fetch: Fetch | None = None
        usage = "none" if not content.used else "epoch" if content.epoch else "fresh"
        self.facts = SteadyFacts(content.index, content.used, usage, keys is not None and bool(content.used),
                                 content.announced, content.handle.hex(),
                                 None if content.used else "the client's steady-state connection carried no QKD key")

    def __repr__(self) -> str:
        return f"<SteadyClaim #{self.content.index} of {self.info.peer_identity!r} keys={self.content.used}>"

    @property
    def request(self) -> QKDKeysByIdRequired:
        assert self.peers is not None
        return QKDKeysByIdRequired(self.peers.client_sae_id, self.content.used,
                                   "epoch" if self.content.epoch else "fresh")

    def wait(self, timeout: float) -> list[QKDKey]:
        """The QKD keys (blocking): from the background fetch in flight, or fetched now by ID."""
        return self._registry._wait(self, timeout)

    def psk(self, keys: list[QKDKey]) -> bytes:
        """The connection's TLS PSK from its QKD keys (in the identity's order)."""
        want = self.suite.qkd_key_bits // 8
        if [k.key_id.lower() for k in keys] != [k.lower() for k in self.content.used] or [
                k for k in keys if len(k.key) != want]:
            raise KeySourceError("the key source answered with other QKD keys than the steady-state identity names")
        return self._psk_context.psk(key=self._key, qkd_key=b"".join([k.key for k in keys]), body=self.body,
                                     key_ids=self.content.used if keys else ())

    def confirm(self) -> None:
        """The connection is established: fetch the key IDs it announced, in the background."""
        self._registry._prefetch(self)


class SteadyRegistry(AnnouncedKeys):
    """The server's steady-state parents (bounded, expiring, replay-refusing; thread-safe).

    Args:
        policy: the server's :class:`~hybridkex.io.SteadyPolicy`.
        qkd: the server's handshake policy (QKD mode and key budget).
        keys: the server's long-lived key manager (None when the policy disables QKD).
        state: where counters and QKD key IDs are also spent, shared with other server processes
            or hosts (None: this process only).
        reads: the bounds on reading parents not in memory from ``state`` (default: ``StateReads()``).
    """

    def __init__(self, policy: SteadyPolicy, qkd: Policy, keys: QKDKeyManager | None, *,
                 clock: Callable[[], float] = time.monotonic, state: SharedState | None = None,
                 off_loop: bool = False, reads: StateReads | None = None) -> None:
        self.policy = policy
        self._qkd = qkd
        self._keys = keys
        self._state = state
        # Parents are shared only sealed: a state without a key spends counters but keeps no parent.
        self._share = state is not None and state.can_seal
        if self._share and reads is None:
            from ..io.config import StateReads  # noqa: PLC0415 - io imports this module

            reads = StateReads()
        #: The gate on reading parents not in memory (None: nothing is read).
        self.reads = ParentReads(reads, clock=clock) if self._share and reads is not None else None
        #: The server is asyncio: its driver runs claims on a worker thread (a StateCall), and the
        #: parents' writes (register, discard) go to a worker thread too.
        self.off_loop = off_loop and state is not None
        self._clock = clock
        self._lock = threading.Lock()
        self._parents: OrderedDict[bytes, _Parent] = OrderedDict()  # insertion order is expiry order
        self._used_shared: dict[str, list[str]] = {}  # kind -> key IDs used here whose shared copy goes next
        self.stats = SteadyStats()

    def __repr__(self) -> str:
        return f"<SteadyRegistry sessions={len(self._parents)} max_sessions={self.policy.max_sessions}>"

    def __len__(self) -> int:
        with self._lock:
            self._purge_locked()
            return len(self._parents)

    def register(self, secret: CombinedSecret, info: SessionInfo, *,
                 share: list[Callable[[], None]] | None = None) -> bytes:
        """Remember a parent session's handle and authentication key; the handle.

        Storing it in the shared state: as for :meth:`ReconnectRegistry.register`."""
        handle = derive.steady_handle(secret)
        local = self._keys.source.sae_id if self._keys is not None else None
        peers = steady_peers(info, local) if secret.suite.qkd else None
        parent = _Parent(derive.auth_key(secret), secret.suite, info, peers, self._clock() + self.policy.lifetime)
        with self._lock:
            self._purge_locked()
            old = self._parents.pop(handle, None)
            if old is not None:  # pragma: no cover - a 128-bit handle collision
                old.erase()
            while len(self._parents) >= self.policy.max_sessions:
                self._parents.popitem(last=False)[1].erase()
            self._parents[handle] = parent
            self.stats.registered += 1
        if self.reads is not None:
            self.reads.known(handle)
        if self._share:
            blob = shared.encode_parent(bytes(parent.key), parent.suite, parent.info)
            put = functools.partial(self._put_parent, handle, blob, parent.info.peer_identity,
                                    time.time() + self.policy.lifetime)
            if self.off_loop and share is not None:
                share.append(put)
            else:
                self._in_background(put) if self.off_loop else put()
        return handle

    @staticmethod
    def _in_background(fn: Callable[[], object]) -> None:
        workers.submit(fn, lambda _value, _error: None)  # fn logs its own failures

    def _put_parent(self, handle: bytes, blob: bytes, peer: str, expires_at: float) -> None:
        """Store the parent in the shared state, so another process or host accepts its connections."""
        assert self._state is not None
        try:
            self._state.put_ticket(shared.KIND, handle, blob, expires_at=expires_at)
        except StateError as exc:  # this process still serves it; others refuse it (full handshake)
            _log.warning("the steady-state parent of %r is not shared with other servers: %s", peer, exc)

    def _load_parent(self, handle: bytes) -> bool | None:
        """A parent another process registered, from the shared state, into this process's memory:
        whether the state held it (None: the read failed).

        Outside the lock (a database round trip), behind :attr:`reads`.  What the parent's
        connections spend is spent in the shared state, so a parent known in two processes is no
        weaker than one."""
        assert self._state is not None
        try:
            ticket = self._state.get_ticket(shared.KIND, handle)
            if ticket is None:
                return False
            key, suite, info = shared.decode_parent(ticket.secret)
        except StateError as exc:
            _log.warning("cannot read a steady-state parent from the shared state: %s (refused: fail closed)", exc)
            return None
        local = self._keys.source.sae_id if self._keys is not None else None
        peers = steady_peers(info, local) if suite.qkd else None
        # Wall-clock expiry (shared by hosts) onto this process's clock.
        parent = _Parent(key, suite, info, peers, self._clock() + (ticket.expires_at - time.time()))
        with self._lock:
            if handle in self._parents:  # another thread loaded it meanwhile
                parent.erase()
                return True
            while len(self._parents) >= self.policy.max_sessions:
                self._parents.popitem(last=False)[1].erase()
            self._parents[handle] = parent
            self.stats.loaded += 1
        return True

    def discard(self, handle: bytes) -> None:
        """Forget a parent (its own TLS handshake failed), here and in the shared state."""
        with self._lock:
            parent = self._parents.pop(handle, None)
        if parent is not None:
            parent.erase()
        if self._share:
            drop = functools.partial(self._drop_parent, handle)
            self._in_background(drop) if self.off_loop else drop()

    def _drop_parent(self, handle: bytes) -> None:
        assert self._state is not None
        try:
            self._state.drop_ticket(shared.KIND, handle)
        except StateError as exc:  # it expires there (steady.lifetime)
            _log.warning("cannot drop a steady-state parent from the shared state: %s", exc)

    def clear(self) -> None:
        """Forget every parent (server shutdown)."""
        with self._lock:
            parents, self._parents = list(self._parents.values()), OrderedDict()
        for p in parents:
            p.erase()

    def _purge_locked(self) -> None:
        now = self._clock()
        while self._parents:
            handle, parent = next(iter(self._parents.items()))
            if parent.expires > now:
                break
            del self._parents[handle]
            parent.erase()

    def _refuse(self, why: str, parent: _Parent | None = None) -> None:
        self.stats.refused += 1
        who = f" of {parent.info.peer_identity!r}" if parent is not None else ""
        _log.info("steady-state connection%s refused: %s", who, why)

    def claim(self, identity: bytes, cipher: str, *, admit: Callable[[str], None] | None = None,
              source: str | None = None) -> SteadyClaim | None:
        """The accepted identity, with its counter and key IDs spent, or None (refused; logged).

        ``admit(peer_identity)`` (the server's ``ResponderConfig.admit``, e.g. a per-peer rate
        limit) runs once the tag has verified and before anything is spent; what it raises
        (:class:`~hybridkex.exceptions.RateLimited`) propagates.  ``source``: the client's IP
        address, for the per-address bound on reading unknown parents (:attr:`reads`).
        """
        parsed = derive.parse_identity(identity)
        if parsed is None:
            self._refuse("a malformed steady-state identity")
            return None
        content, body, tag = parsed
        read = False
        if self.reads is not None:
            with self._lock:
                self._purge_locked()
                known = content.handle in self._parents
            if not known:
                why = self.reads.begin(content.handle, source)
                if why is not None:  # counted in self.reads (cached, limited)
                    self._refuse(why)
                    return None
                found = self._load_parent(content.handle)
                if found is False:
                    self.reads.unknown(content.handle)
                read = bool(found)
        with self._lock:
            self._purge_locked()
            parent = self._parents.get(content.handle)
            if parent is None:
                self._refuse("unknown or expired parent session (the server restarted or forgot it)")
                return None
            if not derive.check_tag(bytes(parent.key), parent.suite, body, tag):
                self._refuse("the identity's tag does not verify", parent)
                return None
            if read and self.reads is not None:  # a real client's read: not charged
                self.reads.found(source)
            if admit is not None:
                admit(parent.info.peer_identity)
            why = self._check_counter(parent, content, cipher)
            if why is None:
                why = parent.spend(content.index)  # spent now, whatever follows: fail closed
                if why == "replayed":
                    self.stats.replayed += 1
                    _log.warning("steady-state connection #%d of %r refused: its counter was used before (a "
                                 "replayed ClientHello)", content.index, parent.info.peer_identity)
                    return None
            if why is None:
                why = self._check_qkd(parent, content)
            if why is not None:
                self._refuse(why, parent)
                return None
            self._expire_ready_locked(parent, self._clock())
            keys: list[QKDKey] | None = [] if not content.used else None
            fetch: Fetch | None = None
            if content.used and not content.epoch:
                parent.spent.update(content.used)
                held = [parent.ready.pop(k, None) for k in content.used]
                if None not in held:
                    keys = [h[0] for h in held if h is not None]
                    self.stats.prefetched += 1
                    if self._share and parent.peers is not None:
                        self._unshare_later(parent.peers, content.used)
                else:  # announced and being fetched: the claim waits for that fetch, never fetches again
                    fetch = parent.fetching.get(content.used[0])
            self.stats.accepted += 1
            claim = SteadyClaim(self, parent, identity, content, body, keys=keys)
            claim.fetch = fetch
        # Outside the lock: a database round trip must not hold up this process's other claims.
        why = self._spend_shared(parent, content) if self._state is not None else None
        if why is not None:
            with self._lock:
                self.stats.accepted -= 1
                self.stats.replayed += why.startswith("replayed")
            self._refuse(why, parent)
            return None
        return claim

    def _spend_shared(self, parent: _Parent, content: derive.SteadyIdentity) -> str | None:
        """Spend the counter and the fresh key IDs in the shared state too; why not, if not."""
        state = self._state
        assert state is not None
        fresh = bool(content.used) and not content.epoch and parent.peers is not None
        scope = f"qkd:{parent.peers.client_sae_id}:{parent.peers.server_sae_id}" if parent.peers else "qkd:-"
        try:  # one transaction, one round trip
            why = state.spend_claim(f"steady:{content.handle.hex()}", content.index, scope,
                                    content.used if fresh else (), window=WINDOW)
            if why == "key used":
                return f"QKD key {content.used[0]} was used before (by another server sharing the state)"
            if why is not None:
                return f"{why}: counter {content.index} (shared state)"
        except StateError as exc:
            _log.warning("steady-state connection #%d of %r refused: %s (fail closed)", content.index,
                         parent.info.peer_identity, exc)
            return "the shared state is unavailable"
        return None

    def _check_counter(self, parent: _Parent, content: derive.SteadyIdentity, cipher: str) -> str | None:
        if parent.suite.tls_cipher != cipher:
            return f"the ClientHello's cipher {cipher} is not the parent suite's {parent.suite.tls_cipher}"
        if content.index > self.policy.max_uses:
            return f"counter {content.index} beyond steady.max_uses ({self.policy.max_uses})"
        return None

    def _check_qkd(self, parent: _Parent, content: derive.SteadyIdentity) -> str | None:
        suite = parent.suite
        if not content.used:
            if suite.qkd and self._qkd.qkd.value == "required":
                return "no QKD key, and this server's policy requires one"
            if suite.qkd:
                _log.warning("steady-state connection #%d of %r runs WITHOUT QKD (policy: optional)",
                             content.index, parent.info.peer_identity)
            return None
        if not suite.qkd or parent.peers is None or self._keys is None:
            return "QKD key IDs for a parent session without QKD"
        if len(content.used) != 1:
            return "a steady-state connection uses exactly one QKD key"
        if content.epoch and self._qkd.key_budget.mode != "epoch":
            return "an epoch key, and this server's key budget is 'fresh'"
        if not content.epoch and not parent.spent.isdisjoint(content.used):
            return f"QKD key {content.used[0]} was used before"
        return None

    # --- QKD keys ---------------------------------------------------------------------------------

    def _wait(self, claim: SteadyClaim, timeout: float) -> list[QKDKey]:
        manager = self._keys
        if manager is None:  # pragma: no cover - claim() refuses key IDs without a key manager
            raise KeySourceError("no key source is configured")
        key_id = claim.content.used[0]
        fetch = claim.fetch
        if fetch is not None:
            if not fetch.done.wait(timeout):
                raise HandshakeTimeout(f"the background fetch of QKD key {key_id} did not finish within "
                                       f"{timeout:.3g} s")
            key = fetch.keys.get(key_id)
            if key is not None:
                self.stats.prefetched += 1
                return [key]
            # The fetch failed (the KME lost the key, or was down): the KME delivers a key once, so
            # a fetch that failed for this ID cannot succeed on demand either unless the KME was down.
        if self._share and fetch is None:
            shared_key = self._take_shared(claim, key_id)
            if shared_key is not None:
                return [shared_key]
        self.stats.on_demand += 1
        return manager.fetch(claim.request)

    def _take_shared(self, claim: SteadyClaim, key_id: str) -> QKDKey | None:
        """The announced key another process pre-fetched, taken from the shared state (exactly one
        taker: a conditional delete), or None: then fetched from the KME on demand."""
        assert self._state is not None and claim.peers is not None
        try:
            ticket = self._state.take_ticket(shared.key_kind(claim.peers.client_sae_id), key_id.encode())
        except StateError as exc:
            _log.warning("cannot take QKD key %s from the shared state: %s; fetching it from the KME", key_id, exc)
            return None
        if ticket is None:
            return None
        self.stats.shared_keys += 1
        return QKDKey(key_id, ticket.secret)

    def _share_keys(self, peers: SteadyPeers, keys: list[QKDKey]) -> None:
        """Store pre-fetched announced keys sealed in the shared state: the KME delivers a key once,
        and the connection that uses it may reach another process (a worker thread, off the path).
        The shared copies of keys this process used itself go in the same transaction (one commit)."""
        assert self._state is not None
        kind = shared.key_kind(peers.client_sae_id)
        with self._lock:
            drop = self._used_shared.pop(kind, [])
        expires = time.time() + self.policy.key_lifetime
        try:
            self._state.swap_tickets(kind, [(k.key_id.lower().encode(), k.key) for k in keys],
                                     [k.lower().encode() for k in drop], expires_at=expires)
        except StateError as exc:  # other processes then fetch on demand and fail: a full handshake
            _log.warning("pre-fetched QKD keys are not shared with other servers: %s", exc)

    def _unshare_later(self, peers: SteadyPeers, key_ids: tuple[str, ...]) -> None:
        """This process used its own pre-fetched key: its shared copy goes with the next share (whose
        transaction it joins), or, if too many wait, now on a worker thread.  Called with the lock."""
        kind = shared.key_kind(peers.client_sae_id)
        waiting = self._used_shared.setdefault(kind, [])
        waiting.extend(key_ids)
        if len(waiting) >= MAX_HELD:
            self._used_shared[kind] = []
            self._in_background(functools.partial(self._swap, kind, waiting))

    def _swap(self, kind: str, drop: list[str]) -> None:
        assert self._state is not None
        try:
            self._state.swap_tickets(kind, [], [k.lower().encode() for k in drop], expires_at=0.0)
        except StateError as exc:  # they expire there (steady.key_lifetime), their IDs spent: never used
            _log.warning("cannot drop used QKD keys from the shared state: %s", exc)

    def held_keys(self, handle: bytes | None = None) -> int:
        """Pre-fetched keys held (for one parent, or all): tests and metrics."""
        with self._lock:
            if handle is None:
                parents = list(self._parents.values())
            else:
                parents = [self._parents[handle]] if handle in self._parents else []
            return sum(len(p.ready) for p in parents)
