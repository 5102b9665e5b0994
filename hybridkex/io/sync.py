"""The blocking driver: runs the sans-IO handshake over a connected socket.

This is the one loop where the core's requests become I/O (after trio's ``_retry``): "need data"
becomes a ``recv`` of exactly the bytes the current frame still needs (so nothing that follows the
handshake on the stream, such as a TLS ClientHello, is consumed), and QKD requests become calls to
a :class:`~hybridkex.io.keys.QKDKeyManager` under the policy's KME timeout.

On failure the driver sends the core's Abort (best effort) and raises; the caller closes the
socket.  On success the socket is left open and positioned right after the handshake.

After a successful handshake the driver calls every configured authenticator's
``after_handshake(session)``: the initiator once its Finished is sent, the responder once it has
verified the initiator's.  The recycling authenticator records its key rotation there
(docs/recycle.md); if that fails the session is erased and the error raised.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from .. import workers
from ..exceptions import (
    ConfigurationError,
    HandshakeTimeout,
    HybridKEXError,
    KeySourceError,
    PolicyViolation,
    RemoteProtocolError,
)
from ..protocol import (
    NEED_DATA,
    AbortCode,
    HandshakeComplete,
    Initiator,
    InitiatorConfig,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
    ResponderConfig,
    Session,
)
from ..qkd.base import KeySource
from . import _stale
from .keys import QKDKeyManager

__all__ = ["run_initiator", "run_responder"]

T = TypeVar("T")

_Keys = QKDKeyManager | KeySource | None


def _manager(keys: _Keys, config: InitiatorConfig | ResponderConfig) -> QKDKeyManager | None:
    if keys is None:
        if config.policy.uses_qkd:
            raise ConfigurationError(f"the policy's QKD mode is {config.policy.qkd.value!r} but no key source was "
                                     "given", field="key_source")
        return None
    if isinstance(keys, QKDKeyManager):
        return keys
    if config.policy.key_budget.mode == "epoch":
        raise ConfigurationError("an epoch key budget keeps keys between handshakes: pass one long-lived "
                                 "QKDKeyManager(key_source, policy.key_budget), not a bare KeySource",
                                 field="key_source")
    return QKDKeyManager(keys, config.policy.key_budget)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise HandshakeTimeout(f"the handshake did not complete within {self.seconds:.3g} s")
        return left


def _flush(conn: Initiator | Responder, sock: socket.socket, deadline: _Deadline | None) -> None:
    data = conn.data_to_send()
    if data:
        sock.settimeout(deadline.remaining() if deadline else 1.0)
        sock.sendall(data)


def _after_handshake(config: InitiatorConfig | ResponderConfig, session: Session) -> None:
    for auth in config.authenticators:
        auth.after_handshake(session)


def _drive(conn: Initiator | Responder, sock: socket.socket, keys: QKDKeyManager | None, timeout: float,
           kme_timeout: float, *, on_complete: Callable[[Session], None] | None = None) -> Session:
    deadline = _Deadline(timeout)
    previous_timeout = sock.gettimeout()
    use = _stale.QKDUse()
    try:
        _flush(conn, sock, deadline)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                _flush(conn, sock, deadline)  # a flight next_event() produced (no QKD answer came first)
                sock.settimeout(deadline.remaining())
                data = sock.recv(max(conn.bytes_wanted(), 1))
                conn.receive_data(data)
            elif isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
                use.asked(event)
                _answer(conn, keys, event, min(kme_timeout, deadline.remaining()), use)
            elif isinstance(event, HandshakeComplete):
                _flush(conn, sock, deadline)  # the initiator's Finished leaves before anything is recorded
                if on_complete is not None:
                    try:
                        on_complete(event.session)
                    except BaseException:
                        event.session.erase()
                        raise
                return event.session
            _flush(conn, sock, deadline)
    except (TimeoutError, HandshakeTimeout) as exc:
        conn.abort(AbortCode.TIMEOUT)
        _best_effort_flush(conn, sock)
        if isinstance(exc, HandshakeTimeout):
            raise
        raise HandshakeTimeout(f"the peer did not answer within the handshake deadline of {timeout:.3g} s") from exc
    except HybridKEXError as exc:
        _best_effort_flush(conn, sock)
        use.failed(exc, keys)  # a KME did not know our QKD key: drop stale pooled keys
        if _stale.must_await_close(conn, exc):
            _stale.await_close(sock)
        raise
    except OSError as exc:
        conn.abort(AbortCode.GENERIC)
        raise RemoteProtocolError(f"the connection to the peer failed during the handshake: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous_timeout)


def _answer(conn: Initiator | Responder, keys: QKDKeyManager | None, event: QKDKeysRequired | QKDKeysByIdRequired,
            timeout: float, use: _stale.QKDUse) -> None:
    if keys is None:
        conn.qkd_unavailable("no key source is configured")
        return
    try:
        delivered = workers.call(lambda: keys.answer(event), timeout, "the QKD key source")
    except (KeySourceError, HandshakeTimeout) as exc:
        conn.qkd_unavailable(exc)  # the policy decides: fall back to the no-QKD suite, or fail
        return
    except PolicyViolation:
        conn.abort(AbortCode.POLICY)
        raise
    except HybridKEXError:
        conn.abort(AbortCode.GENERIC)
        raise
    use.got(delivered)
    conn.provide_qkd_keys(delivered)


def _best_effort_flush(conn: Initiator | Responder, sock: socket.socket) -> None:
    """Send the queued Abort if the socket takes it at once; never block or raise."""
    try:
        data = conn.data_to_send()
        if data:
            sock.settimeout(0.5)
            sock.sendall(data)
    except OSError:
        pass


def run_initiator(sock: socket.socket, config: InitiatorConfig, key_source: _Keys = None, *,
                  timeout: float | None = None, randbytes: Callable[[int], bytes] | None = None,
                  clock: Callable[[], float] | None = None) -> Session:
    """Run the initiator side over the connected ``sock``; returns the :class:`Session`.

    Args:
        sock: a connected stream socket (blocking mode; its timeout is restored afterwards).
        config: the initiator's configuration.
        key_source: a :class:`QKDKeyManager` (required for an epoch key budget) or a plain
            :class:`~hybridkex.qkd.KeySource`; None only when the policy disables QKD.
        timeout: overall deadline in seconds (default ``config.policy.timeouts.handshake``).
        randbytes, clock: passed to the core (tests inject deterministic ones).

    Raises:
        HybridKEXError: a subclass saying what failed (authentication, policy, QKD, protocol,
            timeout); the peer has been sent an Abort where possible.
    """
    keys = _manager(key_source, config)
    conn = Initiator(config, randbytes=randbytes, clock=clock)
    t = config.policy.timeouts
    return _drive(conn, sock, keys, timeout or t.handshake, t.kme,
                  on_complete=lambda session: _after_handshake(config, session))


def run_responder(sock: socket.socket, config: ResponderConfig, key_source: _Keys = None, *,
                  timeout: float | None = None, randbytes: Callable[[int], bytes] | None = None,
                  clock: Callable[[], float] | None = None) -> Session:
    """Run the responder side over the accepted ``sock``; returns the :class:`Session`.

    Same arguments and errors as :func:`run_initiator`.  A server calls it once per accepted
    connection and keeps serving whatever it raises.
    """
    keys = _manager(key_source, config)
    conn = Responder(config, randbytes=randbytes, clock=clock)
    t = config.policy.timeouts
    return _drive(conn, sock, keys, timeout or t.handshake, t.kme,
                  on_complete=lambda session: _after_handshake(config, session))
