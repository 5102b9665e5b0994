"""The relay's fast path in-process on real sockets: what arrived before it took over, backpressure
with a reader that stalls, the batched byte counts, the idle timeout, and the stream fallback."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from tunnelhelpers import TEST_ENV, EchoService, Tunnels, echo_exchange, expected_echo

from hybridkex.tunnel.channel import PlainStream
from hybridkex.tunnel.ktls import ktls_status
from hybridkex.tunnel.relay import relay

Pair = tuple[socket.socket, socket.socket, PlainStream, PlainStream]


@asynccontextmanager
async def plain_pair() -> AsyncIterator[Pair]:
    """Two raw client sockets and the relay's two PlainStreams (their accepted ends)."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    srv = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    a = socket.create_connection(("127.0.0.1", port))
    sa = await accepted.get()
    b = socket.create_connection(("127.0.0.1", port))
    sb = await accepted.get()
    for s in (a, b):
        s.setblocking(False)
    try:
        yield a, b, PlainStream(*sa), PlainStream(*sb)
    finally:
        a.close()
        b.close()
        srv.close()
        await srv.wait_closed()


async def recv_all(sock: socket.socket, *, pause_every: int = 0) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        out += chunk
        if pause_every and len(out) // pause_every != (len(out) - len(chunk)) // pause_every:
            await asyncio.sleep(0.05)  # a slow reader: the relay must hold back, not buffer it all
    return bytes(out)


def test_bytes_and_eof_that_arrived_before_the_relay_are_relayed_then_the_other_way_keeps_flowing() -> None:
    async def main() -> None:
        async with plain_pair() as (a, b, pa, pb):
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(a, b"early bytes")
            a.shutdown(socket.SHUT_WR)  # EOF before the relay starts
            await asyncio.sleep(0.2)  # let the stream reader buffer both
            counted: list[tuple[str, int]] = []
            task = asyncio.create_task(relay(pa, pb, idle_timeout=None,
                                             on_bytes=lambda d, n: counted.append((d, n))))
            assert await asyncio.wait_for(recv_all(b), 10) == b"early bytes"  # data, then EOF
            await loop.sock_sendall(b, b"reply after the EOF")
            b.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(recv_all(a), 10) == b"reply after the EOF"
            result = await asyncio.wait_for(task, 10)
            assert (result.outcome, result.bytes_in, result.bytes_out) == ("closed", 11, 19)
            assert sum(n for d, n in counted if d == "in") == 11
            assert sum(n for d, n in counted if d == "out") == 19

    asyncio.run(main())


def test_sixteen_mib_both_ways_at_once_with_a_stalling_reader() -> None:
    async def main() -> None:
        async with plain_pair() as (a, b, pa, pb):
            loop = asyncio.get_running_loop()
            up, down = os.urandom(16 << 20), os.urandom(16 << 20)
            task = asyncio.create_task(relay(pa, pb, idle_timeout=30))

            async def send(sock: socket.socket, data: bytes) -> None:
                await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)

            got_b, got_a, _, _ = await asyncio.wait_for(asyncio.gather(
                recv_all(b, pause_every=4 << 20), recv_all(a), send(a, up), send(b, down)), 120)
            assert hashlib.sha256(got_b).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(got_a).digest() == hashlib.sha256(down).digest()
            result = await asyncio.wait_for(task, 10)
            assert (result.outcome, result.bytes_in, result.bytes_out) == ("closed", 16 << 20, 16 << 20)

    asyncio.run(main())


def test_an_idle_connection_is_closed_and_counted_as_idle() -> None:
    async def main() -> None:
        async with plain_pair() as (a, b, pa, pb):
            loop = asyncio.get_running_loop()
            task = asyncio.create_task(relay(pa, pb, idle_timeout=0.3))
            await loop.sock_sendall(a, b"x")
            assert await asyncio.wait_for(loop.sock_recv(b, 10), 10) == b"x"
            result = await asyncio.wait_for(task, 10)
            assert result.outcome == "idle_timeout" and result.bytes_in == 1
            assert await asyncio.wait_for(recv_all(a), 10) == b""  # both sides closed

    asyncio.run(main())


class _NoEndpoint:
    """A stream without ``endpoint()``: the relay must fall back to the stream path."""

    def __init__(self, inner: PlainStream) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name == "endpoint":
            raise AttributeError(name)
        return getattr(self._inner, name)  # type: ignore[no-any-return]


def test_a_stream_without_an_endpoint_is_relayed_on_the_stream_path() -> None:
    async def main() -> None:
        async with plain_pair() as (a, b, pa, pb):
            loop = asyncio.get_running_loop()
            counted: list[int] = []
            task = asyncio.create_task(relay(_NoEndpoint(pa), pb, idle_timeout=None,  # type: ignore[arg-type]
                                             on_bytes=lambda d, n: counted.append(n)))
            await loop.sock_sendall(a, b"via streams")
            a.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(recv_all(b), 10) == b"via streams"
            b.shutdown(socket.SHUT_WR)
            result = await asyncio.wait_for(task, 10)
            assert result.outcome == "closed" and sum(counted) == 11

    asyncio.run(main())


# --- the event loop the tunnel process runs on ---------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_tunnel_pair_relays_on_either_event_loop(loop: str, echo: EchoService, tunnels: Tunnels) -> None:
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed (the optional extra hybridkex[uvloop])")
    env = {"HYBRIDKEX_EVENT_LOOP": loop}
    server = tunnels.start("server", "server", listen="127.0.0.1:0", target=f"127.0.0.1:{echo.port}",
                           identity="server", peers=("client-a",), env=env)
    client = tunnels.start("client", "client", listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}",
                           identity="client-a", peers=("server",), env=env)
    for proc in (server, client):
        listening = proc.events("listening")[0]
        assert listening["event_loop"] == loop
        # Detected in the tunnel process, the same answer as here; never used (memory BIOs).
        assert listening["ktls"] == ktls_status().summary
        assert listening["ktls"].startswith(("unavailable: ", "unknown: ")) or "not used" in listening["ktls"]
    payload = os.urandom(300_000)
    assert echo_exchange(client.port, payload) == expected_echo(payload)
    rec = server.wait_event("connection_closed")
    assert (rec["outcome"], rec["bytes_in"]) == ("closed", len(payload) + 1)


def test_an_unknown_event_loop_is_refused_in_one_line(tunnels: Tunnels) -> None:
    cfg = tunnels.config("server", listen="127.0.0.1:0", target="127.0.0.1:9", identity="server",
                         peers=("client-a",))
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "tunnel", "server", "--config", str(cfg)],
                          env={**os.environ, **TEST_ENV, "HYBRIDKEX_EVENT_LOOP": "trio"}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "hybridkex: error: HYBRIDKEX_EVENT_LOOP: must be uvloop or asyncio, got 'trio'"], proc.stderr
