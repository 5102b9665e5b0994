"""Application data of an asyncio hybridkex connection: :class:`HybridStreamReader` and
:class:`HybridStreamWriter`, with the methods of asyncio's ``StreamReader``/``StreamWriter``.

TLS runs on memory BIOs (:class:`hybridkex.tls.AsyncTLSStream`); only writes await ``drain()``, the
read path never does (two peers sending at once would deadlock).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ..steady import SteadyTicket
from ..tls import AsyncTLSStream, MemoryTLS
from ..tls.pyopenssl import export_keying_material
from .reconnect import ReconnectTicket
from .session import HybridSession

__all__ = ["DEFAULT_LIMIT", "HybridStreamReader", "HybridStreamWriter"]

#: Default buffer limit of the reader (as asyncio's): readline() refuses longer lines.
DEFAULT_LIMIT = 2**16
_RECV_CHUNK = 65536


class HybridStreamReader:
    """Application data of a hybridkex connection, with :class:`asyncio.StreamReader`'s methods.

    Reads pull TLS records from the socket only when asked (natural backpressure).  ``read``
    returns ``b""`` at the peer's close_notify; an EOF without close_notify raises
    :class:`~hybridkex.TLSError` (possible truncation).  One task reads at a time.
    """

    def __init__(self, stream: AsyncTLSStream, limit: int = DEFAULT_LIMIT) -> None:
        if limit <= 0:
            raise ValueError("Limit cannot be <= 0")
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._busy = False

    def __repr__(self) -> str:
        return f"<HybridStreamReader buffered={len(self._buffer)}{' eof' if self._eof else ''}>"

    async def _fill(self) -> bool:
        """Read more application data; False at EOF."""
        if self._eof:
            return False
        if self._busy:
            raise RuntimeError("another coroutine is already waiting for incoming data")
        self._busy = True
        try:
            data = await self._stream.recv(max(self._limit, _RECV_CHUNK))
        finally:
            self._busy = False
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    def detach(self) -> tuple[MemoryTLS, bytes]:
        """Hand over the TLS connection and the plaintext buffered here, to a caller that drives the
        TCP transport itself from now on (the tunnel's relay); this reader reads nothing more."""
        if self._busy:
            raise RuntimeError("a coroutine is waiting for incoming data")
        data = self._take(len(self._buffer))
        self._eof = True
        return self._stream.tls, data

    def at_eof(self) -> bool:
        """True once the peer's close_notify arrived and the buffer is empty."""
        return self._eof and not self._buffer

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``n < 0``: everything until EOF); ``b""`` at EOF."""
        if n == 0:
            return b""
        if n < 0:
            while await self._fill():
                pass
            return self._take(len(self._buffer))
        if not self._buffer:
            await self._fill()
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`asyncio.IncompleteReadError` at EOF."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while len(self._buffer) < n:
            if not await self._fill():
                partial = self._take(len(self._buffer))
                raise asyncio.IncompleteReadError(partial, n)
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Data up to and including ``separator`` (asyncio's semantics and limit errors)."""
        seplen = len(separator)
        if seplen == 0:
            raise ValueError("Separator should be at least one-byte string")
        offset = 0
        while True:
            index = self._buffer.find(separator, offset)
            if index != -1:
                if index > self._limit:
                    raise asyncio.LimitOverrunError("Separator is found, but chunk is longer than limit", index)
                return self._take(index + seplen)
            offset = max(0, len(self._buffer) + 1 - seplen)
            if offset > self._limit:
                raise asyncio.LimitOverrunError("Separator is not found, and chunk exceed the limit", offset)
            if not await self._fill():
                raise asyncio.IncompleteReadError(self._take(len(self._buffer)), None)

    async def readline(self) -> bytes:
        """One line including ``\\n``; the partial last line at EOF; ValueError past the limit."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            if self._buffer.startswith(b"\n", exc.consumed):
                del self._buffer[: exc.consumed + 1]
            else:
                self._buffer.clear()
            raise ValueError(exc.args[0]) from None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class HybridStreamWriter:
    """Sends application data of a hybridkex connection, with :class:`asyncio.StreamWriter`'s methods.

    ``write`` encrypts at once and hands the records to the transport; ``drain`` applies
    backpressure; ``write_eof`` sends close_notify and half-closes TCP (the peer reads EOF, data
    still flows to us: TLS 1.3 allows it); ``close`` sends close_notify and closes.
    ``get_extra_info("hybridkex_session")`` is the :class:`HybridSession`.
    """

    def __init__(self, stream: AsyncTLSStream, writer: asyncio.StreamWriter, session_facts: tuple[Any, ...],
                 ticket: ReconnectTicket | SteadyTicket | None = None) -> None:
        self._stream = stream
        self._writer = writer
        self._eof_sent = False
        self._ticket = ticket
        conn = stream.tls.connection

        def exporter(label: bytes, length: int, context: bytes | None) -> bytes:
            return export_keying_material(conn, label, length, context)

        info, tls_info, index, steady = session_facts
        self._session = HybridSession(info, tls_info, index is not None, index, exporter, steady=steady)

    def __repr__(self) -> str:
        return f"<HybridStreamWriter peer={self._session.peer_identity!r} {self._session.group}>"

    @property
    def session(self) -> HybridSession:
        """The hybrid handshake and TLS facts of this connection (no secrets)."""
        return self._session

    @property
    def reconnect_ticket(self) -> ReconnectTicket | SteadyTicket | None:
        """The client's ticket for later connections: steady-state or reconnect (None unless a full
        handshake ran with either on)."""
        return self._ticket

    @property
    def transport(self) -> asyncio.BaseTransport:
        """The TCP transport underneath (writing to it directly would bypass TLS: don't)."""
        return self._writer.transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``"hybridkex_session"``: the :class:`HybridSession`; ``"tls_info"``: the TLS facts;
        ``"hybridkex_ticket"``: the reconnect ticket; anything else: the TCP transport's."""
        if name == "hybridkex_session":
            return self._session
        if name == "tls_info":
            return self._session.tls
        if name == "hybridkex_ticket":
            return self._ticket
        return self._writer.get_extra_info(name, default)

    def _flush_nowait(self) -> None:
        out = self._stream.tls.data_to_send()
        if out:
            self._writer.write(out)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and hand it to the transport (call :meth:`drain` for backpressure)."""
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof() or close()")
        if self._writer.is_closing():
            raise ConnectionResetError("the connection is closing")
        self._stream.tls.send(data)
        self._flush_nowait()

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        await self._writer.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify and half-close TCP; reading goes on until the peer's EOF."""
        if self._eof_sent:
            return
        self._eof_sent = True
        self._stream.tls.close()
        self._flush_nowait()
        if self._writer.can_write_eof():
            self._writer.write_eof()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        """Send close_notify (if not sent yet) and close the transport."""
        if self._writer.is_closing():
            return
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(Exception):  # a broken TLS state has nothing to announce
                self._stream.tls.close()
                self._flush_nowait()
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def aclose(self) -> None:
        """:meth:`close` and :meth:`wait_closed`."""
        self.close()
        await self.wait_closed()
