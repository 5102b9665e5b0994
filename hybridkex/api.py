"""The top-level entry points of hybridkex: connect and serve, blocking and asyncio.

Everything here is re-exported by :mod:`hybridkex` (lazily, so ``import hybridkex`` stays free of
pyOpenSSL and cryptography's TLS bindings).  See docs/api.md.

Blocking::

    sock = hybridkex.connect(("server.example", 8443), client_config, key_source=kme)
    sock.sendall(b"hello"); sock.recv(1024); sock.session.summary()

    hybridkex.serve(("0.0.0.0", 8443), server_config, handler, key_source=kme)  # handler(conn, addr)

socketserver / http.server: :class:`HybridTCPServer`, :class:`HybridHTTPServer`;
http.client: :class:`HybridHTTPConnection`.

asyncio::

    reader, writer = await hybridkex.open_connection(host, port, client_config, key_source=kme)
    server = await hybridkex.start_server(client_connected_cb, host, port, server_config, key_source=kme)
"""

from __future__ import annotations

from .io.aio import HybridAsyncServer, HybridStreamReader, HybridStreamWriter, open_connection, start_server
from .io.client import HybridClient
from .io.config import ClientConfig, ReconnectPolicy, ServerConfig, StateReads, SteadyPolicy, TLSOptions
from .io.connection import HybridSocket, connect
from .io.http import HybridHTTPConnection, HybridHTTPServer
from .io.reconnect import ReconnectRegistry, ReconnectTicket
from .io.server import HybridServer, HybridTCPServer, serve
from .io.session import HybridSession

# The policy types every ClientConfig/ServerConfig needs, so one import line builds a configuration
# (docs/api.md says every name it documents is importable from here).
from .policy import Policy, QKDConfig
from .steady import SteadyRegistry, SteadyTicket

__all__ = [
    "ClientConfig",
    "HybridAsyncServer",
    "HybridClient",
    "HybridHTTPConnection",
    "HybridHTTPServer",
    "HybridServer",
    "HybridSession",
    "HybridSocket",
    "HybridStreamReader",
    "HybridStreamWriter",
    "HybridTCPServer",
    "Policy",
    "QKDConfig",
    "ReconnectPolicy",
    "ReconnectRegistry",
    "ReconnectTicket",
    "ServerConfig",
    "StateReads",
    "SteadyPolicy",
    "SteadyRegistry",
    "SteadyTicket",
    "TLSOptions",
    "connect",
    "open_connection",
    "serve",
    "start_server",
]
