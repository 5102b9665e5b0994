"""Driving a pyOpenSSL connection over memory BIOs: a sans-IO core and an asyncio stream on top.

:class:`MemoryTLS` never touches a socket: feed it what the peer sent (:meth:`~MemoryTLS.receive_data`),
send what it produced (:meth:`~MemoryTLS.data_to_send`).  :class:`AsyncTLSStream` joins it to an
asyncio ``StreamReader``/``StreamWriter`` pair.

The one rule that keeps two peers from deadlocking when both send at once: only the handshake and
:meth:`AsyncTLSStream.send` await ``drain()``.  The read path merely *writes* pending records
(close_notify, post-handshake messages) and never waits for the transport to drain, because the
peer may be blocked sending to us and not reading.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final

from ..exceptions import ConfigurationError, HandshakeTimeout, LocalProtocolError, TLSError
from . import _shim
from ._common import TLSInfo
from .pyopenssl import _attach, _bind, _raise_captured, _reasons, _require_config, _translate_error, _verify

if TYPE_CHECKING:
    from OpenSSL import SSL
else:
    SSL = _shim.SSL

__all__ = ["AsyncTLSStream", "MemoryTLS"]

_CHUNK: Final = 65536


class MemoryTLS:
    """A TLS 1.3 PSK connection on memory BIOs (no I/O).

    Args:
        ctx: a context from :func:`~hybridkex.tls.client_context` or :func:`~hybridkex.tls.server_context`.
        server_side: accept (True) or connect (False).

    Use :meth:`bind_psk` (or :func:`~hybridkex.tls.bind_psk` on :attr:`connection`) for a
    per-connection PSK before the first :meth:`do_handshake`.  Not thread-safe; one task may send
    while another receives.
    """

    def __init__(self, ctx: SSL.Context, *, server_side: bool) -> None:
        self.connection = conn = SSL.Connection(ctx, None)
        if server_side:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        # Looked up once here rather than in every call of the handshake (a per-connection cost).
        self._cfg, self._st = _attach(conn, ctx)
        self._info: TLSInfo | None = None
        self._eof = False
        self._fast = _shim.fast_io(conn)

    @property
    def info(self) -> TLSInfo | None:
        """What the verified handshake negotiated; None until :meth:`do_handshake` returned it."""
        return self._info

    def bind_psk(self, identity: bytes | str, psk: bytes) -> None:
        """:func:`~hybridkex.tls.bind_psk` on :attr:`connection`: this connection's own external PSK."""
        _require_config(self._cfg)
        _bind(self._st, identity, psk)

    def receive_data(self, data: bytes) -> None:
        """Bytes the peer sent; ``b""`` means the transport reached EOF."""
        if not data:
            if not self._eof:
                self._eof = True
                self.connection.bio_shutdown()
            return
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        if not self._fast or not _shim.feed(self.connection, data):
            self.connection.bio_write(data)  # raises the typed error (or writes what the fast path could not)

    def data_to_send(self) -> bytes:
        """Every TLS record produced so far and not yet sent (may be ``b""``)."""
        if self._fast:
            return _shim.pending_output(self.connection)
        chunks = []
        while True:
            try:
                chunk = self.connection.bio_read(_CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _CHUNK:  # a memory BIO hands out all it holds: a short read emptied it
                break
        return b"".join(chunks)

    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return anything (cheaper than calling it: a relay asks
        after every record it decrypts, and the answer is almost always no)."""
        # Without the direct bindings nothing cheaper is known: say yes, data_to_send finds out.
        return _shim.pending_size(self.connection) > 0 if self._fast else True

    def do_handshake(self) -> TLSInfo | None:
        """Advance the handshake: the verified :class:`TLSInfo` once done, None while it needs more
        data from the peer (send :meth:`data_to_send` first).  Raises the typed handshake errors;
        after a failure, still send :meth:`data_to_send` so the peer gets the alert."""
        if self._info is not None:
            return self._info
        # pyopenssl._do_handshake, inline (one frame and one re-raise less per step: this runs for
        # every flight of every connection).
        try:
            self.connection.do_handshake()
        except SSL.WantReadError:
            _raise_captured(self._st)
            if self._eof:
                raise TLSError("the peer closed the connection during the TLS handshake") from None
            return None
        except SSL.WantWriteError:
            _raise_captured(self._st)
            raise
        except SSL.Error as exc:
            raise _translate_error(self.connection, exc) from exc
        self._info = _verify(self.connection, _require_config(self._cfg), self._st)
        return self._info

    def _require_handshake(self) -> None:
        if self._info is None:
            raise LocalProtocolError("the TLS handshake has not completed")

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data``; the records wait in :meth:`data_to_send`."""
        self._require_handshake()
        if len(data):
            try:
                self.connection.sendall(bytes(data))
            except SSL.Error as exc:
                raise TLSError(f"TLS send failed: {', '.join(_reasons(exc)) or 'no reason'}") from exc

    def recv(self, max_bytes: int = _CHUNK) -> bytes | None:
        """Up to ``max_bytes`` of plaintext; None when more peer data is needed; ``b""`` once the
        peer sent close_notify.  An EOF without close_notify raises :class:`TLSError` (truncation)."""
        self._require_handshake()
        if max_bytes < 1:
            raise ConfigurationError("must be >= 1", field="max_bytes")
        try:
            return bytes(self.connection.recv(max_bytes))
        except SSL.WantReadError:
            if self._eof:
                raise TLSError("the peer closed the connection without close_notify (possible truncation)") from None
            return None
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError:
            raise TLSError("the peer closed the connection without close_notify (possible truncation)") from None
        except SSL.Error as exc:
            raise _translate_error(self.connection, exc, established=True) from exc

    def receive_and_recv(self, data: bytes) -> tuple[bytes, bool]:
        """:meth:`receive_data` (``data`` non-empty) then :meth:`recv` until it needs more, in one
        call: (all the plaintext, whether the peer's close_notify came).  For a relay that moves
        many small messages: no exception per call on the common path.  Errors as :meth:`recv`."""
        self._require_handshake()
        if not self._fast or self._eof:
            if data:
                self.receive_data(data)
            return self._recv_all()
        chunks, status = _shim.read_records(self.connection, data)
        if status == _shim.READ_ERROR:
            more, closed = self._recv_all()  # raises the typed error (or finds there was none)
            return b"".join([*chunks, more]), closed
        plain = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return plain, status == _shim.READ_CLOSED

    def _recv_all(self) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        while (chunk := self.recv(_CHUNK)) is not None:
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
        return b"".join(chunks), False

    def send_and_flush(self, data: bytes) -> bytes:
        """:meth:`send` then :meth:`data_to_send`: the records for ``data`` (and anything queued)."""
        self._require_handshake()
        if self._fast:
            done, out = _shim.encrypt(self.connection, data)
            if done == len(data):
                return out  # the common path: one call into the shim
            self.send(data[done:])  # raises the typed error
            return out + self.data_to_send()  # pragma: no cover - only if OpenSSL failed once, then not
        self.send(data)
        return self.data_to_send()

    def close(self) -> None:
        """Queue a close_notify alert (send :meth:`data_to_send` afterwards)."""
        with contextlib.suppress(SSL.Error):  # already closed or never established: nothing to announce
            self.connection.shutdown()


class AsyncTLSStream:
    """A :class:`MemoryTLS` joined to an asyncio stream pair.

    One task may call :meth:`send` while another calls :meth:`recv` (full duplex); do not call
    the same method from two tasks at once.
    """

    def __init__(self, tls: MemoryTLS, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tls = tls
        self._reader = reader
        self._writer = writer

    @property
    def info(self) -> TLSInfo | None:
        return self.tls.info

    def _flush_nowait(self) -> None:
        out = self.tls.data_to_send()
        if out and not self._writer.is_closing():
            self._writer.write(out)

    async def _flush(self) -> None:
        self._flush_nowait()
        await self._writer.drain()

    async def handshake(self, timeout: float | None = None) -> TLSInfo:
        """Run and verify the handshake (within ``timeout`` seconds).  On failure the alert is sent
        and the error raised; the caller closes the stream."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        info = self.tls.do_handshake()
                    except BaseException:
                        with contextlib.suppress(ConnectionError, OSError):
                            await self._flush()  # let the peer see our alert
                        raise
                    await self._flush()
                    if info is not None:
                        return info
                    self.tls.receive_data(await self._reader.read(_CHUNK))
        except TimeoutError:
            raise HandshakeTimeout(f"TLS handshake did not finish within {timeout:g} s") from None

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data``, waiting for the transport to accept it (backpressure)."""
        self.tls.send(data)
        await self._flush()

    async def recv(self, max_bytes: int = _CHUNK) -> bytes:
        """Up to ``max_bytes`` of plaintext; ``b""`` after the peer's close_notify."""
        while True:
            data = self.tls.recv(max_bytes)
            # Write (never drain) whatever reading produced; see the module docstring.
            self._flush_nowait()
            if data is not None:
                return data
            self.tls.receive_data(await self._reader.read(_CHUNK))

    async def close(self) -> None:
        """Send close_notify and close the transport."""
        self.tls.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._flush()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
