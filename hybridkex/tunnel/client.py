"""Client side of the tunnel: accept local plaintext connections and carry them to the tunnel server.

Each local connection gets its own TCP connection and handshake to the tunnel server at
``target``; if either fails, the local connection is closed without data (a handshake that failed
on a stale QKD key is retried once first).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..exceptions import QKDKeyUnknownError, SteadyStateRefused
from .runtime import Connection, TunnelRuntime, handshake_outcome
from .streams import PlainStream, SecureStream

__all__ = ["TunnelClient"]


class TunnelClient(TunnelRuntime):
    """``hybridkex tunnel client``: plain TCP in on ``listen``, secure channel out to ``target``."""

    role = "client"

    async def serve_connection(self, conn: Connection, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        secure = await self._secure_channel(conn, retry_stale_key=True)
        if secure is None:
            return
        facts = self.handshake_ok(conn, secure, started)
        await self.relay_connection(conn, PlainStream(reader, writer), secure, facts)

    async def _secure_channel(self, conn: Connection, *, retry_stale_key: bool,
                              retry_steady: bool = True) -> SecureStream | None:
        """A new TCP connection and handshake to the tunnel server; None (logged) if either fails.

        A handshake that fails because a KME did not know its QKD key (the KME restarted; the
        server, which is master, has dropped its stale keys) is retried once on a new connection,
        with a new handshake and so a new key; so is a refused steady-state connection (the server
        restarted, or a KME restart lost the announced keys), once more, with a full handshake.
        The local connection never notices.
        """
        cfg = conn.config
        factory = self.factory
        assert factory is not None
        try:
            async with asyncio.timeout(cfg.timeouts.connect):
                up_reader, up_writer = await asyncio.open_connection(cfg.target.host, cfg.target.port)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError) as exc:
            self.metrics.count_handshake("target_unreachable")
            self.target_failed(conn, exc)
            return None
        try:
            async with asyncio.timeout(cfg.timeouts.handshake):
                return await factory.connect(up_reader, up_writer)
        except asyncio.CancelledError:
            up_writer.close()
            raise
        except SteadyStateRefused as exc:
            up_writer.close()
            if not retry_steady:  # pragma: no cover - a full handshake never raises it
                self.handshake_failed(conn, exc)
                return None
            self.metrics.count_handshake("steady_refused")
            conn.log.log(logging.INFO, "handshake_retried", "steady-state connection refused; retrying once with a "
                         "full handshake", reason=str(exc))
            return await self._secure_channel(conn, retry_stale_key=retry_stale_key, retry_steady=False)
        except QKDKeyUnknownError as exc:
            up_writer.close()
            if not retry_stale_key:
                self.handshake_failed(conn, exc)
                return None
            self.metrics.count_handshake(handshake_outcome(exc))
            conn.log.log(logging.INFO, "handshake_retried", "stale QKD key; retrying once with a new handshake",
                         reason=str(exc))
        except Exception as exc:
            up_writer.close()
            self.handshake_failed(conn, exc)
            return None
        return await self._secure_channel(conn, retry_stale_key=False, retry_steady=retry_steady)
