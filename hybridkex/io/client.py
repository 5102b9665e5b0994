"""A client that keeps what connections to a server have in common: :class:`HybridClient`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ..exceptions import AlreadyFinalized, ConfigurationError, PSKRejected, QKDKeyUnknownError
from ..protocol import InitiatorConfig
from ..steady import SteadyTicket
from ._bridge import BlockingBridge
from ._plumbing import is_async_source, key_manager
from .aio import DEFAULT_LIMIT, HybridStreamReader, HybridStreamWriter, open_connection
from .config import ClientConfig
from .connection import HybridSocket, connect
from .keys import KeySourceArg, QKDKeyManager
from .reconnect import ReconnectTicket

Ticket = ReconnectTicket | SteadyTicket

__all__ = ["HybridClient"]

_log = logging.getLogger("hybridkex.client")


class HybridClient:
    """Opens hybridkex connections with one configuration, one key manager and one ticket per server
    address, used automatically: a :class:`~hybridkex.steady.SteadyTicket` (the steady state, on by
    default) or, with the steady state off and reconnects on, a :class:`ReconnectTicket`.

    The first connection to an address runs the full hybrid handshake; later ones are one TLS 1.3
    handshake each while the ticket lasts: in the steady state with a fresh QKD key per connection,
    reserved and announced ahead by this client (``config.steady``).  If the server refuses (it
    restarted, forgot the session, or has the steady state off), the ticket is dropped and the
    connection is retried once with a full handshake; a server that refuses a new ticket's first
    connection is not offered the steady state again for :attr:`STEADY_RETRY_AFTER` seconds.  A
    full handshake that fails because a KME did not know its QKD key
    (:class:`~hybridkex.exceptions.QKDKeyUnknownError`: the KME restarted and the master's pooled
    keys were stale; the master drops them) is retried once, transparently, with a new handshake
    and so a new key.  Thread-safe; usable from blocking code (:meth:`connect`)
    and asyncio (:meth:`open_connection`).

    Args:
        config: a :class:`ClientConfig` (or a bare InitiatorConfig).
        key_source: :class:`~hybridkex.qkd.KeySource` or :class:`~hybridkex.io.QKDKeyManager`
            (an :class:`~hybridkex.qkd.AsyncKeySource` works with :meth:`open_connection` only);
            one long-lived key manager is kept, so epoch key budgets work.
    """

    def __init__(self, config: ClientConfig | InitiatorConfig, *, key_source: KeySourceArg = None) -> None:
        self.config = ClientConfig.coerce(config)
        self._async_source = key_source if is_async_source(key_source) else None
        self._keys: QKDKeyManager | None = (
            None if self._async_source else key_manager(key_source, self.config.handshake.policy, long_lived=True))
        self._bridge_loop: asyncio.AbstractEventLoop | None = None
        self._tickets: dict[tuple[str, int], Ticket] = {}
        self._no_steady: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()
        #: Connections made with a full hybrid handshake / a reconnect / in the steady state.
        self.full_handshakes = 0
        self.reconnects = 0
        self.steady_connections = 0
        #: Full handshakes that failed on a stale QKD key and were retried.
        self.stale_key_retries = 0

    def __repr__(self) -> str:
        return (f"<HybridClient {self.config.handshake.identity!r} full={self.full_handshakes} "
                f"steady={self.steady_connections} reconnects={self.reconnects} tickets={len(self._tickets)}>")

    #: Seconds a server that refused the steady state is not offered it again.
    STEADY_RETRY_AFTER = 600.0

    def _ticket(self, key: tuple[str, int]) -> Ticket | None:
        with self._lock:
            ticket = self._tickets.get(key)
            if ticket is not None and not ticket.usable:
                del self._tickets[key]
                ticket = None
            return ticket

    def _store(self, key: tuple[str, int], ticket: Ticket | None) -> None:
        if ticket is None:
            return
        with self._lock:
            if isinstance(ticket, SteadyTicket) and self._no_steady.get(key, 0.0) > time.monotonic():
                ticket.erase()
                return
            old = self._tickets.get(key)
            if isinstance(ticket, SteadyTicket) and isinstance(old, SteadyTicket) and old.usable:
                # Concurrent full handshakes to one server each make a ticket: keep the one in use
                # (other connections may hold attempts from it) and drop the newcomer, unused.
                ticket.erase()
                return
            self._tickets[key] = ticket
        if old is not None and old is not ticket:
            old.erase()
        if isinstance(ticket, SteadyTicket):
            ticket.refill()  # reserve this server's next QKD keys now, off any connection's path

    def _drop(self, key: tuple[str, int], ticket: Ticket, exc: Exception) -> None:
        _log.info("%s to %s:%s refused (%s); running a full handshake",
                  "steady-state connection" if isinstance(ticket, SteadyTicket) else "reconnect", *key, exc)
        with self._lock:
            if self._tickets.get(key) is ticket:
                del self._tickets[key]
            # A server that refused a new ticket's first connection has the steady state off (a
            # ticket dropped by another connection meanwhile says nothing about the server).
            if isinstance(ticket, SteadyTicket) and ticket.connections == 0 and not isinstance(
                    exc.__cause__, AlreadyFinalized):
                self._no_steady[key] = time.monotonic() + self.STEADY_RETRY_AFTER
        ticket.erase()

    def ticket_for(self, host: str, port: int) -> Ticket | None:
        """The usable ticket kept for ``(host, port)``, if any."""
        return self._ticket((host, port))

    def forget(self, host: str | None = None, port: int | None = None) -> None:
        """Erase the ticket of one address, or of every address when called without arguments."""
        with self._lock:
            if host is None:
                tickets, self._tickets = list(self._tickets.values()), {}
            else:
                t = self._tickets.pop((host, port or 0), None)
                tickets = [t] if t is not None else []
        for t in tickets:
            t.erase()

    close = forget

    def connect(self, address: tuple[str, int], *, timeout: float | None = None) -> HybridSocket:
        """A blocking connection to ``address`` (see :func:`hybridkex.connect`)."""
        if self._async_source is not None:
            raise ConfigurationError("an asyncio key source needs open_connection()", field="key_source")
        key = (address[0], address[1])
        ticket = self._ticket(key)
        if ticket is not None:
            try:
                sock = connect(address, self.config, key_source=self._keys, timeout=timeout, ticket=ticket)
            except PSKRejected as exc:
                self._drop(key, ticket, exc)
            else:
                self._done(key, sock.session.reconnect or sock.session.steady is not None, sock.reconnect_ticket,
                           steady=sock.session.steady is not None)
                return sock
        try:
            sock = connect(address, self.config, key_source=self._keys, timeout=timeout)
        except QKDKeyUnknownError as exc:
            self._stale(key, exc)
            sock = connect(address, self.config, key_source=self._keys, timeout=timeout)
        self._done(key, False, sock.reconnect_ticket)
        return sock

    def _stale(self, key: tuple[str, int], exc: QKDKeyUnknownError) -> None:
        # Only this failure is retried: the key was never usable, the master has dropped its stale
        # keys, and the new handshake takes a new key (no key is ever used twice).
        with self._lock:
            self.stale_key_retries += 1
        _log.info("handshake with %s:%s failed on a stale QKD key (%s); retrying once with a new handshake",
                  *key, exc)

    def _done(self, key: tuple[str, int], reconnect: bool, ticket: Ticket | None, *, steady: bool = False) -> None:
        with self._lock:
            if steady:
                self.steady_connections += 1
            elif reconnect:
                self.reconnects += 1
            else:
                self.full_handshakes += 1
        self._store(key, ticket)

    def _async_keys(self) -> QKDKeyManager | None:
        if self._async_source is None:
            return self._keys
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._keys is None:
                self._keys = QKDKeyManager(BlockingBridge(self._async_source, loop),
                                           self.config.handshake.policy.key_budget)
                self._bridge_loop = loop
            elif self._bridge_loop is not loop:
                raise RuntimeError("this HybridClient's asyncio key source is bound to another event loop")
            return self._keys

    async def open_connection(self, host: str, port: int, *, timeout: float | None = None,
                              limit: int = DEFAULT_LIMIT,
                              **kwargs: Any) -> tuple[HybridStreamReader, HybridStreamWriter]:
        """An asyncio connection to ``(host, port)`` (see :func:`hybridkex.open_connection`)."""
        keys = self._async_keys()
        key = (host, port)
        ticket = self._ticket(key)
        if ticket is not None:
            try:
                reader, writer = await open_connection(host, port, self.config, key_source=keys, timeout=timeout,
                                                       ticket=ticket, limit=limit, **kwargs)
            except PSKRejected as exc:
                self._drop(key, ticket, exc)
            else:
                self._done(key, writer.session.reconnect or writer.session.steady is not None,
                           writer.reconnect_ticket, steady=writer.session.steady is not None)
                return reader, writer
        try:
            reader, writer = await open_connection(host, port, self.config, key_source=keys, timeout=timeout,
                                                   limit=limit, **kwargs)
        except QKDKeyUnknownError as exc:
            self._stale(key, exc)
            reader, writer = await open_connection(host, port, self.config, key_source=keys, timeout=timeout,
                                                   limit=limit, **kwargs)
        self._done(key, False, writer.reconnect_ticket)
        return reader, writer
