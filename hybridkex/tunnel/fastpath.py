"""The relay's fast path: both sides' transports driven by protocol callbacks, no streams, no tasks.

Once a connection is set up, each of its two transports gets a :class:`_Side` protocol
(``transport.set_protocol``): bytes that arrive on one side are decoded (TLS: decrypted on the
connection's memory BIOs; plain TCP: as they are) and written to the other side's transport in the
same callback.  Per chunk that is one Python call chain instead of a task switch, a future, a
stream buffer and two copies per direction (the profile of the stream relay: issue 15).

Guarantees kept from the stream relay (:mod:`hybridkex.tunnel.relay`): half-close in each
direction (TLS: close_notify then TCP FIN), backpressure (a side whose transport buffer is full
pauses reading on the other), the idle timeout (checked by a timer, not per chunk), byte counters
(handed to ``on_bytes`` in batches, at least every :data:`FLUSH_SECONDS` and at the end), and
both transports closed however the relay ends, cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Final, Literal, cast

from ..exceptions import HybridKEXError, TLSError

__all__ = ["FLUSH_SECONDS", "Codec", "Endpoint", "TLSCodec", "run_fast", "usable_transport"]

#: Most seconds between two hand-overs of the byte counts to ``on_bytes`` while data flows.
FLUSH_SECONDS: Final = 1.0
_CLOSE_GRACE: Final = 2.0
_DRAIN_READ: Final = 1 << 20

Direction = Literal["in", "out"]


class Codec:
    """What one side does to bytes: identity for plain TCP; :class:`TLSCodec` for the secure side."""

    def decode(self, data: bytes) -> tuple[bytes, bool, bytes]:
        """Raw bytes in (``b""``: none, only decode what is held already): (plaintext, whether the
        peer has finished sending, bytes to send back)."""
        return data, False, b""

    def decode_eof(self) -> None:
        """The transport reached EOF (raise if that is not a clean end, e.g. TLS truncation)."""

    def encode(self, data: bytes) -> bytes:
        return data

    def encode_eof(self) -> bytes:
        """What to send before the TCP half-close (TLS: close_notify)."""
        return b""


class TLSCodec(Codec):
    """TLS records on a :class:`~hybridkex.tls.MemoryTLS` (already through its handshake)."""

    def __init__(self, tls: Any) -> None:
        self._tls = tls
        self._closed = False  # the peer's close_notify arrived
        # Per message the relay calls encode: bound straight to the TLS object, one frame less.
        self.encode = tls.send_and_flush  # type: ignore[method-assign]

    def decode(self, data: bytes) -> tuple[bytes, bool, bytes]:
        plain, eof = self._tls.receive_and_recv(data)
        if eof:
            self._closed = True
        # Post-handshake messages (tickets, key updates) the peer expects us to answer; asked
        # cheaply first, since there almost never are any.
        back: bytes = self._tls.data_to_send() if self._tls.has_data_to_send() else b""
        return plain, eof, back

    def decode_eof(self) -> None:
        if self._closed:
            return
        self._tls.receive_data(b"")
        while (chunk := self._tls.recv(262144)) is not None:  # raises TLSError: EOF without close_notify
            if not chunk:
                self._closed = True
                return
        raise TLSError("the peer closed the connection without close_notify (possible truncation)")  # pragma: no cover

    def encode_eof(self) -> bytes:
        self._tls.close()
        out: bytes = self._tls.data_to_send()
        return out


class Endpoint:
    """One side of a connection as the fast path takes it over.

    ``reader`` is the asyncio stream reader that has been reading the transport so far (what it
    buffered is taken over); ``pending`` is plaintext already decoded above it.
    """

    def __init__(self, transport: asyncio.Transport, reader: asyncio.StreamReader, codec: Codec,
                 pending: bytes = b"") -> None:
        self.transport = transport
        self.reader = reader
        self.codec = codec
        self.pending = pending


def usable_transport(transport: object) -> asyncio.Transport | None:
    """``transport`` if the fast path can drive it (asyncio's and uvloop's TCP transports can)."""
    needed = ("set_protocol", "pause_reading", "resume_reading", "is_reading", "write", "write_eof", "abort")
    if all(callable(getattr(transport, name, None)) for name in needed):
        return cast(asyncio.Transport, transport)
    return None


def _take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything ``reader`` holds, and whether it saw EOF, without waiting.

    ``read`` returns at once when the reader holds data or EOF, and would otherwise suspend: its
    coroutine is stepped by hand and dropped at the first suspension.
    """
    chunks: list[bytes] = []
    while True:
        coro = reader.read(_DRAIN_READ)
        try:
            coro.send(None)
        except StopIteration as done:
            data: bytes = done.value
            if not data:
                return b"".join(chunks), True
            chunks.append(data)
            continue
        coro.close()  # nothing buffered, no EOF: it would wait
        return b"".join(chunks), False


class _Idle(Exception):
    """The idle timeout passed (a reason, never raised)."""


