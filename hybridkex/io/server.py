"""Blocking servers: :class:`HybridTCPServer` (socketserver-compatible), :class:`HybridServer` and
:func:`serve`.

Each accepted connection gets its own thread, in which the hybrid handshake and TLS run under the
connection setup deadline, so a slow or silent peer only ever holds its own thread (and a slot
of ``max_connections``).  A peer that fails setup (garbage, wrong key, timeout, policy) is logged
on the ``hybridkex.server`` logger with its typed error, its connection is closed, and the server
keeps serving.  Handlers receive a :class:`~hybridkex.io.connection.HybridSocket`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..exceptions import ConfigurationError, HybridKEXError
from ..protocol import ResponderConfig
from ..steady import SteadyRegistry
from ._plumbing import ServerState, describe, log_rejection
from .config import ServerConfig
from .connection import HybridSocket, accept
from .keys import KeySourceArg
from .reconnect import ReconnectRegistry

__all__ = ["Handler", "HybridServer", "HybridTCPServer", "serve"]

_log = logging.getLogger("hybridkex.server")

#: ``handler(connection, client_address)``; the connection is closed (close_notify) when it returns.
Handler = Callable[[HybridSocket, Any], object]


class HybridTCPServer(socketserver.ThreadingTCPServer):
    """A :class:`socketserver.ThreadingTCPServer` whose requests are hybridkex connections.

    Existing handlers work unchanged: ``BaseRequestHandler`` subclasses get a
    :class:`HybridSocket` as ``self.request`` (``recv``/``sendall``), ``StreamRequestHandler`` and
    ``http.server`` handlers get working ``rfile``/``wfile`` (see also
    :class:`hybridkex.io.http.HybridHTTPServer`).  Setup runs in the request's own thread, so
    ``get_request`` never blocks on a peer.

    Args:
        server_address, RequestHandlerClass, bind_and_activate: as for ``socketserver.TCPServer``.
        config: a :class:`ServerConfig` (or a bare :class:`~hybridkex.protocol.ResponderConfig`).
        key_source: the server SAE's :class:`~hybridkex.qkd.KeySource` (or a
            :class:`~hybridkex.io.QKDKeyManager`); one key manager serves every connection.
        reconnect_registry: share one registry between servers (default: one per server).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, server_address: Any, RequestHandlerClass: Callable[..., Any],
                 config: ServerConfig | ResponderConfig | None = None, *, key_source: KeySourceArg = None,
                 bind_and_activate: bool = True, reconnect_registry: ReconnectRegistry | None = None) -> None:
        if config is None:
            raise ConfigurationError("a hybridkex server needs a ServerConfig", field="config")
        cfg = ServerConfig.coerce(config)
        self.hybrid = ServerState(cfg, key_source, reconnect_registry)  # refuses an asyncio key source
        self._slots = threading.BoundedSemaphore(cfg.max_connections)
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)

    @property
    def config(self) -> ServerConfig:
        return self.hybrid.config

    @property
    def reconnect_registry(self) -> ReconnectRegistry | None:
        """The parent sessions this server accepts reconnects for (None when reconnects are off)."""
        return self.hybrid.registry

    @property
    def steady_registry(self) -> SteadyRegistry | None:
        """The parent sessions this server accepts steady-state connections for (None when off)."""
        return self.hybrid.steady

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            _log.warning("rejected connection from %s: %d connections are already being served",
                         client_address, self.config.max_connections)
            self.close_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Set up the hybrid connection, run the handler on it, close it.  Runs in its own thread."""
        try:
            try:
                conn = accept(request, self.hybrid)
            except Exception as exc:
                log_rejection(client_address, exc)
                self.close_request(request)
                return
            try:
                self.finish_request(conn, client_address)  # type: ignore[arg-type]
            except Exception:
                self.handle_error(conn, client_address)
            finally:
                self.shutdown_request(conn)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        """close_notify and a TCP half-close, then close (socketserver calls ``shutdown(SHUT_WR)``,
        which on a HybridSocket does exactly that; errors of a vanished peer are ignored)."""
        if isinstance(request, HybridSocket):
            with contextlib.suppress(OSError, HybridKEXError):
                request.shutdown(socket.SHUT_WR)
        else:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_WR)
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler's exception (one line for hybridkex's typed errors, with a traceback for
        anything else) instead of printing to stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, HybridKEXError | ConnectionError | TimeoutError):
            _log.warning("connection from %s ended with %s", client_address, describe(exc))
        else:
            _log.error("handler failed for %s", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self.hybrid.close()


class _CallableHandler(socketserver.BaseRequestHandler):
    """Adapts ``handler(conn, address)`` to socketserver's handler classes."""

    server: HybridServer

    def handle(self) -> None:
        self.server.handler(self.request, self.client_address)


class HybridServer(HybridTCPServer):
    """A threaded hybridkex server that calls ``handler(connection, client_address)`` per connection.

    Use as a context manager; :meth:`serve_forever` blocks (stop it with :meth:`shutdown` from
    another thread), :meth:`start` serves from a background thread instead::

        with hybridkex.HybridServer(("127.0.0.1", 8443), config, echo, key_source=src).start() as srv:
            ...                 # srv.server_address, srv.reconnect_registry
    """

    def __init__(self, server_address: Any, config: ServerConfig | ResponderConfig, handler: Handler, *,
                 key_source: KeySourceArg = None, reconnect_registry: ReconnectRegistry | None = None,
                 bind_and_activate: bool = True) -> None:
        if not callable(handler):
            raise ConfigurationError("must be callable as handler(connection, client_address)", field="handler")
        self.handler = handler
        self._thread: threading.Thread | None = None
        super().__init__(server_address, _CallableHandler, config, key_source=key_source,
                         bind_and_activate=bind_and_activate, reconnect_registry=reconnect_registry)

    def start(self, poll_interval: float = 0.5) -> HybridServer:
        """Serve from a daemon thread; :meth:`close` (or leaving the ``with`` block) stops it."""
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        self._thread = threading.Thread(target=self.serve_forever, args=(poll_interval,),
                                        name=f"hybridkex-server-{self.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (if started), close the listening socket, wait for running handlers to
        return, and erase the reconnect registry."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __exit__(self, *args: object) -> None:
        self.close()


def serve(address: Any, config: ServerConfig | ResponderConfig, handler: Handler, *, key_source: KeySourceArg = None,
          poll_interval: float = 0.5) -> None:
    """Serve hybridkex connections on ``address`` until interrupted (blocks).

    ``handler(connection, client_address)`` runs in a thread per connection; the connection is
    closed with close_notify when it returns.  Failed setups are logged on ``hybridkex.server``.
    """
    with HybridServer(address, config, handler, key_source=key_source) as server:
        try:
            server.serve_forever(poll_interval)
        except KeyboardInterrupt:
            _log.info("interrupted; shutting down")
