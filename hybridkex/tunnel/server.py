"""Server side of the tunnel: accept peers, run the handshake, then forward to the target service.

The target is contacted only after a peer has completed the handshake, so unauthenticated
connections never reach the protected service.
"""

from __future__ import annotations

import asyncio
import time

from .runtime import Connection, TunnelRuntime
from .streams import PlainStream

__all__ = ["TunnelServer"]


class TunnelServer(TunnelRuntime):
    """``hybridkex tunnel server``: secure channel in on ``listen``, plain TCP out to ``target``."""

    role = "server"

    async def serve_connection(self, conn: Connection, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        cfg = conn.config
        factory = self.factory
        assert factory is not None
        started = time.monotonic()
        try:
            async with asyncio.timeout(cfg.timeouts.handshake):
                secure = await factory.accept(reader, writer, peer_addr=conn.peer_addr)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.handshake_failed(conn, exc)
            return
        facts = self.handshake_ok(conn, secure, started)
        try:
            async with asyncio.timeout(cfg.timeouts.connect):
                target_reader, target_writer = await asyncio.open_connection(cfg.target.host, cfg.target.port)
        except asyncio.CancelledError:
            secure.close()
            raise
        except (OSError, TimeoutError) as exc:
            self.target_failed(conn, exc)
            secure.close()
            return
        await self.relay_connection(conn, secure, PlainStream(target_reader, target_writer), facts)
