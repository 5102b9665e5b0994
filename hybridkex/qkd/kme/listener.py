"""The listening side of one simulated KME: admission, TLS and time limits before aiohttp sees a byte.

With aiohttp's own ``web.TCPSite`` the event loop does TLS, so a connection that never sends a
ClientHello is kept for asyncio's 60 s TLS handshake timeout, one that completes TLS and then says
nothing for aiohttp's keep-alive timeout (an hour), and nothing limits how many are open.
:class:`KMESite` serves the same aiohttp application with three limits in front of it:

* at most ``max_connections`` connections, counted from TCP accept (so including those still in
  the TLS handshake) until they close; one more is closed at once, before any TLS work, and the
  refusal is logged (at most once every 10 s, with the count);
* the TLS handshake must finish within ``idle_timeout`` seconds;
* a connection without a complete request (before the first one, or between requests) is closed
  ``idle_timeout`` seconds after it went idle: aiohttp's keep-alive timer, which the runner sets
  (``keepalive_timeout=idle_timeout``); the application bounds reading a request body the same way.

TLS is started on the accepted TCP connection with :meth:`asyncio.loop.start_tls` (public API), and
aiohttp's request handler is attached to the TLS transport as usual, so the caller's certificate is
in ``transport.get_extra_info("peercert")`` as before.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "HTTP_LOG", "KMESite"]

log = logging.getLogger("hybridkex.qkd.kme")

#: Seconds a connection may stay silent (TLS handshake, request headers, between requests).
DEFAULT_IDLE_TIMEOUT = 5.0
#: Connections each KME keeps open at once.
DEFAULT_MAX_CONNECTIONS = 256
_WARN_EVERY = 10.0


class _QuietBadRequests(logging.Filter):
    """aiohttp logs a malformed request as an error with a traceback; for a KME (or its metrics port)
    that is a confused client, not a fault: one debug line instead.  Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        log.debug("malformed HTTP request answered %s: %s", exc.code, exc.message)
        return False


#: The logger the KMEs' aiohttp runners use (``AppRunner(logger=HTTP_LOG)``).
HTTP_LOG = logging.getLogger("hybridkex.qkd.kme.http")
HTTP_LOG.addFilter(_QuietBadRequests())


class _Counted(asyncio.Protocol):
    """aiohttp's handler behind the TLS transport; frees the connection's slot when it closes.

    The TLS layer may pass on data that arrived with the end of the handshake before
    ``connection_made`` is called here, so anything received earlier is replayed then.
    """

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release = release
        self._made = False
        self._early: list[bytes] = []
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        self._inner.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self._inner.data_received(data)
        if self._early_eof:
            self._inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._made:
            self._inner.data_received(data)
        else:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._made:
            return self._inner.eof_received()
        self._early_eof = True
        return None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._made:
            self._inner.connection_lost(exc)


class _Admission(asyncio.Protocol):
    """The protocol of a freshly accepted TCP connection: admit it (then start TLS) or close it."""

    def __init__(self, site: KMESite) -> None:
        self._site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._site.admit(transport)


class KMESite(web.BaseSite):
    """A TCP+TLS site for a KME's aiohttp runner, with a connection cap and an idle timeout.

    Args:
        runner: the application's runner (create it with ``keepalive_timeout=idle_timeout``).
        host, port: where to listen (port 0 picks a free one; :attr:`port` tells which).
        ssl_context: the server's mutual-TLS context.
        idle_timeout: seconds for the TLS handshake, and (via the runner) for an idle connection.
        max_connections: connections open at once, TLS handshakes included.
        label: names this KME in log lines.
        on_refused: called for each connection refused at the cap (the KME's metrics count them).
    """

    __slots__ = ("_host", "_idle", "_label", "_last_warning", "_max", "_on_refused", "_open", "_port", "_refused",
                 "_upgrades", "_web")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context: ssl.SSLContext,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 backlog: int = 512, label: str = "KME", on_refused: Callable[[], None] | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        server = runner.server
        assert server is not None  # BaseSite checked that runner.setup() ran
        self._web: web.Server = server
        self._host, self._port = host, port
        self._idle = idle_timeout
        self._max = max_connections
        self._label = label
        self._on_refused = on_refused
        self._open = 0
        self._refused = 0
        self._last_warning = -_WARN_EVERY
        self._upgrades: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the requested one before :meth:`start`)."""
        if self._server is not None and isinstance(self._server, asyncio.Server) and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def open_connections(self) -> int:
        """Connections admitted and not yet closed (TLS handshakes included)."""
        return self._open

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Admission(self), self._host, self._port,
                                                backlog=self._backlog, reuse_address=True)

    async def stop(self) -> None:
        await super().stop()  # closes the listener
        upgrades = list(self._upgrades)
        for task in upgrades:
            task.cancel()
        await asyncio.gather(*upgrades, return_exceptions=True)

    def admit(self, transport: asyncio.Transport) -> None:
        """Called for each accepted TCP connection."""
        if self._open >= self._max:
            transport.abort()  # before any TLS work: the cap must also hold for silent connections
            self._refused += 1
            if self._on_refused is not None:
                self._on_refused()
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY:
                log.warning("%s: refused %d connection(s): %d open, the limit (max_connections)", self._label,
                            self._refused, self._open)
                self._last_warning, self._refused = now, 0
            return
        self._open += 1
        transport.pause_reading()  # nothing is read before TLS starts
        task = asyncio.get_running_loop().create_task(self._upgrade(transport))
        self._upgrades.add(task)
        task.add_done_callback(self._upgrades.discard)

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        freed = False

        def release() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._open -= 1

        handler = _Counted(self._web(), release)
        assert self._ssl_context is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, handler, self._ssl_context, server_side=True, ssl_handshake_timeout=self._idle)
        except BaseException as exc:  # handshake failed or timed out, or the KME is stopping
            transport.abort()
            release()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.debug("%s: TLS handshake failed: %s", self._label, exc)
            return
        if tls is None:  # the transport closed while TLS was starting
            release()
            return
        try:
            handler.connection_made(tls)
        except Exception:
            log.exception("%s: cannot serve an accepted connection", self._label)
            tls.abort()  # its connection_lost() frees the slot
