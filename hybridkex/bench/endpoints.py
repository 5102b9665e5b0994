"""Both ends of every variant: built from plain specs, driven in memory or over a socket.

A client is described by a :class:`ClientSpec` (only strings, bytes and numbers, so it can be sent
to the client worker process) and built into a :class:`ClientKit`; the server side is a
:class:`ServerKit` built in the benchmark process.  Each kit offers

* ``memory_end()``: a fresh in-memory end for one handshake (no sockets), and
* ``handshake(sock)``: one handshake over a connected socket, returning what must be closed.

The hybridkex ends run the shipped path: the setup machines of :mod:`hybridkex.io.setup`
(:class:`~hybridkex.io.setup.ClientSetup` / :class:`~hybridkex.io.setup.ServerSetup`: the hybrid
handshake, its QKD requests and hooks, the PSK decision, TLS 1.3 or a reconnect), in memory; over
sockets :class:`hybridkex.HybridClient` and the server's per-connection ``accept``, which drive the
same machines.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from OpenSSL import SSL

from .. import tls
from ..exceptions import ConfigurationError, LocalProtocolError
from ..io import QKDKeyManager
from ..io.client import HybridClient
from ..io.config import ClientConfig, ReconnectPolicy, ServerConfig, SteadyPolicy, TLSOptions
from ..io.connection import accept
from ..io.reconnect import ReconnectTicket
from ..io.setup import NEED_DATA, BlockingCall, ClientSetup, Established, Failed, QKDRequest, ServerSetup, ServerState
from ..policy import KeyBudget, Policy, QKDConfig
from ..protocol import Authenticator, InitiatorConfig, PKIAuthenticator, PSKAuthenticator, SigningCredential
from ..qkd.base import KeySource
from ..qkd.client import ETSI014Client
from ..recycle import RecycledAuthenticator, SQLiteAuthKeyStore
from ..steady import SteadyTicket
from .stages import NullStages

__all__ = ["ClientKit", "ClientSpec", "End", "MemoryTLSEnd", "ServerKit", "pump"]

#: Bounds on the in-memory pump (a handshake that needs more exchanges is broken).
_MAX_EXCHANGES = 16
_SOCKET_TIMEOUT = 30.0


class End(Protocol):
    """One side of an in-memory handshake."""

    def step(self) -> bool:
        """Advance with the input received so far; True once this side's handshake is complete."""
        ...

    def outgoing(self) -> bytes:
        """Bytes to send to the peer now."""
        ...

    def incoming(self, data: bytes) -> None:
        """Bytes from the peer."""
        ...

    def facts(self) -> dict[str, Any]:
        """What the completed handshake established (public facts, to check the variant ran as
        described): TLS version, cipher and group; for hybridkex also suite, authentication mode,
        QKD use and whether it was a reconnect."""
        ...


class _Wire(Protocol):
    def record(self, direction: Any, nbytes: int) -> None: ...

    def client_done(self) -> None: ...


def pump(client: End, server: End, wire: _Wire | None = None) -> None:
    """Run one handshake between two in-memory ends, like a network would: each side consumes
    everything the other sent before it answers, so flights and round trips are real."""
    c_done = s_done = False
    for _ in range(_MAX_EXCHANGES):
        if not c_done:
            c_done = client.step()
            if c_done and wire is not None:
                wire.client_done()
        out = client.outgoing()
        if out:
            if wire is not None:
                wire.record("c2s", len(out))
            server.incoming(out)
        if not s_done:
            s_done = server.step()
        out = server.outgoing()
        if out:
            if wire is not None:
                wire.record("s2c", len(out))
            client.incoming(out)
        if c_done and s_done:
            return
    raise LocalProtocolError(f"the in-memory handshake did not finish within {_MAX_EXCHANGES} exchanges")


# --- baselines ---------------------------------------------------------------------------------------


class _StdlibEnd:
    def __init__(self, ctx: ssl.SSLContext, server_side: bool, host: str | None) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=host)

    def step(self) -> bool:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def outgoing(self) -> bytes:
        return self._out.read()

    def incoming(self, data: bytes) -> None:
        self._in.write(data)

    def facts(self) -> dict[str, Any]:
        cipher = self._obj.cipher()
        return {"tls_version": self._obj.version(), "tls_cipher": cipher[0] if cipher else None,
                "tls_group": None}  # the ssl module reports the group only from Python 3.15


