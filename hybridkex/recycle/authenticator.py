"""Recycled authentication: after the bootstrap, peers authenticate with keys from earlier handshakes.

The ladder (docs/recycle.md): the first handshake of a pair is authenticated by its *bootstrap*
credential (a pre-shared key or PKI).  Every successful handshake then derives, from its
QKD-mixed combined secret, the pair's next authentication key and its public 16-byte ID
(``Session.next_auth_key()`` / ``Session.next_auth_key_id()``), and both sides store it
(:meth:`AuthKeyStore.rotate`).  Later handshakes are authenticated with such a recycled key
(mode 5, ``recycled``), so a later break of the bootstrap mechanism exposes nothing and, under
policy ``bootstrap-once``, the bootstrap credential is refused after the first recycled success and
can be deleted.

How a handshake picks its key:

* the initiator's Hello lists the IDs of the keys it holds for the responder, newest first (at
  most :attr:`RecyclePolicy.max_offered`); an empty list says "I recycle, but hold no key yet";
* the responder picks the newest key it also holds and names it in its Response, or, holding none,
  falls back to the bootstrap mode if the Hello offered it and its policy permits it;
* both MAC the transcript with that key (role-separated, as PSK mode, under the recycled labels
  and with the key ID as context); the lists and the choice are in the authenticated transcript.

Rotation (:meth:`RecycledAuthenticator.after_handshake`, called by the driver): the initiator
records when it has sent its Finished, the responder when it has verified the initiator's.

Usage::

    store = SQLiteAuthKeyStore("/var/lib/hybridkex/auth-keys.sqlite3")
    recycled = RecycledAuthenticator(store, RecyclePolicy("bootstrap-once"))
    config = InitiatorConfig("client.example", (recycled, PSKAuthenticator({"server.example": psk})),
                             peer_identity="server.example")
    session = run_initiator(sock, config, keys)   # rotates the store after success

The store is read from inside the handshake (``offer``/``accept``/``permits``: one indexed SQLite
read) and written after it: the driver's hook queues the rotation (:meth:`SQLiteAuthKeyStore.rotate_later`)
and a background thread commits it (one fsync'd transaction per batch).  Key bytes never appear in
``repr``, logs or exception text; only public key IDs and epochs do.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn, get_args

from ..exceptions import AuthenticationError, ConfigurationError
from ..hazmat import labels
from ..hazmat.encoding import lp_join
from ..hazmat.kdf import hkdf
from ..protocol import MAX_RECYCLED_KEY_IDS
from ..protocol.auth import AuthContext, Authenticator, AuthMode, AuthOffer, MACAuthenticator
from .store import KEY_ID_LEN, KEY_LEN, AuthKey, AuthKeyStore, WriteBehindStore

if TYPE_CHECKING:
    from ..protocol import CertificateMsg, Session
    from ..state import SharedState

__all__ = ["BootstrapPolicy", "RecyclePolicy", "RecycledAuthenticator", "RecycledKey"]

log = logging.getLogger("hybridkex.recycle")

BootstrapPolicy = Literal["bootstrap-once", "recycled-with-fallback", "rebootstrap"]
_POLICIES: tuple[str, ...] = get_args(BootstrapPolicy)


@dataclass(frozen=True, slots=True)
class RecyclePolicy:
    """When a pair's bootstrap credential (PSK or PKI) is still accepted.

    ``bootstrap``:

    * ``"bootstrap-once"`` (default): accepted until the pair's first handshake authenticated by a
      recycled key, then refused (the store's ``bootstrap_retired`` flag); ``hybridkex recycle
      rebootstrap`` accepts it again.  A pair the store has no record of may bootstrap.
    * ``"recycled-with-fallback"``: always accepted when no recycled key is in common.  Weaker: a
      leaked PSK or a broken signature scheme authenticates forever.
    * ``"rebootstrap"``: accepted only after an operator armed the pair with ``hybridkex recycle
      rebootstrap`` (also for its first enrolment), retired again at the first recycled success.
      A store that lost its records (wiped, restored, a new replica) never falls back by itself.

    ``max_offered``: most key IDs an initiator lists in one Hello (1..16; the newest, plus the
    newest confirmed one).
    """

    bootstrap: BootstrapPolicy = "bootstrap-once"
    max_offered: int = 8

    def __post_init__(self) -> None:
        if self.bootstrap not in _POLICIES:
            raise ConfigurationError(f"must be one of {', '.join(_POLICIES)}, not {self.bootstrap!r}",
                                     field="recycle.bootstrap")
        if not isinstance(self.max_offered, int) or isinstance(self.max_offered, bool) or not (
                1 <= self.max_offered <= MAX_RECYCLED_KEY_IDS):
            raise ConfigurationError(f"must be an integer in 1..{MAX_RECYCLED_KEY_IDS}", field="recycle.max_offered")

    def bootstrap_allowed(self, state: str) -> bool:
        """Whether the bootstrap is accepted for a pair in store state ``state`` (unknown/active/retired)."""
        if self.bootstrap == "recycled-with-fallback":
            return True
        if self.bootstrap == "bootstrap-once":
            return state != "retired"
        return state == "active"


class RecycledKey(MACAuthenticator):
    """One recycled key bound to one peer pair for one handshake (made by :class:`RecycledAuthenticator`).

    ``K_role = HKDF-H(salt = "hybridkex/v1 recycled authentication", IKM = key,
    info = lp("hybridkex/v1") || lp(suite name) || lp("recycled auth initiator" / "... responder")
    || lp(key ID), L = HashLen)``; the proof is ``HMAC-H(K_role, TH || confirm)`` as in PSK mode.
    """

    __slots__ = ("_epoch", "_key", "_key_id", "_local", "_peer")

    def __init__(self, local_identity: str, peer_identity: str, key_id: bytes, key: bytes, epoch: int) -> None:
        if len(key_id) != KEY_ID_LEN or len(key) != KEY_LEN:
            raise ConfigurationError(f"recycled keys are {KEY_LEN} bytes with {KEY_ID_LEN}-byte IDs",
                                     field="recycle.key")
        self._local, self._peer = local_identity, peer_identity
        self._key_id, self._key, self._epoch = bytes(key_id), bytes(key), epoch

    @classmethod
    def from_stored(cls, local_identity: str, peer_identity: str, stored: AuthKey) -> RecycledKey:
        return cls(local_identity, peer_identity, stored.key_id, stored.key, stored.epoch)

    def __repr__(self) -> str:
        return (f"RecycledKey(local={self._local!r}, peer={self._peer!r}, key_id={self._key_id.hex()}, "
                f"epoch={self._epoch}, key=<redacted>)")

    def __reduce__(self) -> NoReturn:
        raise TypeError("RecycledKey cannot be pickled")

    @property
    def mode(self) -> AuthMode:
        return AuthMode.RECYCLED

    @property
    def key_id(self) -> bytes:
        return self._key_id

    @property
    def epoch(self) -> int:
        return self._epoch

    def pair_key(self, peer_identity: str) -> bytes:
        if not hmac.compare_digest(peer_identity.encode(), self._peer.encode()):
            raise AuthenticationError(f"recycled key {self._key_id.hex()} belongs to {self._peer!r}, not "
                                      f"{peer_identity!r}")
        return self._key

    def _mac_key(self, ctx: AuthContext, peer: str) -> bytes:
        purpose = (labels.RECYCLED_AUTH_INITIATOR if ctx.prover_role == "initiator"
                   else labels.RECYCLED_AUTH_RESPONDER)
        s = ctx.suite
        return hkdf(s.hash, salt=labels.RECYCLED_AUTH_SALT, ikm=self.pair_key(peer),
                    info=lp_join(labels.PROTOCOL, s.label, purpose, self._key_id), length=s.hash_len)


class RecycledAuthenticator(Authenticator):
    """Authentication mode 5 (``recycled``) over an :class:`AuthKeyStore`; list it first, before the
    bootstrap authenticator (PSK or PKI), in both sides' configurations.

    Stateless across handshakes (all state is in the store), so one instance serves every thread
    and connection.  It never proves anything itself: each handshake uses a :class:`RecycledKey`
    bound to the key the two sides agreed on.
    """

    def __init__(self, store: AuthKeyStore, policy: RecyclePolicy | BootstrapPolicy | None = None) -> None:
        if isinstance(policy, str):
            policy = RecyclePolicy(policy)
        if policy is not None and not isinstance(policy, RecyclePolicy):
            raise ConfigurationError("must be a RecyclePolicy or a policy name", field="recycle.policy")
        self._store = store
        self._policy = policy or RecyclePolicy()
        # Write-behind where the store offers it: the fsync leaves the handshake's critical path; the
        # store never shows a queued key, so the new key is not used before it is durable.
        self._record = store.rotate_later if isinstance(store, WriteBehindStore) else store.rotate

    @classmethod
    def from_state(cls, policy: RecyclePolicy | BootstrapPolicy | None = None, *, state: SharedState | None = None,
                   state_url: str | None = None, seal_key: bytes | None = None) -> RecycledAuthenticator:
        """Recycled authentication over the keys kept in a shared state (docs/fleet.md): ``state``
        (an open :class:`~hybridkex.state.SharedState`, whose lifetime the caller keeps), or
        ``state_url`` (opened here with ``seal_key``, kept open for the life of the process)."""
        if (state is None) == (state_url is None):
            raise ConfigurationError("give exactly one of state= and state_url=", field="state")
        if state is None:
            from ..state import open_state  # noqa: PLC0415 - hybridkex.state imports this package's store

            assert state_url is not None
            state = open_state(state_url, seal_key=seal_key)
        return cls(state.auth_keys(), policy)

    def __repr__(self) -> str:
        return f"RecycledAuthenticator(store={self._store!r}, policy={self._policy.bootstrap!r})"

    @property
    def mode(self) -> AuthMode:
        return AuthMode.RECYCLED

    @property
    def policy(self) -> RecyclePolicy:
        return self._policy

    @property
    def store(self) -> AuthKeyStore:
        return self._store

    # --- negotiation -----------------------------------------------------------------------------

    def offer(self, local_identity: str, peer_identity: str | None) -> AuthOffer:
        if peer_identity is None:
            raise ConfigurationError("recycled authentication needs the responder's identity to find its keys",
                                     field="peer_identity")
        held = self._store.keys(local_identity, peer_identity)  # newest first
        n = self._policy.max_offered
        chosen = held[:n]
        if len(held) > n and not any(k.confirmed for k in chosen):
            # The newest key the peer is known to hold always goes in: with it no lockout is possible.
            confirmed = next((k for k in held if k.confirmed), None)
            if confirmed is not None:
                chosen = [*held[: n - 1], confirmed]
        return AuthOffer(self, [(k.key_id, RecycledKey.from_stored(local_identity, peer_identity, k))
                                for k in chosen])

    def accept(self, local_identity: str, peer_identity: str, key_ids: tuple[bytes, ...]) -> RecycledKey | None:
        # Newest first: take the newest in common.  Superseded keys inside the grace period count too,
        # so a handshake whose Hello predates a concurrent rotation still completes.
        held = self._store.find(local_identity, peer_identity, key_ids)
        return RecycledKey.from_stored(local_identity, peer_identity, held[0]) if held else None

    def permits(self, mode: AuthMode, local_identity: str, peer_identity: str | None) -> bool:
        if mode is AuthMode.RECYCLED or peer_identity is None:
            return True
        return self._policy.bootstrap_allowed(self._store.bootstrap_state(local_identity, peer_identity))

    # --- never used unbound ------------------------------------------------------------------------

    def prove(self, ctx: AuthContext, data: bytes) -> bytes:
        raise AuthenticationError("no recycled key was agreed for this handshake")

    def verify(self, ctx: AuthContext, data: bytes, proof: bytes, certificate: CertificateMsg | None) -> None:
        raise AuthenticationError("no recycled key was agreed for this handshake")

    # --- rotation ----------------------------------------------------------------------------------

    def after_handshake(self, session: Session) -> None:
        """Record the key this handshake derived (queued for the store's writer, or one store
        transaction for a store without write-behind); see the module docs.

        Skipped when the handshake says nothing about recycling: a bootstrap handshake whose
        initiator did not offer the recycled mode (a peer without recycling).
        """
        info = session.info
        if info.auth_mode == AuthMode.RECYCLED.label:
            if info.auth_key_id is None:
                return  # another recycled-mode authenticator without key IDs; not ours
            used: bytes | None = bytes.fromhex(info.auth_key_id)
        elif AuthMode.RECYCLED.label in info.offered_auth_modes:
            used = None  # bootstrap handshake: starts (or restarts) the chain
        else:
            return
        new_id = session.next_auth_key_id()
        self._record(info.local_identity, info.peer_identity, used_key_id=used, new_key_id=new_id,
                     new_key=session.next_auth_key())
        log.info("recycled authentication %s <-> %s: authenticated by %s%s, stored next key %s",
                 info.local_identity, info.peer_identity, info.auth_mode,
                 f" key {used.hex()}" if used is not None else " (bootstrap)", new_id.hex())
