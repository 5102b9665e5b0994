"""The events of the setup machines (:mod:`hybridkex.io.setup`) and of the hybrid stage alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol import NEED_DATA, QKDKeysByIdRequired, QKDKeysRequired, Sentinel

if TYPE_CHECKING:
    from ..protocol import Session, SessionInfo
    from ..steady import SteadyFacts, SteadyTicket
    from ..tls import MemoryTLS, TLSInfo
    from .reconnect import ReconnectTicket

__all__ = ["NEED_DATA", "BlockingCall", "Established", "Failed", "HandshakeDone", "QKDRequest", "RunHooks",
           "SetupEvent", "StateCall"]


class BlockingCall:
    """Blocking work the setup waits for: run :meth:`run` off the event loop (a worker thread), give
    up after :attr:`timeout` seconds, and report with ``call_done(value)`` / ``call_failed(exc)``."""

    __slots__ = ("_fn", "timeout", "what")

    def __init__(self, fn: Callable[[], Any], timeout: float, what: str) -> None:
        self._fn = fn
        self.timeout = timeout
        self.what = what

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.what!r} timeout={self.timeout:.3g}>"

    def run(self) -> Any:
        return self._fn()


class QKDRequest(BlockingCall):
    """Ask the key manager for this handshake's QKD keys (:attr:`request` says which)."""

    __slots__ = ("request",)

    def __init__(self, fn: Callable[[], Any], timeout: float, request: QKDKeysRequired | QKDKeysByIdRequired) -> None:
        super().__init__(fn, timeout, "the QKD key source")
        self.request = request


class StateCall(BlockingCall):
    """Read or spend in the shared state (:mod:`hybridkex.state`): a database round trip, which an
    asyncio server makes on a worker thread rather than on its event loop."""

    __slots__ = ()

    def __init__(self, fn: Callable[[], Any], timeout: float) -> None:
        super().__init__(fn, timeout, "the shared state")


class RunHooks(BlockingCall):
    """Run the authenticators' ``after_handshake`` hooks (recycled keys record their rotation)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, eq=False)
class HandshakeDone:
    """The hybrid handshake (and its hooks) succeeded; the setup machines go on to TLS."""

    session: Session


@dataclass(frozen=True, slots=True, eq=False)
class Established:
    """TLS is verified: the connection is ready for application data.

    ``tls`` holds every byte received so far (early application data included); ``info`` is the hybrid
    session (a reconnect's or steady-state connection's parent); ``ticket`` the client's reconnect or
    steady-state ticket, if a full handshake made one; ``steady`` the facts of a steady-state connection.
    """

    tls: MemoryTLS
    info: SessionInfo
    tls_info: TLSInfo
    reconnect_index: int | None = None
    ticket: ReconnectTicket | SteadyTicket | None = None
    steady: SteadyFacts | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Failed:
    """Setup failed with ``error`` (a typed :class:`~hybridkex.HybridKEXError` unless a bug).

    Send :meth:`data_to_send` (best effort: the Abort or alert), then, if ``await_peer_close``, read
    until the peer closes (briefly: see :mod:`hybridkex.io._stale`), then raise ``error``."""

    error: BaseException
    await_peer_close: bool = False


SetupEvent = Sentinel | QKDRequest | StateCall | RunHooks | HandshakeDone | Established | Failed