class _Side(asyncio.Protocol):
    def __init__(self, relay: _Relay, ep: Endpoint, direction: Direction) -> None:
        self.relay = relay
        self.transport = ep.transport
        self.codec = ep.codec
        self.direction = direction  # the direction of the bytes this side receives
        self.peer: _Side
        self.received = 0  # plaintext bytes delivered to the peer, not yet handed to on_bytes
        self.read_done = False  # the peer of this side has our EOF
        self.write_paused = False
        self.lost = asyncio.get_running_loop().create_future()

    # -- receiving -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            plain, eof, back = self.codec.decode(data)
            if back:
                self.transport.write(back)
            if plain:
                self.peer.send(plain)
            if eof:
                self._finish_reading()
        except Exception as exc:
            self.relay.fail(exc)

    def eof_received(self) -> bool:
        try:
            self.codec.decode_eof()
            self._finish_reading()
        except Exception as exc:
            self.relay.fail(exc)
        return True  # keep the transport open: the other direction may still be flowing

    def _finish_reading(self) -> None:
        if self.read_done:
            return
        self.read_done = True
        self.peer.send_eof()
        self.relay.direction_done()

    # -- sending ---------------------------------------------------------------------------------

    def send(self, plain: bytes) -> None:
        self.peer.received += len(plain)
        self.relay.activity += 1
        out = self.codec.encode(plain)
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def send_eof(self) -> None:
        if self.transport.is_closing():
            return
        out = self.codec.encode_eof()
        if out:
            self.transport.write(out)
        if self.transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()

    # -- flow control: our buffer is full, so stop reading the side that fills it -----------------

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            with contextlib.suppress(RuntimeError):
                self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            self.relay.activity += 1  # a slow reader that drains is not idle
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if exc is not None:
            self.relay.fail(exc)
        elif not (self.read_done and self.peer.read_done):
            self.relay.fail(ConnectionResetError("the connection closed before both directions ended"))


class _Relay:
    def __init__(self, on_bytes: Callable[[Direction, int], None] | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.error: BaseException | None = None
        self.activity = 0
        self.on_bytes = on_bytes
        self.totals = {"in": 0, "out": 0}
        self.sides: tuple[_Side, _Side] | None = None

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.error = exc
            self.done.set_result(None)

    def direction_done(self) -> None:
        assert self.sides is not None
        if all(s.read_done for s in self.sides) and not self.done.done():
            self.done.set_result(None)

    def flush(self) -> None:
        """Hand the byte counts gathered since the last flush to ``on_bytes`` (one call per direction)."""
        assert self.sides is not None
        for side in self.sides:
            n, side.received = side.received, 0
            if n:
                self.totals[side.direction] += n
                if self.on_bytes is not None:
                    self.on_bytes(side.direction, n)


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(outcome, reason) of a relay's failure; both relays report through this one table."""
    if isinstance(exc, ConnectionError):
        return "reset", type(exc).__name__
    if isinstance(exc, HybridKEXError):
        return "stream_error", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        return "io_error", f"{type(exc).__name__}: {exc.strerror or exc}"
    return "internal_error", f"{type(exc).__name__}: {exc}"


async def run_fast(listen: Endpoint, target: Endpoint, *, idle_timeout: float | None,
                   on_bytes: Callable[[Direction, int], None] | None) -> tuple[str, int, int, str | None]:
    """Relay between two endpoints until both directions end, one fails, or the idle timeout;
    returns (outcome, bytes_in, bytes_out, error).  Both transports are closed when it returns."""
    relay = _Relay(on_bytes)
    a = _Side(relay, listen, "in")
    b = _Side(relay, target, "out")
    a.peer, b.peer = b, a
    relay.sides = (a, b)
    loop = relay.loop
    timer: asyncio.TimerHandle | None = None
    outcome = "closed"
    error: str | None = None
    try:
        for side, ep in ((a, listen), (b, target)):
            ep.transport.set_protocol(side)
            if ep.pending:
                side.peer.send(ep.pending)
        for side, ep in ((a, listen), (b, target)):
            data, eof = _take_buffered(ep.reader)
            # Even with no new bytes: the handshake may have read records that followed it.
            side.data_received(data)
            if eof:
                side.eof_received()
            if not ep.transport.is_reading() and not side.peer.write_paused:
                ep.transport.resume_reading()
        # The idle timer and the counter flush share one periodic check: nothing per chunk.
        period = FLUSH_SECONDS if not idle_timeout else min(FLUSH_SECONDS, idle_timeout / 4)
        state = {"seen": relay.activity, "quiet": 0.0}

        def tick() -> None:
            nonlocal timer
            relay.flush()
            if relay.activity != state["seen"] or any(s.transport.get_write_buffer_size() for s in (a, b)):
                state["seen"], state["quiet"] = relay.activity, 0.0
            else:
                state["quiet"] += period
                if idle_timeout and state["quiet"] >= idle_timeout:
                    relay.fail(_Idle())
                    return
            timer = loop.call_later(period, tick)

        timer = loop.call_later(period, tick)
        await relay.done
        if relay.error is not None:
            if isinstance(relay.error, _Idle):
                outcome = "idle_timeout"
            else:
                outcome, error = classify_error(relay.error)
    finally:
        if timer is not None:
            timer.cancel()
        relay.flush()
        await _close(a, b)
    return outcome, relay.totals["in"], relay.totals["out"], error


async def _close(a: _Side, b: _Side) -> None:
    for side in (a, b):
        with contextlib.suppress(Exception):
            side.transport.close()  # flushes what is buffered, then closes
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_CLOSE_GRACE):
            await asyncio.gather(a.lost, b.lost)
    for side in (a, b):
        if not side.lost.done():
            side.transport.abort()
