"""The asyncio API over real loopback sockets: open_connection/start_server, 200 concurrent
clients, full duplex, half-close, stream semantics, bad peers, asyncio key sources, and
interoperation with the blocking API (the same wire)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from iohelpers import CLIENT_ID, SERVER_ID, WAIT, AsyncKeys, digest, echo_on, make_setup, running_server

import hybridkex
from hybridkex import AuthenticationError, HandshakeTimeout, TLSError
from hybridkex.api import HybridStreamReader, HybridStreamWriter
from hybridkex.steady import SteadyTicket


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def echo(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def serve(setup: Any, cb: Callable[..., Any] = echo, **kwargs: Any) -> hybridkex.HybridAsyncServer:
    return await hybridkex.start_server(cb, "127.0.0.1", 0, setup.server,
                                        key_source=kwargs.pop("key_source", setup.server_keys), **kwargs)


def port_of(server: hybridkex.HybridAsyncServer) -> int:
    return int(server.sockets[0].getsockname()[1])


def test_open_connection_and_start_server(setup: Any) -> None:
    async def main() -> None:
        seen: asyncio.Queue[Any] = asyncio.Queue()

        async def handler(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
            session = writer.get_extra_info("hybridkex_session")
            await seen.put((session, session.channel_binding(), writer.get_extra_info("peername")))
            writer.write((await reader.readline()).upper())
            await writer.drain()
            await writer.aclose()

        async with await serve(setup, handler) as server:
            assert server.is_serving() and server.reconnect_registry is None
            reader, writer = await hybridkex.open_connection("127.0.0.1", port_of(server), setup.client,
                                                             key_source=setup.client_keys)
            writer.write(b"hello async\n")
            await writer.drain()
            assert await reader.read() == b"HELLO ASYNC\n"  # until the server's close_notify
            assert reader.at_eof()
            cli = writer.get_extra_info("hybridkex_session")
            srv, srv_binding, peername = await seen.get()
            assert cli is writer.session and writer.get_extra_info("tls_info") is cli.tls
            assert cli.peer_identity == SERVER_ID and srv.peer_identity == CLIENT_ID
            assert cli.group == srv.group == "X25519MLKEM768" and cli.qkd_used and srv.qkd_used
            assert cli.info.transcript_hash == srv.info.transcript_hash
            assert cli.channel_binding() == srv_binding
            assert peername[0] == "127.0.0.1" and writer.get_extra_info("peername")[1] == port_of(server)
            # No reconnect ticket (off by default): the default steady state's ticket.
            ticket = writer.reconnect_ticket
            assert isinstance(ticket, SteadyTicket) and writer.get_extra_info("hybridkex_ticket") is ticket
            assert writer.get_extra_info("nonexistent", "dflt") == "dflt"
            await writer.aclose()

    run(main())


def test_200_concurrent_clients(setup: Any) -> None:
    async def main() -> None:
        async with await serve(setup) as server:
            port = port_of(server)

            async def client(i: int) -> bool:
                payload = os.urandom(1000 + i)
                reader, writer = await hybridkex.open_connection("127.0.0.1", port, setup.client,
                                                                 key_source=setup.client_keys, timeout=45)
                writer.write(payload)
                await writer.drain()
                got = await reader.readexactly(len(payload))
                await writer.aclose()
                return got == payload and writer.session.qkd_used

            results = await asyncio.gather(*(client(i) for i in range(200)))
            assert results == [True] * 200
            assert setup.link.stock() == 100_000 - 200  # one fresh QKD key per connection

    run(main(), timeout=75)


@pytest.mark.parametrize("size", [1, 4 * 1024 * 1024], ids=["1B", "4MiB"])
def test_full_duplex(setup: Any, size: int) -> None:
    """Both ends write ``size`` bytes while reading the other's (the read path never drains)."""
    client_data, server_data = os.urandom(size), os.urandom(size)

    async def main() -> None:
        got_at_server: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
            async def send() -> None:
                writer.write(server_data)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            got_at_server.set_result(await reader.read())
            await sender
            await writer.aclose()

        async with await serve(setup, handler) as server:
            reader, writer = await hybridkex.open_connection("127.0.0.1", port_of(server), setup.client,
                                                             key_source=setup.client_keys)

            async def send() -> None:
                for i in range(0, size, 100_000):
                    writer.write(client_data[i:i + 100_000])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            got = await reader.read()
            await sender
            await writer.aclose()
            assert digest(got) == digest(server_data)
            assert digest(await got_at_server) == digest(client_data)

    run(main())


