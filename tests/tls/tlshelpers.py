"""Helpers for the TLS tests: a strict TLS 1.3 hello parser (wire checks), an in-memory
connection pair, and `openssl` CLI peers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from OpenSSL import SSL

from hybridkex.tls import MemoryTLS, TLSInfo

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

# RFC 8446 numbers.
HS_CLIENT_HELLO, HS_SERVER_HELLO, HS_CERTIFICATE, HS_NEW_SESSION_TICKET = 1, 2, 11, 4
EXT_PRE_SHARED_KEY, EXT_PSK_MODES, EXT_KEY_SHARE, EXT_SUPPORTED_GROUPS = 41, 45, 51, 10
PSK_KE, PSK_DHE_KE = 0, 1
GROUP_X25519, GROUP_X25519MLKEM768 = 0x001D, 0x11EC
CONTENT_HANDSHAKE = 22
HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated TLS message")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def vec(self, length_bytes: int) -> bytes:
        n = int.from_bytes(self.take(length_bytes), "big")
        return self.take(n)

    def done(self) -> bool:
        return self.pos == len(self.data)


@dataclass
class Hello:
    """A parsed ClientHello or ServerHello (extensions in wire order)."""

    msg_type: int
    extensions: list[tuple[int, bytes]]
    retry_request: bool = False

    def ext(self, ext_type: int) -> bytes | None:
        for t, body in self.extensions:
            if t == ext_type:
                return body
        return None

    def psk_modes(self) -> list[int]:
        body = self.ext(EXT_PSK_MODES)
        return [] if body is None else list(_Reader(body).vec(1))

    def key_share_groups(self) -> list[int]:
        """Groups of the key shares (ClientHello: all shares; ServerHello: the chosen one)."""
        body = self.ext(EXT_KEY_SHARE)
        if body is None:
            return []
        if self.msg_type == HS_SERVER_HELLO:
            return [_Reader(body).u16()]
        r = _Reader(_Reader(body).vec(2))
        groups = []
        while not r.done():
            groups.append(r.u16())
            r.vec(2)
        return groups

    def key_share_sizes(self) -> list[int]:
        body = self.ext(EXT_KEY_SHARE)
        if body is None or (self.msg_type == HS_SERVER_HELLO and self.retry_request):
            return []
        if self.msg_type == HS_SERVER_HELLO:
            r = _Reader(body)
            r.u16()
            return [len(r.vec(2))]
        r = _Reader(_Reader(body).vec(2))
        sizes = []
        while not r.done():
            r.u16()
            sizes.append(len(r.vec(2)))
        return sizes

    def psk_identities(self) -> list[bytes]:
        body = self.ext(EXT_PRE_SHARED_KEY)
        if body is None or self.msg_type != HS_CLIENT_HELLO:
            return []
        r = _Reader(_Reader(body).vec(2))
        ids = []
        while not r.done():
            ids.append(r.vec(2))
            r.take(4)
        return ids


def parse_hello(message: bytes) -> Hello:
    """Parse a handshake message (4-byte header included) that is a ClientHello or ServerHello."""
    r = _Reader(message)
    msg_type = r.u8()
    body = _Reader(r.vec(3))
    if not r.done() or msg_type not in (HS_CLIENT_HELLO, HS_SERVER_HELLO):
        raise ValueError("not a single hello message")
    body.take(2)  # legacy_version
    random = body.take(32)
    body.vec(1)  # session id
    if msg_type == HS_CLIENT_HELLO:
        body.vec(2)  # cipher suites
        body.vec(1)  # compression methods
    else:
        body.take(2)  # cipher suite
        body.take(1)  # compression method
    exts = _Reader(body.vec(2))
    if not body.done():
        raise ValueError("trailing bytes after extensions")
    extensions = []
    while not exts.done():
        t = exts.u16()
        extensions.append((t, exts.vec(2)))
    return Hello(msg_type, extensions, retry_request=msg_type == HS_SERVER_HELLO and random == HRR_RANDOM)


@dataclass
class MessageLog:
    """Collects handshake messages through a context's message_callback."""

    sent: list[bytes] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    def __call__(self, conn: SSL.Connection, sent: bool, content_type: int, data: bytes) -> None:
        if content_type == CONTENT_HANDSHAKE and len(data) >= 4:
            (self.sent if sent else self.received).append(data)

    def types(self, *, sent: bool) -> list[int]:
        return [m[0] for m in (self.sent if sent else self.received)]

    def hello(self, msg_type: int, *, sent: bool) -> Hello:
        for m in self.sent if sent else self.received:
            if m[0] == msg_type:
                return parse_hello(m)
        raise AssertionError(f"no handshake message {msg_type} {'sent' if sent else 'received'}")


