"""Helpers for the connect/serve tests: matching configurations over an in-memory QKD link
(MemoryKeyLink, the QKD stand-in), a small Ed25519 PKI, a recording TCP proxy, and handlers."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hybridkex import KeyBudget, Policy, QKDConfig, Timeouts
from hybridkex.api import ClientConfig, HybridServer, HybridSocket, ReconnectPolicy, ServerConfig, TLSOptions
from hybridkex.exceptions import HybridKEXError
from hybridkex.io.config import SteadyPolicy
from hybridkex.protocol import InitiatorConfig, PKIAuthenticator, PSKAuthenticator, ResponderConfig, SigningCredential
from hybridkex.qkd import MemoryKeyLink

CLIENT_ID = "client.example"
SERVER_ID = "server.example"
CLIENT_SAE = "sae-client"
SERVER_SAE = "sae-server"
#: Bounds every wait in these tests (never a timing assertion: only a hang guard).
WAIT = 30.0


@dataclass
class Setup:
    """A matching client/server configuration pair over one in-memory QKD link."""

    client: ClientConfig
    server: ServerConfig
    link: MemoryKeyLink
    psk: bytes = field(repr=False)

    @property
    def client_keys(self) -> Any:
        """The client SAE's key source (a fresh view; the link holds the state)."""
        return self.link.source(CLIENT_SAE, 0)

    @property
    def server_keys(self) -> Any:
        return self.link.source(SERVER_SAE, 1)


def make_setup(*, reconnect: ReconnectPolicy | None = None, server_reconnect: ReconnectPolicy | None = None,
               client_psk: bytes | None = None, qkd: str = "required", suites: tuple[str, ...] = (),
               server_timeout: float = 10.0, client_timeout: float = 10.0, kme_timeout: float = 5.0,
               max_connections: int = 256, tls: TLSOptions | None = None, auth: str = "psk",
               budget: KeyBudget | None = None, steady: SteadyPolicy | None = None,
               server_steady: SteadyPolicy | None = None) -> Setup:
    """Configurations for CLIENT_ID <-> SERVER_ID with PSK (or PKI) authentication and QKD.

    The steady state is on (the default) unless ``reconnect`` is given: those tests are about
    reconnects, which a client with the steady state on does not use."""
    psk = os.urandom(32)
    link = MemoryKeyLink(("kme-client", "kme-server"))
    timeouts = Timeouts(handshake=min(server_timeout, client_timeout), kme=kme_timeout)
    policy = Policy(suites=suites, qkd=qkd, timeouts=timeouts, key_budget=budget or KeyBudget())  # type: ignore[arg-type]
    with_qkd = qkd != "disabled"
    if auth == "psk":
        ini_auth: Any = PSKAuthenticator({SERVER_ID: client_psk or psk})
        res_auth: Any = PSKAuthenticator({CLIENT_ID: psk})
    else:
        ini_auth = pki_authenticator(CLIENT_ID, "client")
        res_auth = pki_authenticator(SERVER_ID, "server")
    ini = InitiatorConfig(CLIENT_ID, (ini_auth,), policy,
                          QKDConfig(CLIENT_SAE, "kme-client") if with_qkd else None, peer_identity=SERVER_ID)
    res = ResponderConfig(SERVER_ID, (res_auth,), policy, QKDConfig(SERVER_SAE, "kme-server") if with_qkd else None)
    rc = reconnect or ReconnectPolicy()
    st = steady or SteadyPolicy(enabled=reconnect is None)
    client = ClientConfig(ini, tls=tls or TLSOptions(), reconnect=rc, timeout=client_timeout, steady=st)
    server = ServerConfig(res, tls=tls or TLSOptions(), reconnect=server_reconnect or rc, timeout=server_timeout,
                          max_connections=max_connections, steady=server_steady or st)
    return Setup(client, server, link, psk)


# --- a tiny Ed25519 PKI ------------------------------------------------------------------------------

_PKI: dict[str, Any] = {}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca() -> tuple[x509.Certificate, ed25519.Ed25519PrivateKey]:
    if "ca" not in _PKI:
        key = ed25519.Ed25519PrivateKey.generate()
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name("io test CA")).issuer_name(_name("io test CA"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, None))
        _PKI["ca"] = (cert, key)
    ca: tuple[x509.Certificate, ed25519.Ed25519PrivateKey] = _PKI["ca"]
    return ca


