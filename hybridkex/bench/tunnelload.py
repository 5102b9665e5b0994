"""The data-path benchmark's own service and load generator (no redis needed).

Wire format, both directions over one TCP connection: a request is an 8-byte header (request
payload length, response length; big-endian uint32 each) and the payload; the service answers
each request with exactly ``response length`` bytes.  So one service covers small
request/response (redis GET-like), pipelined requests and bulk values, and the client knows how
many bytes end each response without parsing them.

The service runs as its own process (``python -m hybridkex.bench.tunnelload PORT_FILE``) so it
never competes for the load generator's interpreter lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Final

__all__ = ["LOADS", "Load", "LoadResult", "run_load"]

_HEADER: Final = struct.Struct("!II")


@dataclass(frozen=True)
class Load:
    """One load shape: ``connections`` clients each sending ``pipeline`` requests at a time."""

    id: str
    label: str
    connections: int
    pipeline: int
    request: int  # payload bytes per request (the header comes on top)
    response: int  # bytes per response
    #: A new TCP connection (through a tunnel: a new handshake) for every request: the rate is connections/s.
    reconnect: bool = False


#: The benchmark's loads; the first three mirror the redis-benchmark runs of issue 15.
LOADS: Final = (
    Load("small", "small request/response (32 B each way), 10 connections", 10, 1, 24, 32),
    Load("pipelined", "pipelined: 16 small requests in flight per connection, 10 connections", 10, 16, 24, 32),
    Load("bulk", "bulk: 64 KiB responses, 10 connections", 10, 1, 24, 65536),
    Load("connect", "a new connection (TCP + tunnel handshake) per small request, 10 clients", 10, 1, 24, 32,
         reconnect=True),
)


@dataclass
class LoadResult:
    """What one timed run of a load measured (latencies in ms, one per request batch)."""

    requests: int = 0
    seconds: float = 0.0
    bytes_total: int = 0  # request + response bytes, both directions
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_text: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_total / self.seconds / 1e6 if self.seconds else 0.0


# -- the service ---------------------------------------------------------------------------------


class _Service(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._replies: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            req, resp = _HEADER.unpack_from(buf, pos)
            if len(buf) - pos < _HEADER.size + req:
                break
            pos += _HEADER.size + req
            reply = self._replies.get(resp)
            if reply is None:
                reply = self._replies[resp] = os.urandom(resp)
            out.append(reply)
        del buf[:pos]
        if out and self._transport is not None:
            self._transport.write(b"".join(out))

    def eof_received(self) -> bool | None:
        return None  # close


async def _serve(port_file: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Service, "127.0.0.1", 0, backlog=512)
    port = server.sockets[0].getsockname()[1]
    tmp = port_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(port))
    os.replace(tmp, port_file)  # the parent sees the whole number or nothing
    async with server:
        await server.serve_forever()


# -- the load generator --------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """One connection: sends ``pipeline`` requests, waits for all their bytes, records the time."""

    def __init__(self, load: Load, result: LoadResult) -> None:
        self.load = load
        self.result = result
        self.batch = (_HEADER.pack(load.request, load.response) + b"r" * load.request) * load.pipeline
        self.expect = load.response * load.pipeline
        self.pending = 0
        self.sent_at = 0.0
        self.deadline = 0.0
        self.measuring = False
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        assert self.transport is not None
        self.pending = self.expect
        self.sent_at = time.perf_counter()
        self.transport.write(self.batch)

    def data_received(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending > 0:
            return
        now = time.perf_counter()
        if self.pending < 0:
            self._fail("more bytes than requested")
            return
        if not self.ready.done():
            self.ready.set_result(None)  # the warm-up request came back
            return
        if not self.measuring:
            return
        r = self.result
        r.requests += self.load.pipeline
        r.bytes_total += len(self.batch) + self.expect
        r.latencies_ms.append((now - self.sent_at) * 1000)
        if now < self.deadline:
            self.send()
        else:
            self.measuring = False
            if self.done is not None and not self.done.done():
                self.done.set_result(None)

    def _fail(self, why: str) -> None:
        for fut in (self.ready, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._fail(f"connection lost ({type(exc).__name__ if exc else 'EOF'})")


async def _connect_load(port: int, load: Load, seconds: float, timeout: float) -> LoadResult:
    """``load.connections`` clients, each: connect, one request, read its response, close; again."""
    result = LoadResult()
    request = _HEADER.pack(load.request, load.response) + b"r" * load.request
    start = time.perf_counter()
    deadline = start + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                await reader.readexactly(load.response)
            finally:
                writer.close()
            result.requests += 1
            result.bytes_total += len(request) + load.response
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)

    try:
        async with asyncio.timeout(seconds + timeout):
            await asyncio.gather(*(client() for _ in range(load.connections)))
        result.seconds = time.perf_counter() - start
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        result.errors += 1
        result.error_text = f"{type(exc).__name__}: {exc}"
    return result


async def run_load(port: int, load: Load, seconds: float, *, timeout: float = 30.0) -> LoadResult:
    """Connect ``load.connections`` clients to ``port``, warm each up with one request (so a tunnel's
    handshakes are done before timing starts), then run the load for ``seconds``.  A ``reconnect``
    load times connections instead: each request on a new one."""
    if load.reconnect:
        return await _connect_load(port, load, seconds, timeout)
    loop = asyncio.get_running_loop()
    result = LoadResult()
    clients: list[_Client] = []
    try:
        async with asyncio.timeout(timeout):
            for _ in range(load.connections):
                _, c = await loop.create_connection(lambda: _Client(load, result), "127.0.0.1", port)
                clients.append(c)
                c.send()
            await asyncio.gather(*(c.ready for c in clients))
        start = time.perf_counter()
        for c in clients:
            c.deadline = start + seconds
            c.measuring = True
            c.done = loop.create_future()
            c.send()
        async with asyncio.timeout(seconds + timeout):
            await asyncio.gather(*(c.done for c in clients if c.done is not None))
        result.seconds = time.perf_counter() - start
    except (OSError, TimeoutError) as exc:
        result.errors += 1
        result.error_text = f"{type(exc).__name__}: {exc}"
    finally:
        for c in clients:
            if c.transport is not None:
                c.transport.close()
        if clients:
            await asyncio.wait([c.lost for c in clients], timeout=5)
    return result


if __name__ == "__main__":  # pragma: no cover - the service process
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(sys.argv[1]))
