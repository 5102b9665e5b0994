"""Pieces of connection setup (:mod:`hybridkex.io.setup`) and its drivers: TLS contexts, deadlines,
key managers, the per-connection PSK decisions, and the server's rejection log line."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeGuard, cast

from ..exceptions import (
    AuthenticationError,
    ConfigurationError,
    HandshakeTimeout,
    HybridKEXError,
    RemoteProtocolError,
)
from ..policy import Policy
from ..protocol import HEADER_LEN, MAGIC, FrameType, Session, peer_abort_error
from ..steady import SteadyRegistry, SteadyTicket
from ..tls import PQ_GROUP
from ..tls.pyopenssl import client_context, server_context
from ._bridge import BlockingBridge
from .config import ClientConfig, ServerConfig, TLSOptions
from .keys import KeySourceArg, QKDKeyManager
from .reconnect import ReconnectMatch, ReconnectRegistry, ReconnectTicket

if TYPE_CHECKING:
    from OpenSSL import SSL

    from ..qkd.base import AsyncKeySource, KeySource
    from ..state.purger import PurgeHandle

_log = logging.getLogger("hybridkex.server")


class Deadline:
    """One connection setup's deadline; each stage takes its share with :meth:`stage`."""

    __slots__ = ("end", "total")

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.end = time.monotonic() + seconds

    def remaining(self, stage: str, cap: float | None = None) -> float:
        """Seconds ``stage`` may take (at most ``cap``); HandshakeTimeout once the deadline passed."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise HandshakeTimeout(f"{stage} did not complete within the connection setup deadline of "
                                   f"{self.total:.3g} s")
        return left if cap is None else min(left, cap)

    def stage(self, name: str, cap: float | None = None) -> Stage:
        """A sub-deadline for ``name``: the earlier of the overall deadline and ``cap`` from now."""
        now = time.monotonic()
        if cap is not None and now + cap < self.end:
            return Stage(name, now + cap, cap)
        return Stage(name, self.end, self.total)


class Stage:
    """The deadline of one setup stage (TLS handshake, reading the first byte, ...)."""

    __slots__ = ("end", "limit", "name")

    def __init__(self, name: str, end: float, limit: float) -> None:
        self.name = name
        self.end = end
        self.limit = limit

    def left(self) -> float:
        """Seconds left; HandshakeTimeout (naming the stage) once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.timeout_error()
        return left

    def timeout_error(self) -> HandshakeTimeout:
        """The error for this stage's deadline having passed."""
        return HandshakeTimeout(f"{self.name} did not complete within {self.limit:.3g} s")


@functools.lru_cache(maxsize=64)
def _context(role: str, cipher: str, groups: str | None, require_pq: bool, keylog: str | None) -> SSL.Context:
    factory = client_context if role == "client" else server_context
    return factory(suite=cipher, groups=groups, require_pq=require_pq, keylog=keylog)


def tls_context(role: str, cipher: str, options: TLSOptions, *, reconnect: bool = False) -> SSL.Context:
    """A shared context for ``role`` whose PSKs are bound to ``cipher``; one per distinct option set
    (PSKs are bound per connection, so one context serves every connection).  Reconnects always
    use X25519MLKEM768 only."""
    groups = options.groups if isinstance(options.groups, str) else None  # TLSOptions made it one string
    keylog = os.fspath(options.keylog) if options.keylog is not None else None
    if reconnect:
        return _context(role, cipher, PQ_GROUP, True, keylog)
    return _context(role, cipher, groups, options.require_pq, keylog)


def is_async_source(source: object) -> TypeGuard[AsyncKeySource]:
    """Whether ``source`` is an :class:`~hybridkex.qkd.AsyncKeySource` (coroutine methods)."""
    return inspect.iscoroutinefunction(getattr(source, "get_keys", None))


