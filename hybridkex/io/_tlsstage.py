"""The TLS stage of connection setup, sans-IO: a :class:`~hybridkex.tls.MemoryTLS` handshake with
the PSK already bound, under the stage's deadline, ending in :class:`Established` or :class:`Failed`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..exceptions import HandshakeTimeout, LocalProtocolError, TLSError
from ._events import NEED_DATA, Established, Failed

if TYPE_CHECKING:
    from ..protocol import Sentinel, SessionInfo
    from ..steady import SteadyFacts, SteadyTicket
    from ..tls import MemoryTLS
    from ._plumbing import ReconnectLookup, Stage
    from .reconnect import ReconnectTicket

__all__ = ["TLSStage"]


class TLSStage:
    """TLS 1.3 over memory BIOs for one connection.

    ``info`` is the hybrid session the PSK comes from (None on a server reconnect: ``lookup`` finds
    the parent).  ``check_first`` sees the first bytes received (before OpenSSL does) and may raise;
    ``on_failure`` undoes what the PSK decision registered (a ticket, a registry entry);
    ``on_success`` runs once TLS is verified (a steady-state connection's announced keys).
    """

    def __init__(self, tls: MemoryTLS, stage: Stage, info: SessionInfo | None, *,
                 reconnect_index: int | None = None, ticket: ReconnectTicket | SteadyTicket | None = None,
                 lookup: ReconnectLookup | None = None, check_first: Callable[[bytes], None] | None = None,
                 on_failure: Callable[[], None] | None = None, on_success: Callable[[], None] | None = None,
                 steady: SteadyFacts | None = None,
                 map_error: Callable[[BaseException], BaseException] | None = None) -> None:
        self._tls = tls
        self._stage = stage
        self._info = info
        self._index = reconnect_index
        self._ticket = ticket
        self._lookup = lookup
        self._check_first = check_first
        self._on_failure = on_failure
        self._on_success = on_success
        self._steady = steady
        self._map_error = map_error
        self._unsent = b""
        self._failure: Failed | None = None
        #: Whether OpenSSL ran since the last data_to_send(): only a handshake step (or its failure)
        #: writes records here, so otherwise there is nothing to read (a C call saved per poll).
        self._ran = False

    def carry(self, unsent: bytes, received: bytes, eof: bool) -> None:
        """Take over from the hybrid stage: its last flight, bytes that followed it, its EOF."""
        self._unsent = unsent
        if received:
            self.receive_data(received)
        if eof:
            self.receive_data(b"")

    def receive_data(self, data: bytes) -> None:
        if self._failure is not None:
            return
        try:
            if data and self._check_first is not None:
                check, self._check_first = self._check_first, None
                check(data)
            self._tls.receive_data(data)
        except Exception as exc:
            self._failure = self._failed(exc)

    def data_to_send(self) -> bytes:
        out, self._unsent = self._unsent, b""
        if not self._ran:
            return out
        self._ran = False
        return out + self._tls.data_to_send() if out else self._tls.data_to_send()

    def timeout(self) -> float:
        return self._stage.end - time.monotonic()

    def next_event(self) -> Sentinel | Established | Failed:
        if self._failure is not None:
            return self._failure
        self._ran = True
        try:
            tls_info = self._tls.do_handshake()
            if tls_info is None:
                return NEED_DATA
            info, index = self._info, self._index
            if self._lookup is not None:
                match = self._lookup.match
                if match is None:  # pragma: no cover - verify_connection() already insists on our PSK
                    raise LocalProtocolError("TLS completed without a reconnect PSK")
                info, index = match.info, match.index
            assert info is not None
            if self._on_success is not None:
                done, self._on_success, self._on_failure = self._on_success, None, None
                done()
            return Established(self._tls, info, tls_info, index, self._ticket, self._steady)
        except Exception as exc:
            self._failure = self._failed(exc)
            return self._failure

    def fail(self, exc: BaseException) -> Failed:
        """The driver's failure: its deadline passed (TimeoutError) or the connection broke (OSError)."""
        if self._failure is None:
            if isinstance(exc, TimeoutError) and not isinstance(exc, HandshakeTimeout):
                exc = self._stage.timeout_error()
            elif isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                exc = TLSError(f"the peer closed the connection during the TLS handshake ({type(exc).__name__})")
            self._failure = self._failed(exc)
        return self._failure

    def _failed(self, exc: BaseException) -> Failed:
        if self._on_failure is not None:
            undo, self._on_failure = self._on_failure, None
            undo()
        return Failed(self._map_error(exc) if self._map_error is not None else exc)
