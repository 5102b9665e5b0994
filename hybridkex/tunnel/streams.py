"""The byte streams the tunnel relays: the :class:`SecureStream` interface and :class:`PlainStream`.

Their own module because every side of the tunnel needs them (the channel seam, the relay, the
runtime, the secure channel and the insecure test channel) while needing nothing from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from .fastpath import Codec, Endpoint, usable_transport

__all__ = ["PlainStream", "SecureStream"]


@runtime_checkable
class SecureStream(Protocol):
    """A byte stream after a successful handshake, as the relay uses it.

    ``read`` returns ``b""`` once the peer has finished sending (its half-close or close);
    ``write_eof`` flushes what was written and then signals end-of-stream to the peer while
    reading continues (TLS: close_notify, then TCP half-close).
    """

    @property
    def session_facts(self) -> Mapping[str, object]:
        """What was negotiated, for logs: suite, components, auth mode, QKD key IDs, and the
        authenticated peer under the name ``peer_identity`` (the runtime copies it onto
        ``connection_closed`` and charges the per-peer limits to it).

        Never keys or anything derived from them.
        """
        ...

    async def read(self, n: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def write_eof(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class PlainStream:
    """An asyncio TCP stream pair behind the :class:`SecureStream` interface (no security at all).

    The runtime uses it for the plaintext side of every connection (the target on the server, the
    local application on the client).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 facts: Mapping[str, object] | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._facts: Mapping[str, object] = dict(facts or {})

    @property
    def session_facts(self) -> Mapping[str, object]:
        return self._facts

    async def read(self, n: int) -> bytes:
        return await self._reader.read(n)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    async def write_eof(self) -> None:
        await self._writer.drain()
        if self._writer.can_write_eof() and not self._writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write_eof()

    def endpoint(self) -> Endpoint | None:
        """This stream's transport for the relay's fast path (which then reads and writes it itself)."""
        transport = usable_transport(self._writer.transport)
        return None if transport is None else Endpoint(transport, self._reader, Codec())

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