@dataclass
class PairResult:
    client: TLSInfo | None
    server: TLSInfo | None
    client_error: BaseException | None
    server_error: BaseException | None
    client_tls: MemoryTLS
    server_tls: MemoryTLS


def pump(a: MemoryTLS, b: MemoryTLS) -> int:
    """Move every pending record between two MemoryTLS ends; the number of bytes moved."""
    moved = 0
    for x, y in ((a, b), (b, a)):
        out = x.data_to_send()
        if out:
            y.receive_data(out)
            moved += len(out)
    return moved


def memory_pair(
    client_ctx: SSL.Context,
    server_ctx: SSL.Context,
    *,
    client_psk: tuple[bytes, bytes] | None = None,
    server_psk: tuple[bytes, bytes] | None = None,
) -> PairResult:
    """Run a handshake between two MemoryTLS ends in this thread; errors are collected, not raised."""
    from hybridkex.tls import bind_psk

    c, s = MemoryTLS(client_ctx, server_side=False), MemoryTLS(server_ctx, server_side=True)
    if client_psk:
        bind_psk(c.connection, *client_psk)
    if server_psk:
        bind_psk(s.connection, *server_psk)
    infos: dict[str, TLSInfo | None] = {"c": None, "s": None}
    errors: dict[str, BaseException | None] = {"c": None, "s": None}
    for _ in range(16):  # a TLS 1.3 handshake needs at most 3 flights (+1 for an HRR)
        for name, end in (("c", c), ("s", s)):
            if infos[name] is None and errors[name] is None:
                try:
                    infos[name] = end.do_handshake()
                except Exception as exc:
                    errors[name] = exc
        if not pump(c, s) and all(infos[n] is not None or errors[n] is not None for n in "cs"):
            break
    return PairResult(infos["c"], infos["s"], errors["c"], errors["s"], c, s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recv_line(conn: SSL.Connection, limit: int = 4096) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        chunk = conn.recv(limit)
        if not chunk:
            break
        got += chunk
        if len(got) > limit:
            raise AssertionError("no newline from the peer")
    return got


@contextlib.contextmanager
def openssl_server(args: list[str], *, port: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`openssl s_server` on 127.0.0.1, ready to accept one connection; killed on exit."""
    port = port or free_port()
    cmd = [OPENSSL, "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-nocert", "-naccept", "1", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        for _ in range(20):  # a couple of banner lines, then ACCEPT
            line = proc.stdout.readline()
            if not line or line.strip() == b"ACCEPT":
                break
        else:
            raise AssertionError("openssl s_server never printed ACCEPT")
        if not line:
            raise AssertionError("openssl s_server exited before accepting")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def finish(proc: subprocess.Popen[bytes], timeout: float = 15) -> str:
    """Wait for an openssl process and return its remaining output."""
    if proc.stdin is not None and proc.stdin.closed:
        proc.stdin = None  # communicate() would flush it
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"openssl did not exit: {out.decode(errors='replace')[-2000:]}") from None
    return (out or b"").decode(errors="replace")


class Background:
    """Run ``fn`` in a thread; ``result()`` re-raises what it raised."""

    def __init__(self, fn: object, *args: object) -> None:
        self._result: object = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._result = fn(*args)  # type: ignore[operator]
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 20) -> object:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("background task did not finish")
        if self._error is not None:
            raise self._error
        return self._result
