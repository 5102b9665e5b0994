"""The hybrid-handshake stage of connection setup, sans-IO: the core plus its QKD answers and hooks.

It wraps an :class:`~hybridkex.protocol.Initiator` / :class:`~hybridkex.protocol.Responder` and adds
what every driver needs around it, in one place: QKD requests become :class:`QKDRequest` events
for the key manager (under the policy's KME deadline), a completed handshake runs the
authenticators' ``after_handshake`` hooks as a :class:`RunHooks` event, and every failure — the
core's, the key source's, a hook's, the driver's deadline or broken connection — becomes one
:class:`Failed` event with the Abort queued and the right follow-up (stale QKD keys dropped; an
initiator that must wait for the master to close).
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Final

from ..exceptions import (
    HandshakeTimeout,
    HybridKEXError,
    KeySourceError,
    LocalProtocolError,
    PolicyViolation,
    RemoteProtocolError,
)
from ..protocol import (
    NEED_DATA,
    AbortCode,
    Authenticator,
    HandshakeComplete,
    Initiator,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
)
from . import _stale
from ._events import BlockingCall, Failed, HandshakeDone, QKDRequest, RunHooks

if TYPE_CHECKING:
    from ..protocol import InitiatorConfig, ResponderConfig, Sentinel, Session
    from ._plumbing import Stage
    from .keys import QKDKeyManager

__all__ = ["READ_SIZE", "HybridStage"]

#: Bytes a driver reads at a time during setup (whatever belongs to the next stage is kept).
READ_SIZE: Final = 65536


def _hooks(config: InitiatorConfig | ResponderConfig) -> tuple[Authenticator, ...]:
    """Authenticators with an ``after_handshake`` of their own (the base class's does nothing)."""
    return tuple(a for a in config.authenticators if type(a).after_handshake is not Authenticator.after_handshake)


class HybridStage:
    """One hybrid handshake with its QKD answers and hooks (events: NEED_DATA, QKDRequest, RunHooks,
    HandshakeDone, Failed).

    ``exact=True`` makes :meth:`read_size` the bytes the current frame still needs, so that a
    driver handing the stream on afterwards (``run_initiator``) never reads past the handshake.
    """

    def __init__(self, conn: Initiator | Responder, config: InitiatorConfig | ResponderConfig,
                 keys: QKDKeyManager | None, stage: Stage, *, exact: bool = False) -> None:
        self._conn = conn
        self._keys = keys
        self._stage = stage
        self._exact = exact
        self._hooks = _hooks(config)
        self._kme_timeout = config.policy.timeouts.kme
        self._use = _stale.QKDUse()
        self._call: BlockingCall | None = None
        self._session: Session | None = None
        self._result: HandshakeDone | Failed | None = None
        self._eof = False

    # --- bytes ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._result is not None:
            return
        self._eof = self._eof or not data
        try:
            self._conn.receive_data(data)
        except Exception as exc:  # too much data without a frame: the core has queued its Abort
            self._result = self._failed(exc)

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()

    def read_size(self) -> int:
        return max(self._conn.bytes_wanted(), 1) if self._exact else READ_SIZE

    def timeout(self) -> float:
        return self._stage.end - time.monotonic()

    def handover(self) -> tuple[bytes, bool]:
        """After :class:`HandshakeDone`: the bytes received beyond the handshake, and whether the
        peer has closed (both belong to whatever runs next)."""
        return self._conn.trailing_data, self._eof

    # --- events -----------------------------------------------------------------------------------

    def next_event(self) -> Sentinel | QKDRequest | RunHooks | HandshakeDone | Failed:
        if self._result is not None:
            return self._result
        if self._call is not None:
            raise LocalProtocolError(f"{self._call.what} has not been answered yet (call_done/call_failed)")
        try:
            return self._next()
        except HandshakeTimeout as exc:  # ours (the stage's deadline) or the peer's Abort saying so
            return self.fail(exc)
        except Exception as exc:
            self._result = self._failed(exc)
            return self._result

    def _next(self) -> Sentinel | QKDRequest | RunHooks | HandshakeDone:
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                return NEED_DATA
            if isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
                self._use.asked(event)
                keys = self._keys
                if keys is None:
                    conn.qkd_unavailable("no key source is configured")
                    continue
                left = self._stage.left()  # HandshakeTimeout (as a Failed) when the deadline has passed
                self._call = QKDRequest(functools.partial(keys.answer, event), min(self._kme_timeout, left), event)
                return self._call
            if isinstance(event, HandshakeComplete):
                self._session = event.session
                if not self._hooks:
                    self._result = HandshakeDone(event.session)
                    return self._result
                self._call = RunHooks(self._run_hooks, self._stage.left(), "the after-handshake hook")
                return self._call
            raise LocalProtocolError(f"the handshake produced {event!r} with no request outstanding")

    def _run_hooks(self) -> None:
        assert self._session is not None
        for auth in self._hooks:
            auth.after_handshake(self._session)

    # --- answers ----------------------------------------------------------------------------------

    def call_done(self, value: object) -> None:
        call = self._take_call()
        if self._result is not None:
            return
        if isinstance(call, RunHooks):
            assert self._session is not None
            self._result = HandshakeDone(self._session)
            return
        try:
            if isinstance(value, list):
                self._use.got(value)
            self._conn.provide_qkd_keys(value)  # type: ignore[arg-type]  # the core checks type and keys
        except Exception as exc:
            self._result = self._failed(exc)

    def call_failed(self, exc: Exception) -> None:
        call = self._take_call()
        if self._result is not None:
            return
        if isinstance(call, QKDRequest) and isinstance(exc, KeySourceError | HandshakeTimeout):
            try:
                self._conn.qkd_unavailable(exc)  # the policy decides: the no-QKD suite, or a clear failure
            except Exception as err:
                self._result = self._failed(err)
            return
        if isinstance(call, QKDRequest):
            self._conn.abort(AbortCode.POLICY if isinstance(exc, PolicyViolation) else AbortCode.GENERIC)
        self._result = self._failed(exc)

    def _take_call(self) -> BlockingCall:
        call, self._call = self._call, None
        if call is None:
            raise LocalProtocolError("there is no outstanding call to answer")
        return call

    # --- failure ----------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> Failed:
        """The driver's failure: its deadline passed (TimeoutError) or the connection broke (OSError)."""
        if not isinstance(self._result, Failed):
            if isinstance(exc, TimeoutError):
                self._conn.abort(AbortCode.TIMEOUT)
                exc = exc if isinstance(exc, HandshakeTimeout) else self._stage.timeout_error()
            elif isinstance(exc, OSError):
                self._conn.abort(AbortCode.GENERIC)
                exc = RemoteProtocolError(f"the connection to the peer failed during the handshake: {exc}")
            self._result = self._failed(exc)
        return self._result

    def _failed(self, exc: BaseException) -> Failed:
        self._call = None
        if self._session is not None:
            self._session.erase()  # a hook failed or the deadline passed after the handshake
        if isinstance(exc, HybridKEXError) and not isinstance(exc, HandshakeTimeout):
            self._use.failed(exc, self._keys)  # a KME did not know our QKD key: drop stale pooled keys
        return Failed(exc, await_peer_close=_stale.must_await_close(self._conn, exc))
