"""Connection setup as a sans-IO state machine: bytes in, events out, one machine per role.

Everything between "TCP is connected" and "TLS is verified" happens here, once, for every driver
(blocking, asyncio, the tunnel, the benchmark), in the style of wsproto's ``WSConnection``:

* :class:`ClientSetup`: the hybrid handshake as initiator (or a reconnect straight to TLS with a
  ticket's PSK), the authenticators' ``after_handshake`` hooks, the TLS PSK and reconnect ticket,
  then TLS 1.3 on a :class:`~hybridkex.tls.MemoryTLS`;
* :class:`ServerSetup`: the first-byte demux (``"H"`` starts a hybrid Hello, ``0x16`` a reconnect's
  ClientHello), the responder, the hooks, the PSK and reconnect registry, then TLS.

A driver loops::

    event = setup.next_event()
    send(setup.data_to_send())            # always, before acting on the event
    NEED_DATA    -> setup.receive_data(read up to setup.read_size() bytes, within setup.timeout())
    QKDRequest / RunHooks -> run event.run() off the event loop within event.timeout, then
                    setup.call_done(value) or setup.call_failed(exc)
    Established  -> wrap event.tls (it holds every byte received so far) in the driver's socket/stream
    Failed       -> (after a best-effort send) optionally read until the peer closes, raise event.error

and reports its own failures (deadline passed, connection lost) with :meth:`fail`, which returns
the :class:`Failed` to handle.  The machine never does I/O, never blocks and never raises from
:meth:`next_event`; a failure is an event, with the Abort or TLS alert for the peer queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..exceptions import HandshakeTimeout, LocalProtocolError, RemoteProtocolError
from ..protocol import MAGIC, Initiator, InitiatorConfig, Responder
from ..tls import MemoryTLS
from ..tls.pyopenssl import bind_psk, bind_psk_lookup
from ._events import (
    NEED_DATA,
    BlockingCall,
    Established,
    Failed,
    HandshakeDone,
    QKDRequest,
    RunHooks,
    SetupEvent,
)
from ._hybrid import READ_SIZE, HybridStage
from ._plumbing import (
    Deadline,
    ReconnectLookup,
    ServerState,
    check_key_source,
    check_server_first_bytes,
    client_keys,
    key_manager,
    server_keys,
    tls_context,
)
from ._tlsstage import TLSStage
from .config import ClientConfig
from .keys import KeySourceArg
from .reconnect import TLS_HANDSHAKE_BYTE, TLS_RECORD_HEADER_LEN, client_hello_cipher, tls_record_length

if TYPE_CHECKING:
    from ..protocol import Session
    from .keys import QKDKeyManager
    from .reconnect import ReconnectKey, ReconnectTicket

__all__ = [
    "NEED_DATA",
    "BlockingCall",
    "ClientSetup",
    "Established",
    "Failed",
    "HandshakeDone",
    "QKDRequest",
    "RunHooks",
    "ServerSetup",
    "ServerState",
    "SetupEvent",
]

_Stage = HybridStage | TLSStage


class _Setup:
    """What both roles share: the current stage, and moving on from a finished hybrid handshake."""

    def __init__(self) -> None:
        self._stage: _Stage | None = None
        self._final: Established | Failed | None = None

    @property
    def stage(self) -> str:
        """``"first byte"``, ``"hybrid"``, ``"tls"``, ``"established"`` or ``"failed"``."""
        if isinstance(self._final, Established):
            return "established"
        if self._final is not None:
            return "failed"
        if self._stage is None:
            return "first byte"
        return "tls" if isinstance(self._stage, TLSStage) else "hybrid"

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` when it closed the connection."""
        if self._final is None and self._stage is not None:
            self._stage.receive_data(data)

    def data_to_send(self) -> bytes:
        """Bytes to send to the peer now (hybrid frames, TLS records, an Abort or an alert)."""
        return self._stage.data_to_send() if self._stage is not None else b""

    def read_size(self) -> int:
        """How many bytes to read at most (the machine keeps whatever belongs to the next stage)."""
        return READ_SIZE

    def timeout(self) -> float:
        """Seconds the driver may wait for the peer now (<= 0: call :meth:`fail` with TimeoutError)."""
        return self._stage.timeout() if self._stage is not None else 0.0

    def call_done(self, value: object) -> None:
        """The outstanding :class:`QKDRequest` / :class:`RunHooks` returned ``value``."""
        self._hybrid().call_done(value)

    def call_failed(self, exc: Exception) -> None:
        """The outstanding :class:`QKDRequest` / :class:`RunHooks` raised ``exc``."""
        self._hybrid().call_failed(exc)

    def fail(self, exc: BaseException) -> Failed:
        """The driver's own failure (a deadline passed: TimeoutError; the connection broke: OSError)."""
        if self._final is None:
            self._final = self._stage.fail(exc) if self._stage is not None else Failed(exc)
        return self._final if isinstance(self._final, Failed) else Failed(exc)

    def next_event(self) -> SetupEvent:
        """What the driver must do next (see the module docstring)."""
        if self._final is not None:
            if isinstance(self._final, Established):
                raise LocalProtocolError("the connection is established; setup has no more events")
            return self._final
        event = self._advance()
        if isinstance(event, Established | Failed):
            self._final = event
        return event

    def _hybrid(self) -> HybridStage:
        if not isinstance(self._stage, HybridStage):
            raise LocalProtocolError("there is no outstanding call to answer")
        return self._stage

    def _advance(self) -> SetupEvent:
        stage = self._stage
        if stage is None:
            return self._begin()
        event = stage.next_event()
        if isinstance(event, HandshakeDone):
            assert isinstance(stage, HybridStage)
            try:
                tls = self._tls_after(event.session)
            except Exception as exc:  # e.g. a TLS option OpenSSL refuses: the secret must not outlive it
                event.session.erase()
                return Failed(exc)
            tls.carry(stage.data_to_send(), *stage.handover())
            self._stage = tls
            return tls.next_event()
        return event

    def _begin(self) -> SetupEvent:  # pragma: no cover - each role starts its first stage itself
        raise NotImplementedError

    def _tls_after(self, session: Session) -> TLSStage:  # pragma: no cover - each role derives its own PSK
        raise NotImplementedError


