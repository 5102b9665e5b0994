"""The asyncio server: :func:`start_server` and :class:`HybridAsyncServer` (an :class:`asyncio.Server`
look-alike); each connection's setup is :func:`hybridkex.io.aio.accept`."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..exceptions import ConfigurationError
from ..protocol import ResponderConfig
from ..steady import SteadyRegistry
from ._aiodrive import accept
from ._plumbing import ServerState, log_rejection
from .config import ServerConfig
from .keys import KeySourceArg
from .reconnect import ReconnectRegistry
from .streams import DEFAULT_LIMIT, HybridStreamReader, HybridStreamWriter

__all__ = ["ClientConnected", "HybridAsyncServer", "start_server"]

_log = logging.getLogger("hybridkex.server")


ClientConnected = Callable[[HybridStreamReader, HybridStreamWriter], "Awaitable[None] | None"]


class HybridAsyncServer:
    """What :func:`start_server` returns: an :class:`asyncio.Server` look-alike.

    ``close``, ``wait_closed``, ``serve_forever``, ``start_serving``, ``is_serving``, ``sockets``,
    ``get_loop`` and ``async with`` behave as on asyncio's server; :attr:`reconnect_registry` holds
    the parent sessions reconnects are accepted for.
    """

    def __init__(self, state: ServerState, callback: ClientConnected, limit: int) -> None:
        self._state = state
        self._callback = callback
        self._limit = limit
        self._active = 0
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<HybridAsyncServer sockets={self.sockets!r} active={self._active}>"

    @property
    def _srv(self) -> asyncio.Server:
        if self._server is None:  # pragma: no cover - start_server() sets it before returning
            raise RuntimeError("the server is not started")
        return self._server

    @property
    def config(self) -> ServerConfig:
        return self._state.config

    @property
    def reconnect_registry(self) -> ReconnectRegistry | None:
        return self._state.registry

    @property
    def steady_registry(self) -> SteadyRegistry | None:
        """The parent sessions this server accepts steady-state connections for (None when off)."""
        return self._state.steady

    @property
    def active_connections(self) -> int:
        """Connections in setup or in the callback right now."""
        return self._active

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._srv.sockets) if self._server is not None else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._srv.get_loop()

    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start_serving(self) -> None:
        await self._srv.start_serving()

    async def serve_forever(self) -> None:
        await self._srv.serve_forever()

    def close(self) -> None:
        """Stop listening and erase the reconnect registry (open connections go on)."""
        self._srv.close()
        self._state.close()

    async def wait_closed(self) -> None:
        await self._srv.wait_closed()

    async def __aenter__(self) -> HybridAsyncServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._active >= self._state.config.max_connections:
            _log.warning("rejected connection from %s: %d connections are already being served", peer,
                         self._state.config.max_connections)
            writer.close()
            return
        self._active += 1
        try:
            try:
                hreader, hwriter = await accept(reader, writer, self._state, self._limit)
            except Exception as exc:
                log_rejection(peer, exc)
                writer.close()
                return
            except BaseException:  # cancelled (the loop is shutting down): do not leak the transport
                writer.close()
                raise
            try:
                result = self._callback(hreader, hwriter)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                _log.error("client_connected_cb failed for %s", peer, exc_info=True)
                hwriter.close()
            except BaseException:
                hwriter.close()
                raise
        finally:
            self._active -= 1


async def start_server(client_connected_cb: ClientConnected, host: str | Sequence[str] | None = None,
                       port: int | None = None, config: ServerConfig | ResponderConfig | None = None, *,
                       key_source: KeySourceArg = None, limit: int = DEFAULT_LIMIT,
                       reconnect_registry: ReconnectRegistry | None = None, **kwargs: Any) -> HybridAsyncServer:
    """Start a hybridkex server; ``client_connected_cb(reader, writer)`` runs per verified connection.

    Like :func:`asyncio.start_server` (extra ``kwargs`` go to it: ``backlog``, ``reuse_port``,
    ``start_serving``, ...).  Each connection's setup runs in its own task under
    ``config.timeout``; a peer that fails it is logged on ``hybridkex.server`` with its typed error
    and closed, and the server keeps serving.  At most ``config.max_connections`` connections are
    handled at once.  ``key_source`` may be blocking or asyncio; one key manager serves every
    connection.
    """
    if config is None:
        raise ConfigurationError("a ServerConfig is required", field="config")
    cfg = ServerConfig.coerce(config)
    state = ServerState(cfg, key_source, reconnect_registry, loop=asyncio.get_running_loop())
    server = HybridAsyncServer(state, client_connected_cb, limit)
    server._server = await asyncio.start_server(server._on_connect, host, port, limit=limit, **kwargs)
    return server