class _PyOpenSSLEnd:
    def __init__(self, ctx: SSL.Context, server_side: bool, host: bytes | None) -> None:
        self.conn = SSL.Connection(ctx, None)
        if server_side:
            self.conn.set_accept_state()
        else:
            if host:
                self.conn.set_tlsext_host_name(host)
            self.conn.set_connect_state()

    def step(self) -> bool:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return False
        return True

    def outgoing(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(65536))
            except SSL.WantReadError:
                return b"".join(chunks)

    def incoming(self, data: bytes) -> None:
        self.conn.bio_write(data)

    def facts(self) -> dict[str, Any]:
        return {"tls_version": self.conn.get_protocol_version_name(), "tls_cipher": self.conn.get_cipher_name(),
                "tls_group": self.conn.get_group_name()}


class MemoryTLSEnd:
    """hybridkex.tls over memory BIOs (with its post-handshake verification)."""

    def __init__(self, tls_end: tls.MemoryTLS, stages: NullStages | None = None) -> None:
        self._tls = tls_end
        self._stages = stages or NullStages()

    def step(self) -> bool:
        self._stages.push("tls")
        try:
            return self._tls.do_handshake() is not None
        finally:
            self._stages.pop()

    def outgoing(self) -> bytes:
        return bytes(self._tls.data_to_send())

    def incoming(self, data: bytes) -> None:
        self._tls.receive_data(data)

    def facts(self) -> dict[str, Any]:
        return _tls_facts(self._tls)


def _tls_facts(end: tls.MemoryTLS | None) -> dict[str, Any]:
    info = end.info if end is not None else None
    if info is None:
        return {}
    return {"tls_version": info.version, "tls_cipher": info.cipher, "tls_group": info.group}


def stdlib_client_context(ca_path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca_path)
    return ctx


def stdlib_server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_path, key_path)
    ctx.num_tickets = 0  # no resumption anywhere in this comparison
    return ctx


def pyopenssl_context(server_side: bool, groups: str, *, ca_path: str = "", cert_path: str = "",
                      key_path: str = "") -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server_side else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if server_side:
        ctx.use_certificate_file(cert_path)
        ctx.use_privatekey_file(key_path)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    else:
        ctx.set_verify(SSL.VERIFY_PEER)
        ctx.load_verify_locations(ca_path)
    tls.set_groups(ctx, groups)  # pyOpenSSL has no public group setter
    return ctx


# --- hybridkex ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KMEClientSpec:
    """How to reach this side's KME (ETSI GS QKD 014 over mutual TLS)."""

    url: str
    cert: str
    key: str
    ca: str
    sae_id: str
    kme_id: str


