"""Memory-BIO driving: the sans-IO MemoryTLS pair and the asyncio AsyncTLSStream over real TCP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest
from tlshelpers import memory_pair, pump

from hybridkex import tls
from hybridkex.exceptions import HandshakeTimeout, LocalProtocolError, PSKMismatch, PSKRejected, TLSError

SIZES = [1, 1000, 16383, 16384, 16385, 65537, 1 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_memory_pair_full_duplex(identity: bytes, psk: bytes, size: int) -> None:
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    c, s = r.client_tls, r.server_tls
    to_server, to_client = os.urandom(size), os.urandom(size)
    # Both ends send everything before either reads: records cross in flight.
    c.send(to_server)
    s.send(to_client)
    got_s, got_c = bytearray(), bytearray()
    for _ in range(size // 1024 + 64):
        pump(c, s)
        for end, buf in ((s, got_s), (c, got_c)):
            while (chunk := end.recv(65536)) is not None and chunk:
                buf += chunk
        if len(got_s) == len(got_c) == size:
            break
    assert bytes(got_s) == to_server and bytes(got_c) == to_client
    # Orderly close: close_notify reaches the peer as b"".
    c.close()
    pump(c, s)
    assert s.recv() == b""


@pytest.mark.parametrize("size", SIZES)
def test_send_and_flush_and_receive_and_recv_move_every_byte_once(identity: bytes, psk: bytes, size: int) -> None:
    """The relay's one-call path: larger than a record means several partial SSL_writes (a resent
    first record would show as a duplicate at 16384), cut anywhere on the way."""
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    c, s = r.client_tls, r.server_tls
    pump(c, s)  # post-handshake records
    data = os.urandom(size)
    wire = c.send_and_flush(data) + c.send_and_flush(b"tail")
    assert c.data_to_send() == b""  # send_and_flush returned everything queued
    got = bytearray()
    for i in range(0, len(wire), 7000):  # records split across deliveries
        plain, closed = s.receive_and_recv(wire[i:i + 7000])
        got += plain
        assert not closed
    assert bytes(got) == data + b"tail"
    assert s.receive_and_recv(b"") == (b"", False)  # nothing held, nothing needed
    c.close()
    assert s.receive_and_recv(c.data_to_send()) == (b"", True)


def test_has_data_to_send_agrees_with_data_to_send(identity: bytes, psk: bytes) -> None:
    """The relay asks has_data_to_send after every record it decrypts instead of reading the BIO:
    it must say yes exactly when records wait (a sent message, a close_notify), no once taken."""
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    c, s = r.client_tls, r.server_tls
    pump(c, s)
    assert not c.has_data_to_send() and c.data_to_send() == b""
    c.send(b"x" * 40000)  # three records wait
    assert c.has_data_to_send()
    wire = c.data_to_send()
    assert len(wire) > 40000 and not c.has_data_to_send()
    assert s.receive_and_recv(wire) == (b"x" * 40000, False)
    s.close()
    assert s.has_data_to_send()
    assert c.receive_and_recv(s.data_to_send()) == (b"", True)
    assert not s.has_data_to_send()


def test_output_larger_than_one_read_comes_out_whole(identity: bytes, psk: bytes,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the most one BIO_read may take (1 GiB; lowered here) the output is read in pieces."""
    from hybridkex.tls import _shim

    monkeypatch.setattr(_shim, "_MAX_READ", 1000)
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    c, s = r.client_tls, r.server_tls
    pump(c, s)
    data = os.urandom(50000)
    c.send(data)
    wire = c.data_to_send()
    assert len(wire) > 50000 and not c.has_data_to_send()
    assert s.receive_and_recv(wire) == (data, False)


