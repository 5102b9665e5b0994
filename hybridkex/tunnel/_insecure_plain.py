"""INSECURE plain channel for testing the tunnel's relay mechanics. NO ENCRYPTION, NO AUTHENTICATION.

It exists so the runtime (relay, half-close, limits, signals, reload, metrics) can be tested end to
end while the real secure channel is developed separately.  It is selectable only through the test
hook in :mod:`hybridkex.tunnel.channel` (refused unless ``HYBRIDKEX_TESTING=1``), never through
configuration or flags.

It models a handshake just enough to make peers observable: the client sends one line
``HKX-INSECURE-PLAIN/1 <identity>``; the server answers ``OK <its identity>`` if the identity is in
its configured peers (re-read on every reload), else ``DENY`` and closes; a connection the limits
refuse gets ``BUSY``.  Identities are claimed, not proven: anyone can claim any identity.
"""

from __future__ import annotations

import asyncio

from ..exceptions import AuthenticationError, RateLimited, RemoteProtocolError
from ._model import MAX_IDENTITY_BYTES, TunnelConfig
from .limits import admit_peer
from .streams import PlainStream, SecureStream

__all__ = ["InsecurePlainChannelFactory"]

_MAGIC = b"HKX-INSECURE-PLAIN/1 "
_MAX_LINE = len(_MAGIC) + MAX_IDENTITY_BYTES + 1
CHANNEL_NAME = "insecure-plain (TEST ONLY: no encryption, no authentication)"


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    line = bytearray()
    # Byte by byte so that nothing after the newline (application data) is consumed.
    while not line.endswith(b"\n"):
        if len(line) >= _MAX_LINE:
            raise RemoteProtocolError("handshake line too long")
        chunk = await reader.read(1)
        if not chunk:
            raise RemoteProtocolError("connection closed during the handshake")
        line += chunk
    return bytes(line[:-1])


def _identity(raw: bytes) -> str:
    if not raw or len(raw) > MAX_IDENTITY_BYTES or any(not 0x21 <= b <= 0x7E for b in raw):
        raise RemoteProtocolError("malformed identity in handshake")
    return raw.decode("ascii")


class InsecurePlainChannelFactory:
    """TEST ONLY. See the module docstring: claimed identities, no encryption."""

    def __init__(self, config: TunnelConfig) -> None:
        self._config = config

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     peer_addr: str) -> SecureStream:
        line = await _read_line(reader)
        if not line.startswith(_MAGIC):
            raise RemoteProtocolError("not an insecure-plain handshake")
        identity = _identity(line[len(_MAGIC):])
        if identity not in self._config.peer_identities:
            writer.write(b"DENY\n")
            await writer.drain()
            raise AuthenticationError(f"unknown peer identity {identity!r}")
        try:
            admit_peer(identity)
        except RateLimited:
            await self.refuse(writer)
            raise
        writer.write(b"OK " + self._config.identity.encode("ascii") + b"\n")
        await writer.drain()
        return PlainStream(reader, writer, self._facts(identity))

    async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> SecureStream:
        writer.write(_MAGIC + self._config.identity.encode("ascii") + b"\n")
        await writer.drain()
        line = await _read_line(reader)
        if line == b"DENY":
            raise AuthenticationError("the server refused our identity")
        if line == b"BUSY":
            raise RateLimited("the server refused the connection under its connection limits; retry later")
        if not line.startswith(b"OK "):
            raise RemoteProtocolError("malformed handshake answer")
        identity = _identity(line[3:])
        if identity != self._config.target_identity:
            raise AuthenticationError(f"server claimed identity {identity!r}, expected "
                                      f"{self._config.target_identity!r}")
        return PlainStream(reader, writer, self._facts(identity))

    def _facts(self, identity: str) -> dict[str, object]:
        return {"channel": CHANNEL_NAME, "peer_identity": identity, "auth": "none (claimed identity)"}

    async def refuse(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"BUSY\n")
        await writer.drain()

    async def reconfigure(self, config: TunnelConfig) -> None:
        self._config = config

    async def aclose(self) -> None:
        return None
