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

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..exceptions import (
    AlreadyFinalized,
    HandshakeTimeout,
    KeySourceError,
    LocalProtocolError,
    PSKRejected,
    RateLimited,
    RemoteProtocolError,
    SteadyStateRefused,
)
from ..hazmat.labels import STEADY_IDENTITY_PREFIX
from ..protocol import MAGIC, AbortCode, Initiator, InitiatorConfig, Responder, encode_abort
from ..steady import SteadyClaim, SteadyTicket, first_psk_identity
from ..tls import MemoryTLS
from ..tls.pyopenssl import bind_psk_lookup
from ._events import (
    NEED_DATA,
    BlockingCall,
    Established,
    Failed,
    HandshakeDone,
    QKDRequest,
    RunHooks,
    SetupEvent,
    StateCall,
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
from .reconnect import (
    TLS_HANDSHAKE_BYTE,
    TLS_RECORD_HEADER_LEN,
    cipher_from_suites,
    client_hello_cipher,
    tls_record_length,
)

if TYPE_CHECKING:
    from ..protocol import Session
    from ..qkd.base import QKDKey
    from ..steady import SteadyAttempt
    from .keys import QKDKeyManager
    from .reconnect import ReconnectKey, ReconnectMatch, ReconnectTicket

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
_log = logging.getLogger("hybridkex.server")


class _Setup:
    """What both roles share: the current stage, and moving on from a finished hybrid handshake."""

    def __init__(self) -> None:
        self._stage: _Stage | None = None
        self._final: Established | Failed | None = None
        #: A blocking call the setup waits for before a stage starts (a steady-state QKD key):
        #: the call, what follows its answer, what follows its failure.
        self._pending: tuple[BlockingCall, Callable[[object], SetupEvent],
                             Callable[[Exception], SetupEvent]] | None = None
        self._answered: SetupEvent | None = None
        #: An Abort frame for a refusal before any stage ran (a steady-state peer over its rate).
        self._abort = b""

    @property
    def stage(self) -> str:
        """``"first byte"``, ``"qkd"`` (a steady-state key), ``"hybrid"``, ``"tls"``, ``"established"`` or
        ``"failed"``."""
        if isinstance(self._final, Established):
            return "established"
        if self._final is not None:
            return "failed"
        if self._pending is not None and self._stage is None:
            return "qkd"
        if self._stage is None:
            return "first byte"
        return "tls" if isinstance(self._stage, TLSStage) else "hybrid"

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` when it closed the connection."""
        if self._final is None and self._stage is not None:
            self._stage.receive_data(data)

    def data_to_send(self) -> bytes:
        """Bytes to send to the peer now (hybrid frames, TLS records, an Abort or an alert)."""
        if self._stage is None:
            out, self._abort = self._abort, b""
            return out
        return self._stage.data_to_send()

    def read_size(self) -> int:
        """How many bytes to read at most (the machine keeps whatever belongs to the next stage)."""
        return READ_SIZE

    def timeout(self) -> float:
        """Seconds the driver may wait for the peer now (<= 0: call :meth:`fail` with TimeoutError)."""
        return self._stage.timeout() if self._stage is not None else 0.0

    def call_done(self, value: object) -> None:
        """The outstanding :class:`QKDRequest` / :class:`RunHooks` returned ``value``."""
        if self._pending is not None:
            _, done, _ = self._pending
            self._pending = None
            self._answered = self._guard(lambda: done(value))
            return
        self._hybrid().call_done(value)

    def call_failed(self, exc: Exception) -> None:
        """The outstanding :class:`QKDRequest` / :class:`RunHooks` raised ``exc``."""
        if self._pending is not None:
            _, _, failed = self._pending
            self._pending = None
            self._answered = self._guard(lambda: failed(exc))
            return
        self._hybrid().call_failed(exc)

    @staticmethod
    def _guard(step: Callable[[], SetupEvent]) -> SetupEvent:
        try:
            return step()
        except Exception as exc:  # a continuation must end in an event, never raise to the driver
            return Failed(exc)

    def _await(self, call: QKDRequest | StateCall, done: Callable[[object], SetupEvent],
               failed: Callable[[Exception], SetupEvent]) -> SetupEvent:
        """Hand ``call`` to the driver; ``done``/``failed`` produce the event after its answer."""
        self._pending = (call, done, failed)
        return call

    def fail(self, exc: BaseException) -> Failed:
        """The driver's own failure (a deadline passed: TimeoutError; the connection broke: OSError)."""
        if self._pending is not None:
            self._pending = None
            self._on_pending_failure()
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

    def _on_pending_failure(self) -> None:
        """The driver gave up while a call was outstanding (undo what the call's plan reserved)."""

    def _advance(self) -> SetupEvent:
        if self._answered is not None:  # first: an answer's continuation may itself be the next call
            event, self._answered = self._answered, None
            return event
        if self._pending is not None:
            raise LocalProtocolError(f"{self._pending[0].what} has not been answered yet (call_done/call_failed)")
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
            call = self._before_tls()
            if call is not None:  # the driver sends the hybrid flight first, then runs the call
                return self._await(call, lambda _value: tls.next_event(), lambda _exc: tls.next_event())
            return tls.next_event()
        return event

    def _before_tls(self) -> StateCall | None:
        """A call to run after the hybrid handshake's last flight is sent and before TLS reads."""
        return None

    def _begin(self) -> SetupEvent:  # pragma: no cover - each role starts its first stage itself
        raise NotImplementedError

    def _tls_after(self, session: Session) -> TLSStage:  # pragma: no cover - each role derives its own PSK
        raise NotImplementedError


def _steady_refused(exc: BaseException) -> BaseException:
    """A refused steady-state PSK says so, so the caller knows a full handshake will do."""
    if isinstance(exc, PSKRejected) and not isinstance(exc, SteadyStateRefused):
        refused = SteadyStateRefused(f"the server refused the steady-state connection ({exc}); a full handshake "
                                     "makes a new ticket")
        refused.__cause__ = exc
        return refused
    return exc


class ClientSetup(_Setup):
    """The client side of one connection's setup.

    Args:
        config: a :class:`ClientConfig` (or a bare :class:`~hybridkex.protocol.InitiatorConfig`).
        key_source: a :class:`~hybridkex.io.QKDKeyManager` (required for an epoch key budget) or a
            blocking :class:`~hybridkex.qkd.KeySource` (asyncio drivers bridge an
            :class:`~hybridkex.qkd.AsyncKeySource` first); None only when the policy disables QKD.
        ticket: a steady-state or reconnect ticket: while it is usable the connection is one TLS
            handshake with the ticket's PSK (a steady-state one with a fresh QKD key).
        timeout: the whole setup's deadline in seconds (default ``config.timeout``), from now: the
            driver's TCP connect takes its share (:meth:`connect_timeout`).
        randbytes, clock: passed to the handshake core (tests inject deterministic ones).

    Raises:
        ConfigurationError: at once, when a full handshake could only fail for want of a key source
            (or the key source does not fit the key budget).
    """

    def __init__(self, config: ClientConfig | InitiatorConfig, key_source: KeySourceArg = None, *,
                 ticket: ReconnectTicket | SteadyTicket | None = None, timeout: float | None = None,
                 randbytes: Callable[[int], bytes] | None = None, clock: Callable[[], float] | None = None) -> None:
        super().__init__()
        self.config = ClientConfig.coerce(config)
        self._deadline = Deadline(self.config.timeout if timeout is None else timeout)
        self._core_args = (randbytes, clock)
        self._reconnect: ReconnectKey | None = None
        self._steady: SteadyAttempt | None = None
        if isinstance(ticket, SteadyTicket):
            self._steady = ticket.take()
        elif ticket is not None:
            self._reconnect = ticket.take()
        self._keys: QKDKeyManager | None = None
        if self._reconnect is None and self._steady is None:
            check_key_source(self.config, key_source)
        if self._reconnect is None:
            self._keys = key_manager(key_source, self.config.handshake.policy, long_lived=self._steady is not None)

    @property
    def reconnect(self) -> bool:
        """Whether this setup is a reconnect (TLS only, with a reconnect ticket's PSK)."""
        return self._reconnect is not None

    @property
    def steady(self) -> SteadyAttempt | None:
        """The steady-state connection this setup makes (TLS only), or None for a full handshake."""
        return self._steady

    def connect_timeout(self) -> float:
        """Seconds the TCP connect may take (HandshakeTimeout once the deadline passed)."""
        return self._deadline.remaining("TCP connect")

    def _begin(self) -> SetupEvent:
        cfg = self.config
        key = self._reconnect
        if key is not None:
            tls = MemoryTLS(tls_context("client", key.cipher, cfg.tls, reconnect=True), server_side=False)
            tls.bind_psk(key.identity, key.psk)
            self._stage = TLSStage(tls, self._deadline.stage("the TLS handshake (reconnect)", cfg.tls.timeout),
                                   key.info, reconnect_index=key.index)
        elif self._steady is not None:
            return self._begin_steady(self._steady)
        else:
            hs = cfg.handshake
            randbytes, clock = self._core_args
            self._stage = HybridStage(
                Initiator(hs, randbytes=randbytes, clock=clock), hs, self._keys,
                self._deadline.stage("the hybrid handshake", hs.policy.timeouts.handshake))
        return self._stage.next_event()

    def _begin_steady(self, attempt: SteadyAttempt) -> SetupEvent:
        request, keys = attempt.request, self._keys
        if request is None:
            return self._steady_tls(attempt)
        if keys is None:
            attempt.unavailable(KeySourceError("no key source is configured"))
            return self._steady_tls(attempt)
        timeout = self._deadline.remaining("the steady state's QKD key", self.config.handshake.policy.timeouts.kme)

        def done(value: object) -> SetupEvent:
            attempt.provide(value)  # type: ignore[arg-type]  # the key manager answers a list of QKDKey
            return self._steady_tls(attempt)

        def failed(exc: Exception) -> SetupEvent:
            if not isinstance(exc, KeySourceError | HandshakeTimeout):
                attempt.ticket.failed(attempt)
                return Failed(exc)
            attempt.unavailable(exc)  # the policy decides, in credentials()
            return self._steady_tls(attempt)

        return self._await(QKDRequest(functools.partial(keys.answer, request), timeout, request), done, failed)

    def _on_pending_failure(self) -> None:
        if self._steady is not None:
            self._steady.ticket.failed(self._steady)

    def _steady_tls(self, attempt: SteadyAttempt) -> SetupEvent:
        ticket = attempt.ticket
        try:
            try:
                identity, psk = attempt.credentials()
            except AlreadyFinalized as exc:  # the ticket was dropped meanwhile (another connection's refusal)
                raise SteadyStateRefused("the steady-state ticket was dropped while this connection started; a full "
                                         "handshake makes a new one") from exc
            tls = MemoryTLS(tls_context("client", attempt.cipher, self.config.tls, reconnect=True), server_side=False)
            tls.bind_psk(identity, psk)
        except Exception as exc:
            ticket.failed(attempt)
            return Failed(exc)
        self._stage = TLSStage(
            tls, self._deadline.stage("the TLS handshake (steady state)", self.config.tls.timeout), attempt.info,
            steady=attempt.facts(), on_success=lambda: ticket.succeeded(attempt),
            on_failure=lambda: ticket.failed(attempt), map_error=_steady_refused, check_first=check_server_first_bytes)
        return self._stage.next_event()

    def _tls_after(self, session: Session) -> TLSStage:
        cfg = self.config
        keys = client_keys(session, cfg, self._keys)
        ticket = keys.ticket
        tls = MemoryTLS(tls_context("client", keys.cipher, cfg.tls), server_side=False)
        tls.bind_psk(keys.identity, keys.psk)
        return TLSStage(tls, self._deadline.stage("the TLS handshake", cfg.tls.timeout), session.info,
                        ticket=ticket, check_first=check_server_first_bytes,
                        on_failure=ticket.erase if ticket is not None else None)


class ServerSetup(_Setup):
    """The server side of one accepted connection's setup; ``state`` is what the server keeps across
    connections (configuration, key manager, reconnect registry).  The deadline starts now.
    ``peer``: the client's IP address, when known (the per-address bound on the shared-state reads
    of unknown parents, ``ServerConfig.state_reads``)."""

    def __init__(self, state: ServerState, *, randbytes: Callable[[int], bytes] | None = None,
                 clock: Callable[[], float] | None = None, peer: str | None = None) -> None:
        super().__init__()
        self._state = state
        self._peer = peer
        self._deadline = Deadline(state.config.timeout)
        #: What the server waits for before TLS or the hybrid stage starts: the first byte, then (on
        #: a reconnect) the rest of the ClientHello, which is part of the reconnect's TLS stage.
        self._waiting = self._deadline.stage("waiting for the client's first byte")
        self._reconnecting = False
        self._core_args = (randbytes, clock)
        self._buffer = bytearray()
        self._eof = False
        self._share: list[Callable[[], None]] = []  # the new parent's shared-state writes (_before_tls)

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
            steady, registry = self._state.steady, self._state.registry
            # A reconnect whose lookup calls the shared state is resolved before TLS starts, from the
            # ClientHello's PSK identity, on a worker thread (as the steady claim is), not inside
            # OpenSSL's PSK callback on the event loop.
            prefetch = registry is not None and registry.shared and registry.off_loop
            identity: bytes | None = None
            if steady is None and not prefetch:
                cipher = client_hello_cipher(buf[TLS_RECORD_HEADER_LEN:end])
            else:
                suites, identity = first_psk_identity(buf[TLS_RECORD_HEADER_LEN:end])
                cipher = cipher_from_suites(suites)
        except RemoteProtocolError as exc:
            return Failed(exc)
        if steady is not None and identity is not None and identity.startswith(STEADY_IDENTITY_PREFIX):
            claims, hello, admit, peer = steady, identity, self._state.config.handshake.admit, self._peer
            if claims.off_loop:  # the claim's database round trips: on a worker thread, not the event loop
                return self._await(StateCall(lambda: claims.claim(hello, cipher, admit=admit, source=peer),
                                             max(0.0, self._waiting.end - time.monotonic())),
                                   lambda claim: self._claimed(claim, cipher), self._claim_failed)
            try:
                return self._claimed(steady.claim(hello, cipher, admit=admit, source=peer), cipher)
            except RateLimited as exc:
                return self._claim_failed(exc)
        if prefetch and identity is not None and registry is not None:
            offered, reconnects, peer = identity, registry, self._peer
            return self._await(StateCall(lambda: reconnects.lookup(offered, cipher, source=peer),
                                         max(0.0, self._waiting.end - time.monotonic())),
                               lambda match: self._reconnect_tls(cipher, (offered, match)),  # type: ignore[arg-type]
                               Failed)
        return self._reconnect_tls(cipher)

    def _claimed(self, claim: object, cipher: str) -> SetupEvent:
        if isinstance(claim, SteadyClaim):
            return self._begin_steady(claim, cipher)
        return self._reconnect_tls(cipher)

    def _claim_failed(self, exc: Exception) -> SetupEvent:
        if isinstance(exc, RateLimited):  # refused as a full handshake would be: Abort "rate limited"
            self._abort = encode_abort(AbortCode.RATE_LIMITED)
        return Failed(exc)

    def _reconnect_tls(self, cipher: str, resolved: tuple[bytes, ReconnectMatch | None] | None = None) -> SetupEvent:
        """TLS with the reconnect registry's lookup: a reconnect, or (any other identity) a refusal
        that OpenSSL answers with an alert, so the client knows to run a full handshake.
        ``resolved``: the offered identity, already looked up (its match, or None: refused)."""
        cfg = self._state.config
        lookup = ReconnectLookup(self._state.registry, cipher, resolved, source=self._peer)
        tls = MemoryTLS(tls_context("server", cipher, cfg.tls, reconnect=True), server_side=True)
        bind_psk_lookup(tls.connection, lookup)
        return self._start_tls(TLSStage(tls, self._waiting, None, lookup=lookup))

    def _start_tls(self, stage: TLSStage) -> SetupEvent:
        buf = bytes(self._buffer)
        self._stage = stage
        self._buffer.clear()
        stage.carry(b"", buf, self._eof)
        return stage.next_event()

    def _begin_steady(self, claim: SteadyClaim, cipher: str) -> SetupEvent:
        if claim.keys is not None:
            return self._steady_tls(claim, claim.keys, cipher)
        timeout = max(0.0, min(self._waiting.end - time.monotonic(), self._state.config.handshake.policy.timeouts.kme))

        def failed(exc: Exception) -> SetupEvent:
            _log.warning("steady-state connection #%d of %r: no QKD key %s (%s); refusing it, so the client runs a "
                         "full handshake", claim.content.index, claim.info.peer_identity, claim.content.used[0], exc)
            return self._reconnect_tls(cipher)

        return self._await(QKDRequest(lambda: claim.wait(timeout), timeout, claim.request),
                           lambda keys: self._steady_tls(claim, keys, cipher), failed)  # type: ignore[arg-type]

    def _steady_tls(self, claim: SteadyClaim, keys: list[QKDKey], cipher: str) -> SetupEvent:
        tls = MemoryTLS(tls_context("server", cipher, self._state.config.tls, reconnect=True), server_side=True)
        tls.bind_psk(claim.identity, claim.psk(keys))
        return self._start_tls(TLSStage(tls, self._waiting, claim.info, steady=claim.facts, on_success=claim.confirm))

    def _tls_after(self, session: Session) -> TLSStage:
        state = self._state
        keys = server_keys(session, state)
        self._share = keys.share
        tls = MemoryTLS(tls_context("server", keys.cipher, state.config.tls), server_side=True)
        tls.bind_psk(keys.identity, keys.psk)

        def discard() -> None:  # the parent's own TLS failed: nothing may follow from it
            if keys.handle is not None and state.registry is not None:
                state.registry.discard(keys.handle)
            if keys.steady_handle is not None and state.steady is not None:
                state.steady.discard(keys.steady_handle)

        return TLSStage(tls, self._deadline.stage("the TLS handshake", state.config.tls.timeout), session.info,
                        on_failure=discard)

    def _before_tls(self) -> StateCall | None:
        # An asyncio server stores the new parent in the shared state on a worker thread; it answers
        # the ClientHello only after that, so a client that completed this handshake finds its parent
        # at every server of the fleet (it would otherwise race the write and, at another server,
        # fall back to a full handshake).  The write overlaps the client's ClientHello on the wire.
        # Each write logs its own failure: a parent not shared is still served here.
        puts, self._share = self._share, []
        if not puts:
            return None
        stage = self._stage
        return StateCall(lambda: [put() for put in puts], stage.timeout() if stage is not None else 0.0)