def test_receive_and_recv_raises_the_typed_error_for_garbage_and_truncation(identity: bytes, psk: bytes) -> None:
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    pump(r.client_tls, r.server_tls)
    with pytest.raises(TLSError):
        r.server_tls.receive_and_recv(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a forged record
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    pump(r.client_tls, r.server_tls)
    wire = r.client_tls.send_and_flush(b"partial")
    assert r.server_tls.receive_and_recv(wire[:-3]) == (b"", False)
    r.server_tls.receive_data(b"")  # EOF without close_notify
    with pytest.raises(TLSError, match="close_notify"):
        r.server_tls.receive_and_recv(b"")


def test_memory_tls_misuse_and_truncation(identity: bytes, psk: bytes) -> None:
    end = tls.MemoryTLS(tls.client_context(identity, psk), server_side=False)
    with pytest.raises(LocalProtocolError):
        end.send(b"too early")
    with pytest.raises(LocalProtocolError):
        end.recv()
    r = memory_pair(tls.client_context(identity, psk), tls.server_context({identity: psk}))
    assert r.server_tls.recv() is None  # nothing yet: needs data
    r.client_tls.send(b"partial")
    out = r.client_tls.data_to_send()
    r.server_tls.receive_data(out[:-3])  # a cut record, then EOF without close_notify
    r.server_tls.receive_data(b"")
    with pytest.raises(TLSError, match="close_notify"):
        r.server_tls.recv()
    with pytest.raises(LocalProtocolError):
        r.server_tls.receive_data(b"more")


def test_memory_tls_bind_psk_and_bytes_like_input(identity: bytes, psk: bytes) -> None:
    """MemoryTLS.bind_psk binds per connection (a context without a PSK); bytes-like input (not
    bytes) takes pyOpenSSL's path and still arrives whole."""
    c = tls.MemoryTLS(tls.client_context(), server_side=False)
    s = tls.MemoryTLS(tls.server_context(), server_side=True)
    c.bind_psk(identity, psk)
    s.bind_psk(identity, psk)
    done: dict[str, tls.TLSInfo | None] = {"c": None, "s": None}
    for _ in range(8):
        done["c"] = done["c"] or c.do_handshake()
        done["s"] = done["s"] or s.do_handshake()
        for x, y in ((c, s), (s, c)):
            if out := x.data_to_send():
                y.receive_data(bytearray(out) if x is c else memoryview(out))
    assert done["c"] is not None and done["s"] is not None
    assert done["c"].psk_identity == done["s"].psk_identity == identity
    with pytest.raises(LocalProtocolError, match="before the connection's handshake"):
        c.bind_psk(identity, psk)  # too late: the handshake ran
    from OpenSSL import SSL

    plain = tls.MemoryTLS(SSL.Context(SSL.TLS_METHOD), server_side=False)
    with pytest.raises(LocalProtocolError, match="not built by hybridkex"):
        plain.bind_psk(identity, psk)


def test_memory_tls_eof_during_handshake(identity: bytes, psk: bytes) -> None:
    end = tls.MemoryTLS(tls.client_context(identity, psk), server_side=False)
    assert end.do_handshake() is None
    assert end.data_to_send()  # the ClientHello
    end.receive_data(b"")
    with pytest.raises(TLSError, match="closed"):
        end.do_handshake()


def test_memory_tls_rejects_garbage(identity: bytes, psk: bytes) -> None:
    end = tls.MemoryTLS(tls.server_context({identity: psk}), server_side=True)
    end.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(TLSError):
        end.do_handshake()


# ---------------------------------------------------------------------------------------------
# asyncio over 127.0.0.1
# ---------------------------------------------------------------------------------------------


async def _exchange(stream: tls.AsyncTLSStream, payload: bytes) -> bytes:
    """Send ``payload`` and receive as many bytes, concurrently (one task per direction)."""

    async def sender() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 50_000):  # several writes, each awaiting drain
            await stream.send(view[i:i + 50_000])

    async def receiver() -> bytes:
        got = bytearray()
        while len(got) < len(payload):
            chunk = await stream.recv()
            if not chunk:
                break
            got += chunk
        return bytes(got)

    _, got = await asyncio.gather(sender(), receiver())
    return got


