"""Client side of the tunnel: accept local plaintext connections and carry them to the tunnel server.

Each local connection gets its own TCP connection and handshake to the tunnel server at
``target``; if either fails, the local connection is closed without data.
"""

from __future__ import annotations

import asyncio
import time

from .channel import PlainStream
from .runtime import Connection, TunnelRuntime

__all__ = ["TunnelClient"]


class TunnelClient(TunnelRuntime):
    """``hybridkex tunnel client``: plain TCP in on ``listen``, secure channel out to ``target``."""

    role = "client"

    async def serve_connection(self, conn: Connection, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        cfg = conn.config
        factory = self.factory
        assert factory is not None
        started = time.monotonic()
        try:
            async with asyncio.timeout(cfg.timeouts.connect):
                up_reader, up_writer = await asyncio.open_connection(cfg.target.host, cfg.target.port)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError) as exc:
            self.metrics.handshakes.inc(outcome="target_unreachable")
            self.target_failed(conn, exc)
            return
        try:
            async with asyncio.timeout(cfg.timeouts.handshake):
                secure = await factory.connect(up_reader, up_writer)
        except asyncio.CancelledError:
            up_writer.close()
            raise
        except Exception as exc:
            up_writer.close()
            self.handshake_failed(conn, exc)
            return
        facts = self.handshake_ok(conn, secure, started)
        await self.relay_connection(conn, PlainStream(reader, writer), secure, facts)
