"""The relay's threaded data path: each direction of a connection on an OS thread of its own.

An experiment of issue 15 (``[tunnel] data_path = "threads"``; docs/benchmarks.md has the numbers):
the event loop is one thread, and on a busy machine the scheduler gives it one thread's share of
the CPU, while stunnel runs a thread per connection.  Here the event loop only sets a connection
up; then its sockets are handed to two threads, each of which blocks in ``recv`` on one side,
decrypts or encrypts on the connection's memory BIOs and blocks in ``sendall`` on the other side.
Socket calls and OpenSSL's cffi calls release the GIL, so several connections' crypto can run on
several cores from one process.

Guarantees kept from the fast path (:mod:`hybridkex.tunnel.fastpath`): half-close in each direction
(TLS: close_notify then TCP FIN), backpressure (a blocked ``sendall`` stops that direction's
reading, and only that direction's), the idle timeout and the batched byte counters (one timer on
the event loop, nothing per chunk), and both sockets closed however the relay ends, cancellation
included (``shutdown`` wakes the threads; the last thread to leave closes the sockets, so a socket
is never closed under a thread still using it).

One TLS connection is used by both threads (one reads, one writes): every call on it holds the
connection's ``ssl`` lock, and every hand-over of its outgoing records to the socket holds the
``send`` lock from taking the records to sending them, so records reach the wire in the order
OpenSSL numbered them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Final, cast

from .fastpath import FLUSH_SECONDS, Codec, Direction, Endpoint, TLSCodec, classify_error, run_fast

__all__ = ["run_loops", "run_threads"]

_CHUNK: Final = 256 * 1024
_CLOSE_GRACE: Final = 2.0
_HANDOVER_WAIT: Final = 0.002
_DRAIN_READ: Final = 1 << 20


class _Wire:
    """One side's socket and codec, as both threads use them."""

    def __init__(self, sock: socket.socket, codec: Codec) -> None:
        self.sock = sock
        self.codec = codec
        self.tls: Any = codec.tls if isinstance(codec, TLSCodec) else None
        self.ssl_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.sending = False  # a thread is blocked in sendall here (the peer reads slowly: not idle)

    def send(self, plain: bytes) -> None:
        self.sending = True
        try:
            if self.tls is None:
                self.sock.sendall(plain)
                return
            with self.send_lock:
                with self.ssl_lock:
                    out: bytes = self.tls.send_and_flush(plain)
                self.sock.sendall(out)
        finally:
            self.sending = False

    def decode(self, data: bytes) -> tuple[bytes, bool]:
        """(plaintext, whether the peer's close_notify came); answers post-handshake messages."""
        if self.tls is None:
            return data, False
        with self.ssl_lock:
            plain, eof = self.tls.receive_and_recv(data)
            answer = self.tls.has_data_to_send()
        if answer:  # rare (key updates): taken again under both locks, so no record overtakes it
            with self.send_lock:
                with self.ssl_lock:
                    out = self.tls.data_to_send()
                if out:
                    self.sock.sendall(out)
        return plain, eof

    def decode_eof(self) -> None:
        with self.ssl_lock:
            self.codec.decode_eof()

    def send_eof(self) -> None:
        if self.tls is not None:
            with self.send_lock:
                with self.ssl_lock:
                    out = self.codec.encode_eof()
                if out:
                    self.sock.sendall(out)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)


class _Idle(Exception):
    """The idle timeout passed (a reason, never raised)."""


class _Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop, wires: tuple[_Wire, _Wire]) -> None:
        self.loop = loop
        self.wires = wires
        self.done: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.stopping = False
        self.finished = 0  # directions that ended cleanly
        self.left = 0  # threads that returned
        # Written by one thread each, read by the event loop: totals only grow, so no reset races.
        self.moved = {"in": 0, "out": 0}
        self.activity = [0, 0]

    def _wake(self, fut: asyncio.Future[None]) -> None:
        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self.loop.call_soon_threadsafe(resolve)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.stopping:
                return
            self.error = exc
        self.stop()
        self._wake(self.done)

    def stop(self) -> None:
        """Wake both threads: ``recv`` returns ``b""``, a blocked ``sendall`` fails."""
        self.stopping = True
        for w in self.wires:
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)

    def direction_done(self) -> None:
        with self.lock:
            self.finished += 1
            both = self.finished == 2
        if both:
            self._wake(self.done)

    def leave(self) -> None:
        with self.lock:
            self.left += 1
            last = self.left == 2
        if last:
            for w in self.wires:
                w.sock.close()
            self._wake(self.exited)