def test_write_eof_half_close(setup: Any) -> None:
    async def main() -> None:
        async def handler(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
            request = await reader.read()  # until the client's close_notify
            assert reader.at_eof()
            writer.write(b"got %d bytes after your EOF" % len(request))
            await writer.drain()
            await writer.aclose()

        async with await serve(setup, handler) as server:
            reader, writer = await hybridkex.open_connection("127.0.0.1", port_of(server), setup.client,
                                                             key_source=setup.client_keys)
            assert writer.can_write_eof()
            writer.write(b"x" * 5000)
            writer.write_eof()
            with pytest.raises(RuntimeError):
                writer.write(b"late")
            assert await reader.read() == b"got 5000 bytes after your EOF"
            await writer.aclose()

    run(main())


def test_reader_semantics(setup: Any) -> None:
    async def main() -> None:
        async def handler(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
            writer.writelines([b"line one\n", b"line two\n", b"ab|cd|", b"x" * 100 + b"\n", b"12345"])
            await writer.drain()
            await writer.aclose()

        async with await serve(setup, handler) as server:
            reader, writer = await hybridkex.open_connection("127.0.0.1", port_of(server), setup.client,
                                                             key_source=setup.client_keys, limit=50)
            assert [line async for line in _take(reader, 2)] == [b"line one\n", b"line two\n"]
            assert await reader.readuntil(b"|") == b"ab|"
            assert await reader.readexactly(3) == b"cd|"
            with pytest.raises(ValueError):
                await reader.readline()  # 100 bytes > limit of 50
            assert await reader.read(2) == b"12"
            with pytest.raises(asyncio.IncompleteReadError) as exc:
                await reader.readexactly(10)
            assert exc.value.partial == b"345" and reader.at_eof()
            assert await reader.read() == b"" and await reader.readline() == b""
            await writer.aclose()

    run(main())


async def _take(reader: HybridStreamReader, n: int) -> Any:
    async for line in reader:
        yield line
        n -= 1
        if n == 0:
            return


def test_bad_peers_rejected_while_others_served(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup(server_timeout=1.0)
    bad = make_setup(client_psk=os.urandom(32))

    async def main() -> None:
        async with await serve(setup) as server:
            port = port_of(server)
            silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)  # says nothing
            garbage_r, garbage_w = await asyncio.open_connection("127.0.0.1", port)
            garbage_w.write(b"\x00\x01 not a handshake")
            with pytest.raises(AuthenticationError):
                await hybridkex.open_connection("127.0.0.1", port, bad.client, key_source=setup.client_keys)
            reader, writer = await hybridkex.open_connection("127.0.0.1", port, setup.client,
                                                             key_source=setup.client_keys)
            writer.write(b"fine")
            assert await reader.readexactly(4) == b"fine"
            await writer.aclose()
            assert await silent_r.read() == b""  # dropped at the 1 s setup deadline
            with contextlib.suppress(ConnectionResetError):  # closed at once, maybe with our garbage unread
                assert await garbage_r.read(100) == b""
            for w in (silent_w, garbage_w):
                w.close()

    run(main())
    lines = [r.getMessage() for r in server_log.records if "rejected connection" in r.getMessage()]
    assert len(lines) == 3, lines
    assert sum("AuthenticationError" in m for m in lines) == 1
    assert sum("RemoteProtocolError" in m for m in lines) == 1
    assert sum("HandshakeTimeout" in m for m in lines) == 1


def test_client_timeout_against_silent_server(setup: Any) -> None:
    async def main() -> None:
        async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()  # never answers; returns when the client gives up
            finally:
                writer.close()

        plain = await asyncio.start_server(never, "127.0.0.1", 0)
        port = plain.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeTimeout):
            await hybridkex.open_connection("127.0.0.1", port, setup.client, key_source=setup.client_keys,
                                            timeout=0.3)
        plain.close()

    run(main())


def test_callback_errors_are_logged(setup: Any, server_log: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        calls = 0

        async def handler(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("callback bug")
            await echo(reader, writer)

        async with await serve(setup, handler) as server:
            for expect in (b"", b"ok"):
                reader, writer = await hybridkex.open_connection("127.0.0.1", port_of(server), setup.client,
                                                                 key_source=setup.client_keys)
                writer.write(b"ok")
                writer.write_eof()
                assert await reader.read() == expect
                await writer.aclose()

    run(main())
    assert any("client_connected_cb failed" in r.getMessage() for r in server_log.records)


def test_async_key_sources(setup: Any) -> None:
    """AsyncKeySource on both ends: its coroutines run on the loop, the key manager in a thread."""
    server_keys, client_keys = AsyncKeys(setup.server_keys), AsyncKeys(setup.client_keys)

    async def main() -> None:
        async with await serve(setup, key_source=server_keys) as server:
            for _ in range(3):
                reader, writer = await hybridkex.open_connection("127.0.0.1", port_of(server), setup.client,
                                                                 key_source=client_keys)
                writer.write(b"q")
                assert await reader.readexactly(1) == b"q"
                assert writer.session.qkd_used
                await writer.aclose()

    run(main())
    assert server_keys.calls == 3 and client_keys.calls == 3
    with pytest.raises(hybridkex.ConfigurationError):
        hybridkex.connect(("127.0.0.1", 9), setup.client, key_source=client_keys)


def test_blocking_and_asyncio_interoperate(setup: Any) -> None:
    """The same wire: a blocking client against the asyncio server, an asyncio client against the
    blocking server."""
    async def against_async() -> None:
        async with await serve(setup) as server:
            port = port_of(server)

            def blocking_client() -> bytes:
                with hybridkex.connect(("127.0.0.1", port), setup.client, key_source=setup.client_keys) as s:
                    s.sendall(b"from blocking")
                    s.shutdown(socket.SHUT_WR)
                    return s.recv(100)

            assert await asyncio.to_thread(blocking_client) == b"from blocking"

    run(against_async())

    with running_server(setup) as srv:
        async def async_client() -> bytes:
            reader, writer = await hybridkex.open_connection(*srv.server_address, setup.client,
                                                             key_source=setup.client_keys)
            writer.write(b"from asyncio")
            writer.write_eof()
            data = await reader.read()
            await writer.aclose()
            return data

        assert run(async_client()) == b"from asyncio"


def test_truncation_is_an_error(setup: Any) -> None:
    async def main() -> None:
        result: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

        async def handler(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
            try:
                result.set_result(await reader.read())
            except TLSError as exc:
                result.set_result(exc)
            writer.close()

        async with await serve(setup, handler) as server:
            _, writer = await hybridkex.open_connection("127.0.0.1", port_of(server), setup.client,
                                                        key_source=setup.client_keys)
            writer.write(b"cut")
            await writer.drain()
            writer.transport.write_eof()  # TCP FIN without close_notify  # type: ignore[attr-defined]
            outcome = await result
            assert isinstance(outcome, TLSError) and "close_notify" in str(outcome)
            writer.transport.close()

    run(main())


def test_max_connections_async(server_log: pytest.LogCaptureFixture) -> None:
    setup = make_setup(max_connections=1, server_timeout=5.0)

    async def main() -> None:
        async with await serve(setup) as server:
            port = port_of(server)
            _, holder_w = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.sleep(0)  # let the server take the holder's slot
            for _ in range(50):
                if server.active_connections == 1:
                    break
                await asyncio.sleep(0.02)
            with pytest.raises((hybridkex.HybridKEXError, OSError)):
                await hybridkex.open_connection("127.0.0.1", port, setup.client, key_source=setup.client_keys,
                                                timeout=3)
            holder_w.close()

    run(main())
    assert any("already being served" in r.getMessage() for r in server_log.records)


def test_thread_pool_not_used_for_key_sources(setup: Any) -> None:
    """A hung key source holds only its own thread: the loop's default executor stays free."""
    stop = threading.Event()

    class Hung:
        sae_id, kme_id = setup.server_keys.sae_id, setup.server_keys.kme_id

        def get_keys(self, *a: Any, **k: Any) -> Any:
            stop.wait(WAIT)
            raise hybridkex.KeyUnavailableError("gave up")

        def get_keys_by_id(self, *a: Any, **k: Any) -> Any:
            raise hybridkex.KeyUnavailableError("no")

        def status(self, *a: Any) -> Any:
            raise hybridkex.KeyUnavailableError("no")

    slow = make_setup(kme_timeout=0.2)

    async def main() -> None:
        async with await serve(slow, key_source=Hung()) as server:
            with pytest.raises(hybridkex.HybridKEXError):
                await hybridkex.open_connection("127.0.0.1", port_of(server), slow.client,
                                                key_source=slow.client_keys)
            assert await asyncio.get_running_loop().run_in_executor(None, lambda: 42) == 42

    try:
        run(main())
    finally:
        stop.set()


def test_on_streams_the_caller_owns(setup: Any) -> None:
    """accept_on_streams / connect_on_streams run the same setup over streams the caller opened
    (the tunnel's seam), including a reconnect."""
    from hybridkex.api import ReconnectPolicy
    from hybridkex.io.aio import ServerSide, connect_on_streams

    rc = make_setup(reconnect=ReconnectPolicy(enabled=True))

    async def main() -> list[Any]:
        side = ServerSide(rc.server, key_source=rc.server_keys)

        plain = await asyncio.start_server(echo_on(side), "127.0.0.1", 0)
        port = plain.sockets[0].getsockname()[1]
        out = []
        ticket = None
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            hr, hw = await connect_on_streams(r, w, rc.client, key_source=rc.client_keys, ticket=ticket)
            hw.write(b"abc")
            out.append((await hr.read(), hw.session.reconnect))
            ticket = ticket or hw.reconnect_ticket
            await hw.aclose()
        plain.close()
        side.close()
        return out

    assert run(main()) == [(b"abc", False), (b"abc", True)]
