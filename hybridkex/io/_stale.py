"""What the handshake drivers do when a QKD key turns out to be unknown to a KME.

A KME that restarted without persistence has forgotten the keys a master pooled before: the slave's
KME answers "not found".  The slave aborts with ``QKD_KEY_UNKNOWN`` (docs/spec.md 6.4), the master
learns it from that Abort, and both raise :class:`~hybridkex.exceptions.QKDKeyUnknownError`.  Each
driver records which QKD keys its handshake used (:class:`QKDUse`) so that it can then tell its
:class:`~hybridkex.io.QKDKeyManager`, which drops what is stale (pooled keys, an epoch key).

An initiator retries such a handshake once (``HybridClient``, the tunnel client).  When the
initiator is the slave, its retry must not reach the master before the master has dropped its stale
keys, or it would get the next stale one: so after sending the Abort it waits (briefly) for the
master to close the connection, which the master does only after dropping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from ..exceptions import QKDKeyUnknownError
from ..protocol import Initiator, QKDKeysByIdRequired, QKDKeysRequired, Responder
from ..qkd.base import QKDKey
from .keys import QKDKeyManager

__all__ = ["PEER_CLOSE_WAIT", "QKDUse", "await_close", "await_close_async", "must_await_close"]

#: Longest wait for the master to close after our QKD_KEY_UNKNOWN Abort (it normally takes a moment).
PEER_CLOSE_WAIT = 2.0


class QKDUse:
    """The QKD keys one handshake asked for or took: the peer SAE and the key IDs (no key material)."""

    __slots__ = ("key_ids", "peer")

    def __init__(self) -> None:
        self.peer: str | None = None
        self.key_ids: tuple[str, ...] = ()

    def asked(self, event: QKDKeysRequired | QKDKeysByIdRequired) -> None:
        if isinstance(event, QKDKeysRequired):
            self.peer = event.slave_sae_id
        else:
            self.peer, self.key_ids = event.master_sae_id, tuple(event.key_ids)

    def got(self, keys: list[QKDKey]) -> None:
        if not self.key_ids:
            self.key_ids = tuple(k.key_id for k in keys)

    def failed(self, exc: BaseException, keys: QKDKeyManager | None) -> None:
        """After a failed handshake: if a KME did not know its keys, let the key manager drop stale ones."""
        if isinstance(exc, QKDKeyUnknownError) and keys is not None and self.peer is not None:
            keys.key_unknown(self.peer, self.key_ids or exc.key_ids, reported_by_peer=exc.reported_by_peer)


def must_await_close(conn: Initiator | Responder, exc: BaseException) -> bool:
    """True for an initiator whose own KME did not know the responder's (the master's) key."""
    return isinstance(conn, Initiator) and isinstance(exc, QKDKeyUnknownError) and not exc.reported_by_peer


def await_close(sock: socket.socket, seconds: float = PEER_CLOSE_WAIT) -> None:
    """Read and drop until the peer closes ``sock``, at most ``seconds``; never raises."""
    end = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                return


async def await_close_async(reader: asyncio.StreamReader, seconds: float = PEER_CLOSE_WAIT) -> None:
    """:func:`await_close` for an asyncio stream."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