def key_manager(source: KeySourceArg, policy: Policy, *, long_lived: bool = False,
                loop: asyncio.AbstractEventLoop | None = None) -> QKDKeyManager | None:
    """The key manager that answers QKD requests from ``source`` (which may already be one).

    ``long_lived``: one manager for a client's or server's lifetime, which remembers key IDs across
    handshakes and holds epoch keys; otherwise one for a single handshake, which an epoch key budget
    refuses.  An asyncio key source needs ``loop`` (the asyncio API): its coroutines run there.
    """
    if source is None:
        if policy.uses_qkd and not long_lived:
            raise ConfigurationError(f"the policy's QKD mode is {policy.qkd.value!r} but no key source was "
                                     "given", field="key_source")
        return None
    if isinstance(source, QKDKeyManager):
        return source
    if not long_lived and policy.key_budget.mode == "epoch":
        raise ConfigurationError("an epoch key budget keeps keys between handshakes: pass one long-lived "
                                 "QKDKeyManager(key_source, policy.key_budget) (HybridClient and the servers "
                                 "keep one), not a bare key source", field="key_source")
    blocking: KeySource
    if is_async_source(source):
        if loop is None:
            raise ConfigurationError("an asyncio key source (AsyncKeySource) needs the asyncio API "
                                     "(open_connection/start_server); the blocking API takes a KeySource",
                                     field="key_source")
        blocking = BlockingBridge(source, loop)
    elif callable(getattr(source, "get_keys", None)) and callable(getattr(source, "get_keys_by_id", None)):
        blocking = cast("KeySource", source)
    else:
        raise ConfigurationError(f"{type(source).__name__} is not a KeySource", field="key_source")
    return QKDKeyManager(blocking, policy.key_budget)


def check_key_source(config: ClientConfig, key_source: KeySourceArg) -> None:
    """Refuse, before any connection is opened, a full handshake that could only fail for want of
    a key source."""
    policy = config.handshake.policy
    if key_source is None and policy.uses_qkd:
        raise ConfigurationError(f"the policy's QKD mode is {policy.qkd.value!r} but no key source was given "
                                 "(pass key_source=, or use Policy(qkd='disabled'))", field="key_source")


def describe(exc: BaseException) -> str:
    """One log-safe line for a rejected connection (never key material: hybridkex messages hold
    none, and an AuthenticationError's local detail is meant for exactly this log)."""
    text = str(exc) or "no message"
    if isinstance(exc, AuthenticationError) and exc.detail:
        text = f"{text} ({exc.detail})"
    # Name the public class a user can catch, not a private subclass.
    name = next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))
    if not isinstance(exc, HybridKEXError | OSError):
        return f"{name} (internal error): {text}"
    return f"{name}: {text}"


def log_rejection(peer: object, exc: BaseException) -> None:
    """The one log line for a connection refused during setup."""
    level = logging.ERROR if not isinstance(exc, HybridKEXError | OSError) else logging.WARNING
    _log.log(level, "rejected connection from %s: %s", _peer_text(peer), describe(exc),
             exc_info=exc if level == logging.ERROR else None)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)


@dataclass(slots=True)
class FullHandshakeKeys:
    """The TLS PSK of a connection that ran the hybrid handshake, and what happens to the secret."""

    identity: bytes
    psk: bytes
    cipher: str
    ticket: ReconnectTicket | SteadyTicket | None = None
    handle: bytes | None = None
    steady_handle: bytes | None = None
    #: Shared-state writes of the parent still to make (on a worker thread, before TLS answers).
    share: list[Callable[[], None]] = field(default_factory=list)


def report_qkd_fallback(session: Session) -> None:
    """Log, loudly, a session that ran without QKD although the policy prefers it (never silent)."""
    info = session.info
    if not info.qkd_used and info.qkd_policy == "optional":
        logging.getLogger("hybridkex.session").warning(
            "session with %s ran WITHOUT QKD (policy: optional): %s; suite %s",
            info.peer_identity, info.qkd_note, info.suite)


def client_keys(session: Session, config: ClientConfig, manager: QKDKeyManager | None) -> FullHandshakeKeys:
    """Derive the TLS PSK and the ticket for later connections: a steady-state ticket when the
    steady state is on, else a reconnect ticket when reconnects are on; erase the secret otherwise."""
    report_qkd_fallback(session)
    keys = FullHandshakeKeys(session.tls_identity(), session.tls_psk(), session.secret.suite.tls_cipher)
    if config.steady.enabled:
        keys.ticket = SteadyTicket(session.secret, session.info, config.steady, config.handshake.policy, manager)
        session.erase()
    elif config.reconnect.enabled:
        keys.ticket = ReconnectTicket(session.secret, session.info, config.reconnect)
    else:
        session.erase()
    return keys


def server_keys(session: Session, state: ServerState) -> FullHandshakeKeys:
    """Derive the TLS PSK; register the parent for the steady state and reconnects (before TLS
    starts, so a client that finished TLS can go on at once); erase the secret."""
    report_qkd_fallback(session)
    keys = FullHandshakeKeys(session.tls_identity(), session.tls_psk(), session.secret.suite.tls_cipher)
    if state.steady is not None:
        keys.steady_handle = state.steady.register(session.secret, session.info, share=keys.share)
    if state.registry is not None:  # it now owns the secret
        keys.handle = state.registry.register(session.secret, session.info, share=keys.share)
    else:
        session.erase()
    return keys


