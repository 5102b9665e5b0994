"""The asyncio API: :func:`open_connection`, :func:`start_server`, and the asyncio driver of the
setup machines (:mod:`hybridkex.io.setup`).

Shaped like :func:`asyncio.open_connection` / :func:`asyncio.start_server`: a connection is a
(:class:`HybridStreamReader`, :class:`HybridStreamWriter`) pair with the methods of asyncio's
``StreamReader``/``StreamWriter``; ``writer.get_extra_info("hybridkex_session")`` is the
:class:`~hybridkex.io.session.HybridSession`.

:func:`drive` is the one loop where the machines' events become asyncio I/O: reads and writes
under the stage's deadline, blocking work (QKD requests, ``after_handshake`` hooks) on a worker
thread of :mod:`hybridkex.workers`.  An asyncio key source (:class:`~hybridkex.qkd.AsyncKeySource`)
is bridged so that its coroutines run on this event loop.  :func:`run_initiator` /
:func:`run_responder` run the hybrid handshake alone (no TLS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..exceptions import ConfigurationError, HandshakeTimeout
from ..protocol import Initiator, InitiatorConfig, Responder, ResponderConfig, Session
from ..steady import SteadyTicket
from ._aiodrive import accept, bridged, drive, established_streams
from ._events import HandshakeDone
from ._hybrid import HybridStage
from ._plumbing import Deadline, ServerState, is_async_source, key_manager
from .aioserver import ClientConnected, HybridAsyncServer, start_server
from .config import ClientConfig, ServerConfig
from .keys import KeySourceArg, QKDKeyManager
from .reconnect import ReconnectRegistry, ReconnectTicket
from .setup import ClientSetup
from .streams import DEFAULT_LIMIT, HybridStreamReader, HybridStreamWriter

__all__ = [
    "DEFAULT_LIMIT",
    "ClientConnected",
    "HybridAsyncServer",
    "HybridStreamReader",
    "HybridStreamWriter",
    "ServerSide",
    "accept",
    "accept_on_streams",
    "connect_on_streams",
    "drive",
    "open_connection",
    "run_initiator",
    "run_responder",
    "start_server",
]

_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# ---------------------------------------------------------------------------------------------
# The hybrid handshake alone
# ---------------------------------------------------------------------------------------------


async def _run_hybrid(conn: Initiator | Responder, streams: _Streams, config: InitiatorConfig | ResponderConfig,
                      keys: QKDKeyManager | None, timeout: float | None, *, initial: bytes = b"") -> Session:
    stage = HybridStage(conn, config, keys,
                        Deadline(timeout or config.policy.timeouts.handshake).stage("the hybrid handshake"),
                        exact=True)
    if initial:
        stage.receive_data(initial)
    done = await drive(stage, *streams)
    assert isinstance(done, HandshakeDone)
    return done.session


async def run_initiator(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: InitiatorConfig,
                        key_source: KeySourceArg = None, *, timeout: float | None = None,
                        randbytes: Callable[[int], bytes] | None = None,
                        clock: Callable[[], float] | None = None) -> Session:
    """Run the initiator side of the hybrid handshake (no TLS) over an asyncio stream pair.

    ``key_source``: a :class:`~hybridkex.io.QKDKeyManager`, a :class:`~hybridkex.qkd.KeySource` or an
    :class:`~hybridkex.qkd.AsyncKeySource`; None only when the policy disables QKD.  ``timeout``
    defaults to ``config.policy.timeouts.handshake``; each key-source call is bounded by
    ``config.policy.timeouts.kme``.  On failure the peer is sent an Abort where possible and a
    :class:`~hybridkex.HybridKEXError` is raised; the caller closes the stream.  On success the
    stream is positioned right after the handshake.
    """
    keys = key_manager(bridged(key_source), config.policy)
    conn = Initiator(config, randbytes=randbytes, clock=clock)
    return await _run_hybrid(conn, (reader, writer), config, keys, timeout)


async def run_responder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: ResponderConfig,
                        key_source: KeySourceArg = None, *, timeout: float | None = None, initial: bytes = b"",
                        randbytes: Callable[[int], bytes] | None = None,
                        clock: Callable[[], float] | None = None) -> Session:
    """Run the responder side over an asyncio stream pair; ``initial`` holds bytes already read
    from the stream (e.g. the first byte a server looked at).  Otherwise as :func:`run_initiator`."""
    keys = key_manager(bridged(key_source), config.policy)
    conn = Responder(config, randbytes=randbytes, clock=clock)
    return await _run_hybrid(conn, (reader, writer), config, keys, timeout, initial=initial)


# ---------------------------------------------------------------------------------------------
# Connection setup
# ---------------------------------------------------------------------------------------------


async def open_connection(host: str | None = None, port: int | None = None,
                          config: ClientConfig | InitiatorConfig | None = None, *, key_source: KeySourceArg = None,
                          timeout: float | None = None, ticket: ReconnectTicket | SteadyTicket | None = None,
                          limit: int = DEFAULT_LIMIT, **kwargs: Any) -> tuple[HybridStreamReader, HybridStreamWriter]:
    """Open a hybridkex connection; returns ``(reader, writer)`` once TLS is verified.

    Args:
        host, port: as for :func:`asyncio.open_connection` (extra ``kwargs`` go to it, e.g.
            ``local_addr``, ``family``).
        config: a :class:`ClientConfig` (or a bare :class:`~hybridkex.protocol.InitiatorConfig`).
        key_source: :class:`~hybridkex.qkd.KeySource`, :class:`~hybridkex.qkd.AsyncKeySource` or
            :class:`~hybridkex.io.QKDKeyManager`; None only when the policy disables QKD.
        timeout: deadline in seconds for the whole setup (default ``config.timeout``).
        ticket: a :class:`ReconnectTicket`: while usable, the connection goes straight to TLS.
        limit: the reader's buffer limit (``readline``), as in asyncio.

    Raises:
        HybridKEXError: the typed reason (authentication, policy, QKD, TLS, protocol, timeout);
            ``OSError`` if TCP cannot connect.
    """
    if config is None:
        raise ConfigurationError("a ClientConfig is required", field="config")
    setup = ClientSetup(config, bridged(key_source), ticket=ticket, timeout=timeout)
    try:
        async with asyncio.timeout(setup.connect_timeout()):
            reader, writer = await asyncio.open_connection(host, port, limit=limit, **kwargs)
    except TimeoutError as exc:
        raise HandshakeTimeout(f"TCP connect to {host}:{port} timed out") from exc
    try:
        return established_streams(await drive(setup, reader, writer), (reader, writer), limit)
    except BaseException:
        writer.close()
        raise


async def connect_on_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             config: ClientConfig | InitiatorConfig, *, key_source: KeySourceArg = None,
                             timeout: float | None = None, ticket: ReconnectTicket | SteadyTicket | None = None,
                             limit: int = DEFAULT_LIMIT) -> tuple[HybridStreamReader, HybridStreamWriter]:
    """Run the client side of a hybridkex connection over an already connected ``(reader, writer)``.

    Like :func:`open_connection` without the TCP connect.  Raises the typed error on failure; the
    caller closes ``writer``.
    """
    setup = ClientSetup(config, bridged(key_source), ticket=ticket, timeout=timeout)
    return established_streams(await drive(setup, reader, writer), (reader, writer), limit)


class ServerSide:
    """Server-side state shared by every connection handed to :func:`accept_on_streams`.

    Holds the configuration, one QKD key manager (so a pool and epoch keys serve all connections)
    and the reconnect registry.  Build it once inside the event loop; :meth:`close` erases it.
    """

    def __init__(self, config: ServerConfig | ResponderConfig, *, key_source: KeySourceArg = None,
                 reconnect_registry: ReconnectRegistry | None = None) -> None:
        loop = asyncio.get_running_loop() if is_async_source(key_source) else None  # may be built in a thread
        # Always driven by an event loop (accept_on_streams): the shared state is called off it.
        self._state = ServerState(ServerConfig.coerce(config), key_source, reconnect_registry, loop=loop,
                                  loop_driven=True)

    @property
    def config(self) -> ServerConfig:
        return self._state.config

    @property
    def state(self) -> ServerState:
        """What every connection's setup shares."""
        return self._state

    def close(self) -> None:
        self._state.close()


async def accept_on_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: ServerSide, *,
                            limit: int = DEFAULT_LIMIT) -> tuple[HybridStreamReader, HybridStreamWriter]:
    """Run the server side of a hybridkex connection over an accepted ``(reader, writer)`` pair.

    The same setup as :func:`start_server` runs per connection (hybrid handshake or reconnect, then
    TLS), under ``config.timeout``.  Raises the typed error on failure; the caller closes ``writer``.
    """
    return await accept(reader, writer, server.state, limit)