class ClientSetup(_Setup):
    """The client side of one connection's setup.

    Args:
        config: a :class:`ClientConfig` (or a bare :class:`~hybridkex.protocol.InitiatorConfig`).
        key_source: a :class:`~hybridkex.io.QKDKeyManager` (required for an epoch key budget) or a
            blocking :class:`~hybridkex.qkd.KeySource` (asyncio drivers bridge an
            :class:`~hybridkex.qkd.AsyncKeySource` first); None only when the policy disables QKD.
        ticket: a reconnect ticket: while it is usable the connection goes straight to TLS.
        timeout: the whole setup's deadline in seconds (default ``config.timeout``), from now: the
            driver's TCP connect takes its share (:meth:`connect_timeout`).
        randbytes, clock: passed to the handshake core (tests inject deterministic ones).

    Raises:
        ConfigurationError: at once, when a full handshake could only fail for want of a key source
            (or the key source does not fit the key budget).
    """

    def __init__(self, config: ClientConfig | InitiatorConfig, key_source: KeySourceArg = None, *,
                 ticket: ReconnectTicket | None = None, timeout: float | None = None,
                 randbytes: Callable[[int], bytes] | None = None, clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.config = ClientConfig.coerce(config)
        self._deadline = Deadline(self.config.timeout if timeout is None else timeout)
        self._core_args = (randbytes, clock)
        self._reconnect: ReconnectKey | None = ticket.take() if ticket is not None else None
        self._keys: QKDKeyManager | None = None
        if self._reconnect is None:
            check_key_source(self.config, key_source)
            self._keys = key_manager(key_source, self.config.handshake.policy)

    @property
    def reconnect(self) -> bool:
        """Whether this setup is a reconnect (TLS only, with a ticket's PSK)."""
        return self._reconnect is not None

    def connect_timeout(self) -> float:
        """Seconds the TCP connect may take (HandshakeTimeout once the deadline passed)."""
        return self._deadline.remaining("TCP connect")

    def _begin(self) -> SetupEvent:
        cfg = self.config
        key = self._reconnect
        if key is not None:
            tls = MemoryTLS(tls_context("client", key.cipher, cfg.tls, reconnect=True), server_side=False)
            bind_psk(tls.connection, key.identity, key.psk)
            self._stage = TLSStage(tls, self._deadline.stage("the TLS handshake (reconnect)", cfg.tls.timeout),
                                   key.info, reconnect_index=key.index)
        else:
            hs = cfg.handshake
            randbytes, clock = self._core_args
            self._stage = HybridStage(
                Initiator(hs, randbytes=randbytes, clock=clock), hs, self._keys,
                self._deadline.stage("the hybrid handshake", hs.policy.timeouts.handshake))
        return self._stage.next_event()

    def _tls_after(self, session: Session) -> TLSStage:
        cfg = self.config
        keys = client_keys(session, cfg.reconnect)
        ticket = keys.ticket
        tls = MemoryTLS(tls_context("client", keys.cipher, cfg.tls), server_side=False)
        bind_psk(tls.connection, keys.identity, keys.psk)
        return TLSStage(tls, self._deadline.stage("the TLS handshake", cfg.tls.timeout), session.info,
                        ticket=ticket, check_first=check_server_first_bytes,
                        on_failure=ticket.erase if ticket is not None else None)


class ServerSetup(_Setup):
    """The server side of one accepted connection's setup; ``state`` is what the server keeps across
    connections (configuration, key manager, reconnect registry).  The deadline starts now."""

    def __init__(self, state: ServerState, *, randbytes: Callable[[int], bytes] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        self._state = state
        self._deadline = Deadline(state.config.timeout)
        #: What the server waits for before TLS or the hybrid stage starts: the first byte, then (on
        #: a reconnect) the rest of the ClientHello, which is part of the reconnect's TLS stage.
        self._waiting = self._deadline.stage("waiting for the client's first byte")
        self._reconnecting = False
        self._core_args = (randbytes, clock)
        self._buffer = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if self._stage is not None or self._final is not None:
            super().receive_data(data)
        elif data:
            self._buffer += data
        else:
            self._eof = True

    def timeout(self) -> float:
        return self._waiting.end - time.monotonic() if self._stage is None else super().timeout()

    def fail(self, exc: BaseException) -> Failed:
        if self._stage is None and self._final is None:
            if isinstance(exc, TimeoutError) and not isinstance(exc, HandshakeTimeout):
                exc = self._waiting.timeout_error()
            elif isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                exc = RemoteProtocolError(f"the connection to the peer failed before the handshake: {exc}")
        return super().fail(exc)

    def _begin(self) -> SetupEvent:
        if self._reconnecting:
            return self._begin_reconnect()
        if not self._buffer:
            if self._eof:
                return Failed(RemoteProtocolError("the peer closed the connection without sending anything"))
            return NEED_DATA
        first = self._buffer[0]
        if first == MAGIC[0]:
            return self._begin_hybrid()
        if first == TLS_HANDSHAKE_BYTE:
            self._reconnecting = True
            self._waiting = self._deadline.stage("the TLS handshake (reconnect)", self._state.config.tls.timeout)
            return self._begin_reconnect()
        return Failed(RemoteProtocolError(f"the peer sent neither a hybridkex Hello nor a TLS ClientHello "
                                          f"(first byte 0x{first:02x})"))

    def _begin_hybrid(self) -> SetupEvent:
        hs = self._state.config.handshake
        randbytes, clock = self._core_args
        self._stage = HybridStage(Responder(hs, randbytes=randbytes, clock=clock), hs, self._state.keys,
                                  self._deadline.stage("the hybrid handshake", hs.policy.timeouts.handshake))
        self._stage.receive_data(bytes(self._buffer))
        if self._eof:
            self._stage.receive_data(b"")
        self._buffer.clear()
        return self._stage.next_event()

    def _begin_reconnect(self) -> SetupEvent:
        # The PSK hash is not known until the ClientHello names its cipher: TLS starts once it is whole.
        buf = bytes(self._buffer)
        try:
            end = (TLS_RECORD_HEADER_LEN + tls_record_length(buf[:TLS_RECORD_HEADER_LEN])
                   if len(buf) >= TLS_RECORD_HEADER_LEN else None)
            if end is None or len(buf) < end:
                if self._eof:
                    raise RemoteProtocolError("the peer closed the connection in the middle of its ClientHello")
                return NEED_DATA
            cipher = client_hello_cipher(buf[TLS_RECORD_HEADER_LEN:end])
        except RemoteProtocolError as exc:
            return Failed(exc)
        cfg = self._state.config
        lookup = ReconnectLookup(self._state.registry, cipher)
        tls = MemoryTLS(tls_context("server", cipher, cfg.tls, reconnect=True), server_side=True)
        bind_psk_lookup(tls.connection, lookup)
        self._stage = TLSStage(tls, self._waiting, None, lookup=lookup)
        self._buffer.clear()
        self._stage.carry(b"", buf, self._eof)
        return self._stage.next_event()

    def _tls_after(self, session: Session) -> TLSStage:
        cfg, registry = self._state.config, self._state.registry
        keys = server_keys(session, registry)
        handle = keys.handle
        tls = MemoryTLS(tls_context("server", keys.cipher, cfg.tls), server_side=True)
        bind_psk(tls.connection, keys.identity, keys.psk)
        discard = (lambda: registry.discard(handle)) if handle is not None and registry is not None else None
        return TLSStage(tls, self._deadline.stage("the TLS handshake", cfg.tls.timeout), session.info,
                        on_failure=discard)