@dataclass(frozen=True)
class ClientSpec:
    """Everything a client needs, as plain data (sent to the worker process as JSON)."""

    kind: str
    groups: str | None = None
    # certificate baselines
    ca_path: str = ""
    server_host: str = ""
    # TLS-PSK baseline
    psk_identity: bytes = b""
    psk: bytes = b""
    # hybridkex
    identity: str = ""
    peer_identity: str = ""
    auth: str = "psk"
    auth_psk: bytes = b""
    #: DER trust anchors, one per algorithm name.
    anchors: dict[str, bytes] = field(default_factory=dict)
    #: Credentials: algorithm name -> (leaf certificate DER, PKCS#8 private key DER).
    credentials: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    suite: str = ""
    qkd: str = "none"
    budget: str = "fresh"
    sae_id: str = ""
    kme_id: str = ""
    kme: KMEClientSpec | None = None
    reconnect: bool = False
    steady: bool = False
    recycle_store: str = ""
    tls_groups: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes as hex)."""
        return {
            "kind": self.kind, "groups": self.groups, "ca_path": self.ca_path, "server_host": self.server_host,
            "psk_identity": self.psk_identity.hex(), "psk": self.psk.hex(), "identity": self.identity,
            "peer_identity": self.peer_identity, "auth": self.auth, "auth_psk": self.auth_psk.hex(),
            "anchors": {k: v.hex() for k, v in self.anchors.items()},
            "credentials": {k: [c.hex(), p.hex()] for k, (c, p) in self.credentials.items()},
            "suite": self.suite, "qkd": self.qkd, "budget": self.budget, "sae_id": self.sae_id,
            "kme_id": self.kme_id, "kme": None if self.kme is None else vars(self.kme),
            "reconnect": self.reconnect, "steady": self.steady, "recycle_store": self.recycle_store,
            "tls_groups": self.tls_groups,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClientSpec:
        return cls(
            kind=d["kind"], groups=d["groups"], ca_path=d["ca_path"], server_host=d["server_host"],
            psk_identity=bytes.fromhex(d["psk_identity"]), psk=bytes.fromhex(d["psk"]), identity=d["identity"],
            peer_identity=d["peer_identity"], auth=d["auth"], auth_psk=bytes.fromhex(d["auth_psk"]),
            anchors={k: bytes.fromhex(v) for k, v in d["anchors"].items()},
            credentials={k: (bytes.fromhex(c), bytes.fromhex(p)) for k, (c, p) in d["credentials"].items()},
            suite=d["suite"], qkd=d["qkd"], budget=d["budget"], sae_id=d["sae_id"], kme_id=d["kme_id"],
            kme=None if d["kme"] is None else KMEClientSpec(**d["kme"]), reconnect=d["reconnect"], steady=d["steady"],
            recycle_store=d["recycle_store"], tls_groups=d["tls_groups"],
        )


def pki_from_material(mode: str, anchors: dict[str, bytes],
                      credentials: dict[str, tuple[bytes, bytes]]) -> PKIAuthenticator:
    """A PKI authenticator from DER material (``mode``: pki-ed25519, pki-mldsa65, pki-hybrid)."""
    algs = ("ed25519", "mldsa65") if mode == "pki-hybrid" else (mode.removeprefix("pki-"),)
    creds: dict[str, SigningCredential] = {}
    for alg in algs:
        cert_der, key_der = credentials[alg]
        key = serialization.load_der_private_key(key_der, None)
        if not isinstance(key, ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey):
            raise ConfigurationError(f"the {alg} credential holds a {type(key).__name__}", field="pki")
        creds[alg] = SigningCredential((x509.load_der_x509_certificate(cert_der),), key)
    return PKIAuthenticator([x509.load_der_x509_certificate(anchors[a]) for a in algs],
                            ed25519=creds.get("ed25519"), mldsa65=creds.get("mldsa65"))


def key_budget(mode: str) -> KeyBudget:
    return KeyBudget(mode="epoch") if mode == "epoch" else KeyBudget()


def steady_policy(enabled: bool) -> SteadyPolicy:
    """The steady state with the library's defaults, limits raised so that a benchmark run never needs
    a second full handshake; off for every other variant (each measures what its id says)."""
    return SteadyPolicy(enabled=enabled, max_uses=2**31, lifetime=24 * 3600.0)


def reconnect_policy(enabled: bool) -> ReconnectPolicy:
    """Reconnects on, with limits high enough that a benchmark run never needs a second full
    handshake (so a reconnect variant measures reconnects); off otherwise (the default)."""
    if not enabled:
        return ReconnectPolicy()
    return ReconnectPolicy(enabled=True, max_uses=65536, lifetime=24 * 3600.0)


def prepare(sock: socket.socket) -> None:
    """TCP_NODELAY (handshake flights are small writes) and kernel timeouts on a blocking socket, so
    that a blocking handshake (pyOpenSSL, stdlib ssl) can never hang when the peer vanishes."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket
    tv = struct.pack("ll", int(_SOCKET_TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class _Closing:
    """Closes a baseline's TLS object and its socket together."""

    def __init__(self, conn: Any, sock: socket.socket) -> None:
        self._objs = (conn, sock)

    def close(self) -> None:
        for obj in self._objs:
            with contextlib.suppress(Exception):
                obj.close()


class _SetupEnd:
    """One side of a hybridkex connection setup in memory: the setup machine that
    :func:`hybridkex.connect` and the servers run (:mod:`hybridkex.io.setup`), driven as their
    drivers do, except that its blocking calls (QKD requests, hooks) run inline, so that one thread
    measures both ends.  A client's machine reconnects while its ticket lasts."""

    def __init__(self, machine: ClientSetup | ServerSetup, stages: NullStages,
                 on_ticket: Callable[[ReconnectTicket | SteadyTicket | None], None] | None = None) -> None:
        self._machine = machine
        self._stages = stages
        self._on_ticket = on_ticket
        self._pending = b""
        self._established: Established | None = None

    def incoming(self, data: bytes) -> None:
        self._machine.receive_data(data)

    def outgoing(self) -> bytes:
        out, self._pending = self._pending + self._machine.data_to_send(), b""
        return out

    def step(self) -> bool:
        machine, st = self._machine, self._stages
        while self._established is None:
            st.push("tls" if machine.stage == "tls" else "other")
            try:
                event = machine.next_event()
            finally:
                st.pop()
            self._pending += machine.data_to_send()  # what a driver sends before acting on the event
            if event is NEED_DATA:
                return False
            if isinstance(event, BlockingCall):
                st.push("kme" if isinstance(event, QKDRequest) else "auth")
                try:
                    value = event.run()
                except Exception as exc:
                    machine.call_failed(exc)
                else:
                    machine.call_done(value)
                finally:
                    st.pop()
            elif isinstance(event, Established):
                self._established = event
                if self._on_ticket is not None:
                    self._on_ticket(event.ticket)
            elif isinstance(event, Failed):
                raise event.error
            else:  # pragma: no cover - HandshakeDone stays inside the setup machines
                raise LocalProtocolError(f"unexpected setup event {event!r}")
        return True

    def facts(self) -> dict[str, Any]:
        est = self._established
        if est is None:
            return {}
        i = est.info
        return {"tls_version": est.tls_info.version, "tls_cipher": est.tls_info.cipher,
                "tls_group": est.tls_info.group, "reconnect": est.reconnect_index is not None, "suite": i.suite,
                "auth_mode": i.auth_mode, "qkd_used": i.qkd_used, "qkd_usage": i.qkd_usage,
                "components": [c.name for c in i.components]}


class ClientKit:
    """A client built from a :class:`ClientSpec` (contexts and configurations made once).

    ``key_source`` overrides the spec's KME (the in-memory link, which cannot travel as data).
    """

    def __init__(self, spec: ClientSpec, key_source: KeySource | None = None) -> None:
        self.spec = spec
        self._owned: list[Any] = []
        kind = spec.kind
        if kind == "stdlib-cert":
            self._stdlib = stdlib_client_context(spec.ca_path)
        elif kind == "pyopenssl-cert":
            self._pyo = pyopenssl_context(False, spec.groups or "X25519", ca_path=spec.ca_path)
        elif kind == "tls-psk":
            self._psk_ctx = tls.client_context(spec.psk_identity, spec.psk)
        elif kind == "hybridkex":
            self.config = ClientConfig(self._initiator_config(spec), tls=TLSOptions(groups=spec.tls_groups),
                                       reconnect=reconnect_policy(spec.reconnect), steady=steady_policy(spec.steady))
            self.keys: QKDKeyManager | None = None
            source = key_source
            if source is None and spec.kme is not None:
                k = spec.kme
                source = ETSI014Client(k.url, cert=k.cert, key=k.key, ca=k.ca, sae_id=k.sae_id, kme_id=k.kme_id)
                self._owned.append(source)
            if source is not None:
                self.keys = QKDKeyManager(source, key_budget(spec.budget))
            # The public client: one long-lived key manager, and reconnect tickets when enabled.
            self.client = HybridClient(self.config, key_source=self.keys)
            self._owned.append(self.client)
            self._ticket: ReconnectTicket | SteadyTicket | None = None
        else:
            raise ConfigurationError(f"unknown client kind {kind!r}", field="kind")

    def _initiator_config(self, spec: ClientSpec) -> InitiatorConfig:
        auths: tuple[Authenticator, ...]
        if spec.auth == "psk":
            auths = (PSKAuthenticator({spec.peer_identity: spec.auth_psk}),)
        elif spec.auth == "recycled":
            store = SQLiteAuthKeyStore(spec.recycle_store)
            self._owned.append(store)
            auths = (RecycledAuthenticator(store), PSKAuthenticator({spec.peer_identity: spec.auth_psk}))
        else:
            auths = (pki_from_material(spec.auth, spec.anchors, spec.credentials),)
        uses_qkd = spec.qkd != "none"
        policy = Policy(suites=(spec.suite,), qkd="required" if uses_qkd else "disabled",  # type: ignore[arg-type]
                        key_budget=key_budget(spec.budget))
        qkd = QKDConfig(spec.sae_id, spec.kme_id) if uses_qkd else None
        return InitiatorConfig(spec.identity, auths, policy, qkd, peer_identity=spec.peer_identity)

    def memory_end(self, stages: NullStages | None = None) -> End:
        kind = self.spec.kind
        if kind == "stdlib-cert":
            return _StdlibEnd(self._stdlib, False, self.spec.server_host)
        if kind == "pyopenssl-cert":
            return _PyOpenSSLEnd(self._pyo, False, self.spec.server_host.encode())
        if kind == "tls-psk":
            return MemoryTLSEnd(tls.MemoryTLS(self._psk_ctx, server_side=False))
        ticket = self._ticket if self.spec.reconnect or self.spec.steady else None
        return _SetupEnd(ClientSetup(self.config, self.keys, ticket=ticket), stages or NullStages(),
                         on_ticket=self._keep_ticket)

    def _keep_ticket(self, ticket: ReconnectTicket | SteadyTicket | None) -> None:
        if ticket is not None:
            if self._ticket is not None:
                self._ticket.erase()
            self._ticket = ticket
            if isinstance(ticket, SteadyTicket):
                ticket.refill()  # as HybridClient does when it keeps a ticket

    def connect(self, address: tuple[str, int]) -> Any:
        """One connection set up to ``address`` (TCP connect included); returns what to close."""
        if self.spec.kind == "hybridkex":
            return self.client.connect(address, timeout=_SOCKET_TIMEOUT)
        sock = socket.create_connection(address, timeout=_SOCKET_TIMEOUT)
        try:
            prepare(sock)
            conn = self.handshake(sock)
        except BaseException:
            sock.close()
            raise
        return _Closing(conn, sock)

    def handshake(self, sock: socket.socket) -> Any:
        """One client handshake of a TLS baseline over the connected ``sock``; returns the object to close."""
        kind = self.spec.kind
        if kind == "stdlib-cert":
            return self._stdlib.wrap_socket(sock, server_hostname=self.spec.server_host)
        if kind == "pyopenssl-cert":
            conn = SSL.Connection(self._pyo, sock)
            conn.set_tlsext_host_name(self.spec.server_host.encode())
            conn.set_connect_state()
            conn.do_handshake()
            return conn
        if kind == "tls-psk":
            conn, _ = tls.wrap_socket(self._psk_ctx, sock, server_side=False, timeout=_SOCKET_TIMEOUT)
            return conn
        raise LocalProtocolError("hybridkex clients connect through hybridkex.HybridClient (connect())")

    def close(self) -> None:
        for obj in self._owned:
            with contextlib.suppress(Exception):
                obj.close()


class ServerKit:
    """The server side of one variant (built in the benchmark process)."""

    def __init__(self, kind: str, *, groups: str | None = None, cert_path: str = "", key_path: str = "",
                 psk_table: dict[bytes, bytes] | None = None, config: ServerConfig | None = None,
                 keys: QKDKeyManager | None = None) -> None:
        self.kind = kind
        if kind == "stdlib-cert":
            self._stdlib = stdlib_server_context(cert_path, key_path)
        elif kind == "pyopenssl-cert":
            self._pyo = pyopenssl_context(True, groups or "X25519", cert_path=cert_path, key_path=key_path)
        elif kind == "tls-psk":
            self._psk_ctx = tls.server_context(psk_table or {})
        elif kind == "hybridkex":
            if config is None:
                raise ConfigurationError("a hybridkex server needs a ServerConfig", field="config")
            self.config = config
            self.keys = keys
            # What serve()/HybridServer keep across connections: key manager, reconnect registry.
            self.state = ServerState(config, keys)
        else:
            raise ConfigurationError(f"unknown server kind {kind!r}", field="kind")

    def memory_end(self, stages: NullStages | None = None) -> End:
        kind = self.kind
        if kind == "stdlib-cert":
            return _StdlibEnd(self._stdlib, True, None)
        if kind == "pyopenssl-cert":
            return _PyOpenSSLEnd(self._pyo, True, None)
        if kind == "tls-psk":
            return MemoryTLSEnd(tls.MemoryTLS(self._psk_ctx, server_side=True))
        return _SetupEnd(ServerSetup(self.state), stages or NullStages())

    def finish(self, conn: Any) -> None:
        """Wait (bounded) until the client closes ``conn``, as a server reading a request would, so
        that closing never races the client's end of the handshake."""
        if self.kind == "hybridkex":
            conn.settimeout(_SOCKET_TIMEOUT)
        with contextlib.suppress(Exception):  # EOF, close_notify or a reset: the client is gone
            conn.recv(1)

    def handshake(self, sock: socket.socket) -> Any:
        """One server handshake over the accepted ``sock``; returns the object to close.

        hybridkex runs the server's real per-connection path, ``hybridkex.io.connection.accept``
        (what :class:`hybridkex.HybridServer` runs in each connection's thread)."""
        kind = self.kind
        if kind == "stdlib-cert":
            return self._stdlib.wrap_socket(sock, server_side=True)
        if kind == "pyopenssl-cert":
            conn = SSL.Connection(self._pyo, sock)
            conn.set_accept_state()
            conn.do_handshake()
            return conn
        if kind == "tls-psk":
            conn, _ = tls.wrap_socket(self._psk_ctx, sock, server_side=True, timeout=_SOCKET_TIMEOUT)
            return conn
        return accept(sock, self.state)
