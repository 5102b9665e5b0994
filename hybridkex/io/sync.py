"""The blocking driver: runs a setup machine (:mod:`hybridkex.io.setup`) over a connected socket.

This is the one loop where the machines' events become blocking I/O: "need data" becomes a
``recv`` under the stage's deadline (the socket is non-blocking and waited on with ``poll``), bytes
to send are sent, and blocking work (QKD requests, ``after_handshake`` hooks) runs on a worker
thread of :mod:`hybridkex.workers` under its own deadline.  On failure the driver sends the Abort
or alert (best effort) and raises; the caller closes the socket.

:func:`run_initiator` / :func:`run_responder` run the hybrid handshake alone (no TLS), reading
exactly the handshake's bytes so that the socket is left positioned right after it.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable
from typing import Final, Protocol

from .. import workers
from ..protocol import Initiator, InitiatorConfig, Responder, ResponderConfig, Session
from . import _stale
from ._events import NEED_DATA, BlockingCall, Established, Failed, HandshakeDone, SetupEvent
from ._hybrid import HybridStage
from ._plumbing import Deadline, key_manager
from .keys import KeySourceArg, QKDKeyManager

__all__ = ["drive", "run_initiator", "run_responder"]

_HAS_POLL: Final = hasattr(select, "poll")


class Machine(Protocol):
    """What the driver needs of a setup machine (:class:`~hybridkex.io.setup.ClientSetup`,
    :class:`~hybridkex.io.setup.ServerSetup`, or the hybrid stage alone)."""

    def next_event(self) -> SetupEvent: ...
    def data_to_send(self) -> bytes: ...
    def receive_data(self, data: bytes) -> None: ...
    def read_size(self) -> int: ...
    def timeout(self) -> float: ...
    def call_done(self, value: object) -> None: ...
    def call_failed(self, exc: Exception) -> None: ...
    def fail(self, exc: BaseException) -> Failed: ...


def wait_fd(fd: int, write: bool, timeout: float | None) -> bool:
    """Wait until ``fd`` is readable/writable (or has an error); False on timeout."""
    if _HAS_POLL:
        poller = select.poll()
        poller.register(fd, select.POLLOUT if write else select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0))
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], timeout)  # pragma: no cover
    return bool(r or w)  # pragma: no cover


def _recv(sock: socket.socket, machine: Machine) -> bytes:
    while True:
        try:
            return sock.recv(machine.read_size())
        except BlockingIOError:
            pass
        left = machine.timeout()
        if left <= 0 or not wait_fd(sock.fileno(), False, left):
            raise TimeoutError


def _send(sock: socket.socket, data: bytes, machine: Machine) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
            continue
        except BlockingIOError:
            pass
        left = machine.timeout()
        if left <= 0 or not wait_fd(sock.fileno(), True, left):
            raise TimeoutError


def _send_nowait(sock: socket.socket, data: bytes) -> None:
    """The Abort or alert, if the kernel takes it at once; never blocks or raises."""
    with contextlib.suppress(OSError):
        if data:
            sock.send(data)


def drive(machine: Machine, sock: socket.socket) -> Established | HandshakeDone:
    """Run ``machine`` over ``sock`` (left non-blocking) until it is established; raise its error."""
    sock.setblocking(False)
    while True:
        event = machine.next_event()
        out = machine.data_to_send()
        if isinstance(event, Failed):
            _send_nowait(sock, out)
            if event.await_peer_close:
                _stale.await_close(sock)
            raise event.error
        try:
            if out:
                _send(sock, out, machine)
            if event is NEED_DATA:
                machine.receive_data(_recv(sock, machine))
                continue
        except OSError as exc:  # TimeoutError included: the stage's deadline passed
            machine.fail(exc)
            continue
        if isinstance(event, BlockingCall):
            try:
                value = workers.call(event.run, event.timeout, event.what)
            except Exception as exc:
                machine.call_failed(exc)
            else:
                machine.call_done(value)
        elif isinstance(event, Established | HandshakeDone):
            return event


def _run_hybrid(conn: Initiator | Responder, sock: socket.socket, config: InitiatorConfig | ResponderConfig,
                keys: QKDKeyManager | None, timeout: float | None) -> Session:
    t = config.policy.timeouts
    stage = HybridStage(conn, config, keys, Deadline(timeout or t.handshake).stage("the hybrid handshake"),
                        exact=True)
    previous = sock.gettimeout()
    try:
        done = drive(stage, sock)
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    assert isinstance(done, HandshakeDone)
    return done.session


def run_initiator(sock: socket.socket, config: InitiatorConfig, key_source: KeySourceArg = None, *,
                  timeout: float | None = None, randbytes: Callable[[int], bytes] | None = None,
                  clock: Callable[[], float] | None = None) -> Session:
    """Run the initiator side of the hybrid handshake (no TLS) over the connected ``sock``.

    Args:
        sock: a connected stream socket (its blocking mode and timeout are restored afterwards).
        config: the initiator's configuration.
        key_source: a :class:`~hybridkex.io.QKDKeyManager` (required for an epoch key budget) or a
            plain :class:`~hybridkex.qkd.KeySource`; None only when the policy disables QKD.
        timeout: overall deadline in seconds (default ``config.policy.timeouts.handshake``).
        randbytes, clock: passed to the core (tests inject deterministic ones).

    The authenticators' ``after_handshake`` hooks run once the handshake succeeded (the recycling
    authenticator records its key rotation there); if one fails the session is erased.

    Raises:
        HybridKEXError: a subclass saying what failed (authentication, policy, QKD, protocol,
            timeout); the peer has been sent an Abort where possible.
    """
    keys = key_manager(key_source, config.policy)  # before the core generates keys: fail fast
    return _run_hybrid(Initiator(config, randbytes=randbytes, clock=clock), sock, config, keys, timeout)


def run_responder(sock: socket.socket, config: ResponderConfig, key_source: KeySourceArg = None, *,
                  timeout: float | None = None, randbytes: Callable[[int], bytes] | None = None,
                  clock: Callable[[], float] | None = None) -> Session:
    """Run the responder side over the accepted ``sock``; returns the :class:`Session`.

    Same arguments and errors as :func:`run_initiator`.  A server calls it once per accepted
    connection and keeps serving whatever it raises.
    """
    keys = key_manager(key_source, config.policy)
    return _run_hybrid(Responder(config, randbytes=randbytes, clock=clock), sock, config, keys, timeout)