async def _full_duplex(identity: bytes, psk: bytes, sizes: list[int]) -> None:
    sctx = tls.server_context({identity: psk})
    cctx = tls.client_context(identity, psk)
    server_results: list[tuple[int, bytes]] = []
    closed_cleanly: list[bool] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = tls.AsyncTLSStream(tls.MemoryTLS(sctx, server_side=True), reader, writer)
        try:
            info = await stream.handshake(timeout=10)
            assert info.psk_identity == identity
            for size in sizes:
                payload = hashlib.shake_256(b"server%d" % size).digest(size)
                got = await _exchange(stream, payload)
                server_results.append((size, hashlib.sha256(got).digest()))
            closed_cleanly.append(await stream.recv() == b"")  # the client's close_notify
            await stream.close()
        finally:
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = tls.AsyncTLSStream(tls.MemoryTLS(cctx, server_side=False), reader, writer)
        info = await stream.handshake(timeout=10)
        assert info.group == "X25519MLKEM768" and stream.info is info
        for size in sizes:
            payload = hashlib.shake_256(b"client%d" % size).digest(size)
            got = await _exchange(stream, payload)
            assert got == hashlib.shake_256(b"server%d" % size).digest(size)
        await stream.close()
        await asyncio.wait_for(done.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()
    assert server_results == [(n, hashlib.sha256(hashlib.shake_256(b"client%d" % n).digest(n)).digest()) for n in sizes]
    assert closed_cleanly == [True]


def test_asyncio_full_duplex_1_byte_to_1_mib(identity: bytes, psk: bytes) -> None:
    asyncio.run(asyncio.wait_for(_full_duplex(identity, psk, SIZES), 60))


def test_asyncio_concurrent_connections(identity: bytes, psk: bytes) -> None:
    async def main() -> None:
        await asyncio.gather(*(_full_duplex(identity, psk, [1, 70_000]) for _ in range(8)))

    asyncio.run(asyncio.wait_for(main(), 60))


def test_asyncio_handshake_errors(identity: bytes, psk: bytes) -> None:
    async def main() -> None:
        errors: list[BaseException] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            end = tls.MemoryTLS(tls.server_context({identity: psk}), server_side=True)
            stream = tls.AsyncTLSStream(end, reader, writer)
            try:
                await stream.handshake(timeout=10)
            except TLSError as exc:
                errors.append(exc)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        end = tls.MemoryTLS(tls.client_context(identity, os.urandom(32)), server_side=False)
        stream = tls.AsyncTLSStream(end, reader, writer)
        with pytest.raises(PSKMismatch):
            await stream.handshake(timeout=10)
        writer.close()
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        assert len(errors) == 1 and isinstance(errors[0], PSKMismatch)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_asyncio_handshake_timeout(identity: bytes, psk: bytes) -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never answers
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = tls.AsyncTLSStream(tls.MemoryTLS(tls.client_context(identity, psk), server_side=False), reader, writer)
        with pytest.raises(HandshakeTimeout):
            await stream.handshake(timeout=0.2)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_asyncio_both_ends_send_1_mib_at_once_small_socket_buffers(identity: bytes, psk: bytes) -> None:
    """Regression for the read-path drain deadlock: with small socket buffers both peers' transports
    fill up; a receiver that awaited drain() would never read again (verified to hang that way)."""

    def shrink(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 32768)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def one_shot(stream: tls.AsyncTLSStream, payload: bytes) -> bytes:
        async def receiver() -> bytes:
            got = bytearray()
            while len(got) < len(payload):
                chunk = await stream.recv()
                if not chunk:
                    break
                got += chunk
            return bytes(got)

        _, got = await asyncio.gather(stream.send(payload), receiver())  # one 1 MiB send: no pacing
        return got

    to_server, to_client = os.urandom(1 << 20), os.urandom(1 << 20)

    async def main() -> None:
        sctx, cctx = tls.server_context({identity: psk}), tls.client_context(identity, psk)
        received: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            shrink(writer)
            stream = tls.AsyncTLSStream(tls.MemoryTLS(sctx, server_side=True), reader, writer)
            await stream.handshake(timeout=10)
            received.append(await one_shot(stream, to_client))
            await stream.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            shrink(writer)
            stream = tls.AsyncTLSStream(tls.MemoryTLS(cctx, server_side=False), reader, writer)
            await stream.handshake(timeout=10)
            assert await one_shot(stream, to_server) == to_client
            await stream.close()
            for _ in range(500):
                if received:
                    break
                await asyncio.sleep(0.01)
        finally:
            server.close()
            await server.wait_closed()
        assert received == [to_server]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_altered_client_finished_is_reported_as_tampering_not_a_psk_problem(identity: bytes, psk: bytes) -> None:
    """The client finishes its handshake when it sends Finished; if that record is altered in
    transit the server refuses it, and the client learns only on its first read.  The peer had
    accepted the PSK by then, so the error must not blame the PSK."""
    from hybridkex.tls import MemoryTLS

    c = MemoryTLS(tls.client_context(identity, psk), server_side=False)
    s = MemoryTLS(tls.server_context({identity: psk}), server_side=True)
    assert c.do_handshake() is None
    s.receive_data(c.data_to_send())  # ClientHello
    assert s.do_handshake() is None
    c.receive_data(s.data_to_send())  # ServerHello ... server Finished
    assert c.do_handshake() is not None  # the client is done; its Finished is queued
    flight = bytearray(c.data_to_send())
    flight[-1] ^= 0x01  # one bit of the (encrypted) client Finished
    s.receive_data(bytes(flight))
    with pytest.raises(TLSError):
        s.do_handshake()
    c.receive_data(s.data_to_send())  # the server's alert
    with pytest.raises(TLSError) as info:
        while c.recv(100) is None:
            pass
    assert "after the handshake" in str(info.value)
    assert not isinstance(info.value, PSKRejected)
