"""HTTP over hybridkex with the standard library: :class:`HybridHTTPServer` for ``http.server``
handlers and :class:`HybridHTTPConnection` for ``http.client``."""

from __future__ import annotations

import http.client
import http.server
import re

from ..exceptions import ConfigurationError
from ..protocol import InitiatorConfig
from .client import HybridClient
from .config import ClientConfig
from .connection import HybridSocket, connect
from .keys import KeySourceArg
from .server import HybridTCPServer

__all__ = ["HybridHTTPConnection", "HybridHTTPServer"]


class HybridHTTPServer(HybridTCPServer, http.server.HTTPServer):
    """``http.server.ThreadingHTTPServer`` over hybridkex: ``BaseHTTPRequestHandler`` and
    ``SimpleHTTPRequestHandler`` subclasses work unchanged::

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="site")
        with HybridHTTPServer(("127.0.0.1", 8443), handler, server_config, key_source=src) as httpd:
            httpd.serve_forever()

    Each request's ``self.request`` / ``self.connection`` is a
    :class:`~hybridkex.io.connection.HybridSocket` (``self.connection.session`` says who the peer is).
    """


class HybridHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` over hybridkex.

    Args:
        host, port: the server (a port is required: hybridkex has no well-known port).
        config: a :class:`ClientConfig` (or InitiatorConfig); or pass ``client=`` instead.
        key_source: for ``config`` (see :func:`hybridkex.connect`).
        client: a :class:`~hybridkex.io.client.HybridClient`, to reuse its reconnect tickets.
        timeout: connection setup deadline, then the socket timeout for reads and writes (None:
            the config's setup deadline, then blocking).
    """

    def __init__(self, host: str, port: int | None = None, *, config: ClientConfig | InitiatorConfig | None = None,
                 key_source: KeySourceArg = None, client: HybridClient | None = None, timeout: float | None = None,
                 source_address: tuple[str, int] | None = None, blocksize: int = 8192) -> None:
        super().__init__(host, port, timeout, source_address, blocksize)
        if (config is None) == (client is None):
            raise ConfigurationError("give either config= or client=", field="config")
        if port is None and not re.search(r":\d+$", host):
            raise ConfigurationError("a port is required (hybridkex has no well-known port)", field="port")
        self._hybrid_config = config
        self._hybrid_keys = key_source
        self._hybrid_client = client
        self.sock: HybridSocket | None = None

    def connect(self) -> None:
        """Open the hybridkex connection (hybrid handshake or reconnect, then TLS)."""
        if self._tunnel_host:  # type: ignore[attr-defined]
            raise ConfigurationError("HTTP CONNECT tunnels are not supported over hybridkex", field="tunnel")
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        address = (self.host, self.port)
        if self._hybrid_client is not None:
            self.sock = self._hybrid_client.connect(address, timeout=timeout)
        else:
            assert self._hybrid_config is not None
            self.sock = connect(address, self._hybrid_config, key_source=self._hybrid_keys, timeout=timeout,
                                source_address=getattr(self, "source_address", None))
        if timeout is not None:
            self.sock.settimeout(timeout)  # as http.client does: the timeout also bounds each read