class ReconnectLookup:
    """The PSK lookup of one server connection on the reconnect path.

    Remembers its match, so an identity offered again in the same handshake (a second ClientHello
    after a HelloRetryRequest) gets the same key instead of counting as a replay.
    """

    __slots__ = ("_cipher", "_registry", "_source", "identity", "match")

    def __init__(self, registry: ReconnectRegistry | None, cipher: str,
                 resolved: tuple[bytes, ReconnectMatch | None] | None = None, *, source: str | None = None) -> None:
        # Resolved before TLS (off the event loop): nothing more is looked up in the callback, so
        # another identity is unknown.
        self._registry = registry if resolved is None else None
        self._cipher = cipher
        self._source = source
        self.match: ReconnectMatch | None = None
        self.identity: bytes | None = None
        if resolved is not None:
            self.identity, self.match = resolved

    def __call__(self, identity: bytes) -> bytes | None:
        if self.match is not None:
            return self.match.psk if identity == self.identity else None
        if self._registry is None:
            return None  # reconnects are off: every identity is unknown (the client gets an alert)
        match = self._registry.lookup(identity, self._cipher, source=self._source)
        if match is not None:
            self.match, self.identity = match, identity
            return match.psk
        return None


def peer_ip(address: object) -> str | None:
    """The IP address of a socket's peer address (``getpeername()``), or None (a Unix socket, unknown)."""
    if isinstance(address, tuple) and address and isinstance(address[0], str) and address[0]:
        return address[0]
    return None


class ServerState:
    """What a server keeps across connections: config, key manager, steady-state and reconnect registries.

    ``loop``: the event loop an asyncio key source's coroutines run on (asyncio servers only);
    ``loop_driven``: the connections are driven by an event loop (default: when ``loop`` is given), so
    the shared state is called from worker threads."""

    def __init__(self, config: ServerConfig, key_source: KeySourceArg, registry: ReconnectRegistry | None = None,
                 *, loop: asyncio.AbstractEventLoop | None = None, loop_driven: bool | None = None) -> None:
        policy = config.handshake.policy
        if policy.uses_qkd and key_source is None:
            raise ConfigurationError(f"the policy's QKD mode is {policy.qkd.value!r} but no key source was given",
                                     field="key_source")
        self.config = config
        self.keys = key_manager(key_source, policy, long_lived=True, loop=loop)
        # An asyncio server (loop) calls the shared state from worker threads, never from its loop.
        off_loop = loop is not None if loop_driven is None else loop_driven
        if config.reconnect.enabled:
            self.registry: ReconnectRegistry | None = (
                registry if registry is not None else ReconnectRegistry(config.reconnect, state=config.state,
                                                                        reads=config.state_reads))
            if off_loop:  # a registry given to an asyncio server too
                self.registry.off_loop = True
        else:
            self.registry = None
        self.steady = (SteadyRegistry(config.steady, policy, self.keys, state=config.state, off_loop=off_loop,
                                      reads=config.state_reads)
                       if config.steady.enabled else None)
        self.purge: PurgeHandle | None = None
        if config.state is not None and config.purge_every:
            from ..state.purger import auto_purge  # noqa: PLC0415 - a given state has imported hybridkex.state

            self.purge = auto_purge(config.state, config.purge_every, config.spent_older_than)

    def close(self) -> None:
        if self.purge is not None:
            self.purge.release()
        if self.registry is not None:
            self.registry.clear()
        if self.steady is not None:
            self.steady.clear()



def check_server_first_bytes(first: bytes) -> None:
    """Check the server's first bytes after the client's last hybrid message.

    The server answers with TLS (a handshake record, 0x16) or, when it rejected the client's
    authentication or key confirmation, with a hybridkex Abort frame.  Without this check the
    Abort would reach OpenSSL and surface as a confusing TLS error instead of the peer's verdict.
    """
    if not first.startswith(MAGIC[:1]):
        return
    if len(first) > HEADER_LEN and first.startswith(MAGIC) and first[3] == FrameType.ABORT:
        raise peer_abort_error(first[HEADER_LEN])
    raise RemoteProtocolError("the peer sent a hybridkex frame where the TLS handshake was expected")