def pki_authenticator(identity: str, role: str) -> PKIAuthenticator:
    """Ed25519 certificate authentication for ``identity`` under the shared test CA."""
    ca_cert, ca_key = _ca()
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder().subject_name(_name(identity)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, None))
    return PKIAuthenticator([ca_cert], ed25519=SigningCredential((cert,), key))


# --- servers and handlers --------------------------------------------------------------------------


def echo_handler(conn: HybridSocket, address: Any) -> None:
    """Echo until the peer's close_notify."""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


@contextlib.contextmanager
def running_server(setup: Setup, handler: Any = echo_handler, **kwargs: Any) -> Iterator[HybridServer]:
    """A HybridServer on 127.0.0.1 serving from a background thread, closed afterwards."""
    server = HybridServer(("127.0.0.1", 0), setup.server, handler, key_source=setup.server_keys, **kwargs)
    server.start(poll_interval=0.05)
    try:
        yield server
    finally:
        server.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recv_all(conn: Any, limit: int = 64 * 1024 * 1024) -> bytes:
    """Read until EOF (close_notify)."""
    buf = bytearray()
    while len(buf) <= limit:
        chunk = conn.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise AssertionError("peer sent more than expected")


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that forwards to ``target`` and records what each client sent first.

    ``first_bytes`` holds the first byte of every connection (the demux byte) and ``client_flights``
    the first chunk each client sent (e.g. a reconnect's ClientHello), for replay tests.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = self.listener.getsockname()
        self.first_bytes: list[int] = []
        self.client_flights: list[bytes] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(target=self._loop, daemon=True)
        self._accept.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=WAIT)
            client.settimeout(WAIT)
            with self._lock:
                self._socks += [client, upstream]
            record: list[bytes] = []
            for src, dst, rec in ((client, upstream, record), (upstream, client, None)):
                t = threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, record: list[bytes] | None) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if record is not None and not record:
                    record.append(data)
                    with self._lock:
                        self.first_bytes.append(data[0] if data else -1)
                        self.client_flights.append(data)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._accept.join(WAIT)
        self.listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()
        for t in self._threads:
            t.join(WAIT)

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlowKeySource:
    """Wraps a key source and sleeps before answering (a slow KME)."""

    def __init__(self, inner: Any, delay: float, stop: threading.Event | None = None) -> None:
        self._inner = inner
        self._delay = delay
        self._stop = stop or threading.Event()

    @property
    def sae_id(self) -> str:
        return str(self._inner.sae_id)

    @property
    def kme_id(self) -> str:
        return str(self._inner.kme_id)

    def get_keys(self, *args: Any, **kwargs: Any) -> Any:
        self._stop.wait(self._delay)
        return self._inner.get_keys(*args, **kwargs)

    def get_keys_by_id(self, *args: Any, **kwargs: Any) -> Any:
        self._stop.wait(self._delay)
        return self._inner.get_keys_by_id(*args, **kwargs)

    def status(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.status(*args, **kwargs)


class AsyncKeys:
    """An asyncio key source (AsyncKeySource) over a blocking one, counting calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls = 0

    @property
    def sae_id(self) -> str:
        return str(self._inner.sae_id)

    @property
    def kme_id(self) -> str:
        return str(self._inner.kme_id)

    async def get_keys(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._inner.get_keys(*args, **kwargs)

    async def get_keys_by_id(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._inner.get_keys_by_id(*args, **kwargs)

    async def status(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.status(*args, **kwargs)


def recording_handler(log: Any) -> Any:
    """A server handler that puts each connection's session on ``log`` (a queue), then echoes."""
    def handler(conn: HybridSocket, address: Any) -> None:
        log.put(conn.session)
        echo_handler(conn, address)

    return handler


def echo_once(sock: HybridSocket, payload: bytes = b"ping") -> bytes:
    """Send ``payload`` and return what comes back (one read)."""
    sock.settimeout(WAIT)
    sock.sendall(payload)
    return sock.recv(100)


def echo_on(side: Any, n: int = 3) -> Any:
    """A plain asyncio handler (for ``asyncio.start_server``) that sets up a hybridkex connection on
    ``side`` (a :class:`hybridkex.io.aio.ServerSide`) and echoes ``n`` bytes; a failed setup closes."""
    from hybridkex.io.aio import accept_on_streams

    async def serve(reader: Any, writer: Any) -> None:
        try:
            hreader, hwriter = await accept_on_streams(reader, writer, side)
        except (HybridKEXError, OSError):
            writer.close()
            return
        hwriter.write(await hreader.readexactly(n))
        await hwriter.drain()
        await hwriter.aclose()
    return serve