def _pump(relay: _Relay, src: _Wire, dst: _Wire, direction: Direction, index: int,  # noqa: PLR0917 - a thread's args
          pending: bytes, buffered: bytes, buffered_eof: bool) -> None:
    moved = relay.moved
    activity = relay.activity
    try:
        if pending:
            dst.send(pending)
            moved[direction] += len(pending)
        plain, eof = src.decode(buffered)
        if plain:
            dst.send(plain)
            moved[direction] += len(plain)
        if buffered_eof and not eof:
            src.decode_eof()
            eof = True
        recv = src.sock.recv
        decode, send = src.decode, dst.send
        while not eof:
            data = recv(_CHUNK)
            if relay.stopping:
                return
            if not data:
                src.decode_eof()
                break
            plain, eof = decode(data)
            if plain:
                send(plain)
                moved[direction] += len(plain)
                activity[index] += 1
        if not relay.stopping:
            dst.send_eof()
            relay.direction_done()
    except BaseException as exc:
        relay.fail(exc)
    finally:
        relay.leave()


def _take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything ``reader`` holds and whether it saw EOF, without waiting (as the fast path does)."""
    chunks: list[bytes] = []
    while True:
        coro = reader.read(_DRAIN_READ)
        try:
            coro.send(None)
        except StopIteration as finished:
            data: bytes = finished.value
            if not data:
                return b"".join(chunks), True
            chunks.append(data)
            continue
        coro.close()
        return b"".join(chunks), False


class _Dropped(asyncio.Protocol):
    """The protocol of a transport whose socket the threads took: ignores its last callbacks."""


async def _take_socket(ep: Endpoint) -> tuple[socket.socket, bytes, bool]:
    """The endpoint's socket as a blocking socket of our own (a duplicate of its descriptor), what
    its reader had buffered, and whether that included EOF; the transport is then let go."""
    transport = ep.transport
    transport.pause_reading()
    data, eof = _take_buffered(ep.reader)
    # Bytes the transport still buffers (the handshake's last flight) leave first: usually none.
    while transport.get_write_buffer_size() and not transport.is_closing():
        await asyncio.sleep(_HANDOVER_WAIT)
    raw = transport.get_extra_info("socket")
    if raw is None:
        raise ConnectionResetError("the connection closed before the relay took it over")
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    sock.setblocking(True)
    transport.set_protocol(_Dropped())
    transport.abort()  # closes the transport's descriptor only: ours keeps the connection open
    return sock, data, eof


async def run_threads(listen: Endpoint, target: Endpoint, *, idle_timeout: float | None,
                      on_bytes: Callable[[Direction, int], None] | None) -> tuple[str, int, int, str | None]:
    """Relay between two endpoints on two threads until both directions end, one fails, or the idle
    timeout; returns (outcome, bytes_in, bytes_out, error).  Both sockets are closed by then, or
    (cancelled while the threads were stopping) as soon as the last thread leaves."""
    loop = asyncio.get_running_loop()
    taken: list[tuple[socket.socket, bytes, bool]] = []
    try:
        for ep in (listen, target):
            taken.append(await _take_socket(ep))
    except BaseException:
        for sock, _, _ in taken:
            sock.close()
        for ep in (listen, target):
            ep.transport.abort()
        raise
    (sa, data_a, eof_a), (sb, data_b, eof_b) = taken
    a, b = _Wire(sa, listen.codec), _Wire(sb, target.codec)
    relay = _Relay(loop, (a, b))
    flushed = {"in": 0, "out": 0}

    def flush() -> None:
        for direction in ("in", "out"):
            n = relay.moved[direction] - flushed[direction]
            if n:
                flushed[direction] += n
                if on_bytes is not None:
                    on_bytes(direction, n)

    threads = [
        threading.Thread(target=_pump, name="hybridkex-relay-in", daemon=True,
                         args=(relay, a, b, "in", 0, listen.pending, data_a, eof_a)),
        threading.Thread(target=_pump, name="hybridkex-relay-out", daemon=True,
                         args=(relay, b, a, "out", 1, target.pending, data_b, eof_b)),
    ]
    timer: asyncio.TimerHandle | None = None
    outcome, error = "closed", None
    period = FLUSH_SECONDS if not idle_timeout else min(FLUSH_SECONDS, idle_timeout / 4)
    state = {"seen": 0, "quiet": 0.0}

    def tick() -> None:
        nonlocal timer
        flush()
        seen = sum(relay.activity)
        if seen != state["seen"] or a.sending or b.sending:
            state["seen"], state["quiet"] = seen, 0.0
        else:
            state["quiet"] += period
            if idle_timeout and state["quiet"] >= idle_timeout:
                relay.fail(_Idle())
                return
        timer = loop.call_later(period, tick)

    started = 0
    try:
        for t in threads:
            t.start()
            started += 1
        timer = loop.call_later(period, tick)
        await relay.done
        if relay.error is not None:
            outcome = "idle_timeout" if isinstance(relay.error, _Idle) else classify_error(relay.error)[0]
            if not isinstance(relay.error, _Idle):
                error = classify_error(relay.error)[1]
    finally:
        if timer is not None:
            timer.cancel()
        relay.stop()
        for _ in range(len(threads) - started):
            relay.leave()  # a thread that never started still counts as gone
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_GRACE):
                await asyncio.shield(relay.exited)
        flush()
    return outcome, flushed["in"], flushed["out"], error


# --- a pool of event-loop threads ------------------------------------------------------------------------
#
# The other shape of the experiment (``data_path = "loops"``): the fast path itself, unchanged, on
# one of a few event loops that each run on a thread of their own (as many as the machine has
# cores).  Fewer threads contend for the interpreter lock than with two per connection, and one
# wake-up of a loop serves every connection that is ready on it.


class _LoopThread:
    def __init__(self, index: int, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = factory()
        self.active = 0  # connections on this loop (changed on the main loop only)
        self.thread = threading.Thread(target=self._run, name=f"hybridkex-relay-loop-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()


_POOL: list[_LoopThread] = []
_POOL_LOCK = threading.Lock()


def _loop_factory(main: asyncio.AbstractEventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """New loops of the main loop's kind (uvloop's when the tunnel runs on uvloop)."""
    if type(main).__module__.startswith("uvloop"):
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - only on uvloop

        return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)
    return asyncio.new_event_loop


def _pick(main: asyncio.AbstractEventLoop) -> _LoopThread:
    with _POOL_LOCK:
        if not _POOL:
            factory = _loop_factory(main)
            _POOL.extend(_LoopThread(i, factory) for i in range(max(1, os.cpu_count() or 1)))
        return min(_POOL, key=lambda t: t.active)


async def _serve_on_loop(sides: list[tuple[socket.socket, bytes, bool, Endpoint]], idle_timeout: float | None,
                         on_bytes: Callable[[Direction, int], None] | None) -> tuple[str, int, int, str | None]:
    loop = asyncio.get_running_loop()
    eps: list[Endpoint] = []
    try:
        for sock, data, eof, ep in sides:
            reader = asyncio.StreamReader()
            if data:
                reader.feed_data(data)
            if eof:
                reader.feed_eof()
            sock.setblocking(False)
            transport, _ = await loop.connect_accepted_socket(
                lambda r=reader: asyncio.StreamReaderProtocol(r), sock)  # type: ignore[misc]
            eps.append(Endpoint(transport, reader, ep.codec, ep.pending))
    except BaseException:
        for e in eps:
            e.transport.abort()
        for sock, *_ in sides[len(eps):]:
            sock.close()
        raise
    return await run_fast(eps[0], eps[1], idle_timeout=idle_timeout, on_bytes=on_bytes)


async def run_loops(listen: Endpoint, target: Endpoint, *, idle_timeout: float | None,
                    on_bytes: Callable[[Direction, int], None] | None) -> tuple[str, int, int, str | None]:
    """:func:`~hybridkex.tunnel.fastpath.run_fast` on one of the pool's event-loop threads; the byte
    counts come back to this loop (``on_bytes`` runs here)."""
    main = asyncio.get_running_loop()
    sides: list[tuple[socket.socket, bytes, bool, Endpoint]] = []
    try:
        for ep in (listen, target):
            sides.append((*await _take_socket(ep), ep))
    except BaseException:
        for sock, *_ in sides:
            sock.close()
        for ep in (listen, target):
            ep.transport.abort()
        raise

    def counted(direction: Direction, n: int) -> None:
        if on_bytes is not None:
            with contextlib.suppress(RuntimeError):
                main.call_soon_threadsafe(on_bytes, direction, n)

    worker = _pick(main)
    worker.active += 1
    future = asyncio.run_coroutine_threadsafe(_serve_on_loop(sides, idle_timeout, counted), worker.loop)
    finished = asyncio.Event()
    future.add_done_callback(lambda _: main.call_soon_threadsafe(finished.set))
    try:
        await finished.wait()
        result = future.result()
    finally:
        worker.active -= 1
        if not future.done():  # cancelled here (drain deadline): the relay closes both connections there
            future.cancel()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_GRACE):
                    await asyncio.shield(finished.wait())
    await asyncio.sleep(0)  # the last counts posted by the relay's final flush run before we return
    return result
