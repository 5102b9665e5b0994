"""The blocking API: :func:`connect` and the socket-like :class:`HybridSocket`.

One TCP connection carries, in order:

1. the hybrid handshake (:mod:`hybridkex.io.sync`): ML-KEM + X25519 + QKD, mutually authenticated,
   giving a combined secret ``S``;
2. a TLS 1.3 handshake on the same socket with the external PSK ``(S.tls_identity(), S.tls_psk())``
   (psk_dhe_ke; X25519MLKEM768 preferred; no tickets), checked by
   :func:`hybridkex.tls.verify_connection`;
3. application data in TLS records.

A reconnect (docs/api.md, "Reconnects") skips step 1.  The server tells the two apart by the first
byte: ``0x16`` starts a TLS handshake record, ``0x48`` ("H") a hybridkex frame (magic ``"HK"``).

TLS runs on memory BIOs: this module moves the bytes.  That lets one thread send while another
receives on the same :class:`HybridSocket` (the TLS object is touched under a lock, the socket is
not), and gives :meth:`HybridSocket.makefile` the semantics of :meth:`socket.socket.makefile`
(pyOpenSSL's ``Connection.makefile`` is not implemented), so ``http.client``, ``http.server`` and
``socketserver`` handlers work unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import io
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import HandshakeTimeout, HybridKEXError
from ..protocol import SessionInfo
from ..steady import SteadyFacts, SteadyTicket
from ..tls import MemoryTLS, TLSInfo
from ..tls.pyopenssl import export_keying_material
from ._events import Established, HandshakeDone
from ._plumbing import ServerState, peer_ip
from .config import ClientConfig
from .keys import KeySourceArg
from .reconnect import ReconnectTicket
from .session import HybridSession
from .setup import ClientSetup, ServerSetup
from .sync import drive, wait_fd

if TYPE_CHECKING:
    from ..protocol import InitiatorConfig

__all__ = ["HybridSocket", "connect"]

Address = tuple[str, int]

#: Bytes read from the socket at a time, and plaintext encrypted per step of sendall().
_READ_CHUNK: Final = 65536
_SEND_CHUNK: Final = 65536
#: How long close() waits to hand close_notify to the kernel (it never waits for the peer).
_CLOSE_GRACE: Final = 1.0

# ---------------------------------------------------------------------------------------------
# The socket-like object
# ---------------------------------------------------------------------------------------------


class _HybridRawIO(io.RawIOBase):
    """The raw stream under :meth:`HybridSocket.makefile` (what :class:`socket.SocketIO` is to a
    socket): ``readinto`` and ``write`` go through TLS."""

    def __init__(self, sock: HybridSocket, mode: str) -> None:
        super().__init__()
        self._sock: HybridSocket | None = sock
        self._mode = mode
        self._reading = "r" in mode
        self._writing = "w" in mode
        self._timeout_occurred = False

    def _live(self) -> HybridSocket:
        if self.closed or self._sock is None:
            raise ValueError("I/O operation on closed file.")
        return self._sock

    def readinto(self, b: Any) -> int | None:
        sock = self._live()
        if not self._reading:
            raise io.UnsupportedOperation("not readable")
        if self._timeout_occurred:
            raise OSError("cannot read from timed out object")
        try:
            return sock.recv_into(b)
        except TimeoutError:
            self._timeout_occurred = True
            raise
        except BlockingIOError:
            return None

    def write(self, b: Any) -> int | None:
        sock = self._live()
        if not self._writing:
            raise io.UnsupportedOperation("not writable")
        try:
            return sock.send(b)
        except BlockingIOError:
            return None

    def readable(self) -> bool:
        return self._reading and not self.closed

    def writable(self) -> bool:
        return self._writing and not self.closed

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._live().fileno()

    @property
    def name(self) -> int:
        return self.fileno() if not self.closed else -1

    @property
    def mode(self) -> str:
        return self._mode

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock._decref_socketios()


class HybridSocket:
    """A connected, verified hybridkex connection with the interface of a blocking socket.

    ``send``/``sendall``/``recv``/``recv_into`` carry application data in TLS 1.3 records;
    ``makefile`` works as on a socket; ``shutdown(SHUT_WR)`` sends close_notify and half-closes
    TCP, after which the peer reads EOF while data still flows the other way; ``close`` sends
    close_notify (best effort) and closes.  ``settimeout``/``setblocking`` behave as on a socket
    (``TimeoutError`` on expiry).  One thread may send while another receives.

    :attr:`session` reports what was established; :meth:`channel_binding` gives the RFC 9266
    ``tls-exporter`` value.  An EOF without close_notify raises :class:`~hybridkex.TLSError`
    (possible truncation) rather than looking like a clean end.
    """

    def __init__(self, sock: socket.socket, tls: MemoryTLS, info: SessionInfo, tls_info: TLSInfo, *,
                 reconnect_index: int | None = None, ticket: ReconnectTicket | SteadyTicket | None = None,
                 steady: SteadyFacts | None = None) -> None:
        sock.setblocking(False)  # we wait with poll(); the timeout below is ours
        self._sock = sock
        self._tls = tls
        self._ssl_lock = threading.Lock()  # every call into the TLS object
        self._write_lock = threading.Lock()  # one writer of records at a time (keeps them in order)
        self._read_lock = threading.Lock()
        self._pending = bytearray()  # records made, not yet taken by a writer (under _ssl_lock)
        self._unsent = memoryview(b"")  # records taken by the writer, not yet in the kernel
        self._timeout: float | None = None
        self._closed = False
        self._real_closed = False
        self._wrote_eof = False
        self._io_refs = 0
        self._ticket = ticket
        self._session = HybridSession(info, tls_info, reconnect_index is not None, reconnect_index,
                                      self.export_keying_material, steady=steady)

    def __repr__(self) -> str:
        state = "closed" if self._real_closed else f"fd={self.fileno()}"
        laddr = raddr = None
        with contextlib.suppress(OSError):
            laddr, raddr = self._sock.getsockname(), self._sock.getpeername()
        kind = f" reconnect#{self._session.reconnect_index}" if self._session.reconnect else ""
        if self._session.steady is not None:
            kind = f" steady#{self._session.steady.index}"
        return (f"<HybridSocket {state} laddr={laddr} raddr={raddr} peer={self._session.peer_identity!r} "
                f"{self._session.version} {self._session.group}{kind}>")

    # --- what was established ---------------------------------------------------------------------

    @property
    def session(self) -> HybridSession:
        """The hybrid handshake and TLS facts of this connection (no secrets)."""
        return self._session

    @property
    def reconnect_ticket(self) -> ReconnectTicket | SteadyTicket | None:
        """The client's ticket for later connections to this server: a :class:`~hybridkex.steady.SteadyTicket`
        (the steady state, on by default) or a :class:`ReconnectTicket`; None unless this connection ran a
        full hybrid handshake with either enabled."""
        return self._ticket

    def channel_binding(self) -> bytes:
        """RFC 9266 ``tls-exporter`` channel binding (32 bytes, equal on both ends)."""
        return self._session.channel_binding()

    def export_keying_material(self, label: bytes, length: int, context: bytes | None = None) -> bytes:
        """An application key from the TLS exporter (RFC 8446 section 7.5), equal on both ends."""
        with self._ssl_lock:
            return export_keying_material(self._tls.connection, label, length, context)

    # --- socket plumbing ---------------------------------------------------------------------------

    def fileno(self) -> int:
        """The TCP socket's file descriptor (-1 once closed)."""
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    @property
    def family(self) -> socket.AddressFamily:
        return self._sock.family

    @property
    def type(self) -> socket.SocketKind:
        return self._sock.type

    @property
    def proto(self) -> int:
        return self._sock.proto

    def settimeout(self, value: float | None) -> None:
        """Seconds each blocking operation may wait (``TimeoutError``); None blocks, 0 never waits."""
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError("Timeout value out of range")
            value = float(value)
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def pending(self) -> int:
        """Decrypted bytes buffered in TLS, readable without touching the socket."""
        with self._ssl_lock:
            return int(self._tls.connection.pending())

    def __enter__(self) -> HybridSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- waiting -------------------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _wait(self, write: bool, deadline: float | None) -> None:
        if self._timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, "the operation would block")
        left = None if deadline is None else deadline - time.monotonic()
        if (left is not None and left <= 0) or not wait_fd(self._sock.fileno(), write, left):
            raise TimeoutError("timed out")

    def _check_open(self) -> None:
        # As for a socket: close() with makefile() objects still open leaves the connection usable
        # through them until the last one is closed.
        if self._real_closed:
            raise OSError(errno.EBADF, "Bad file descriptor")

    # --- reading -------------------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes of application data; ``b""`` once the peer sent close_notify."""
        if flags:
            raise ValueError("flags are not supported on a TLS connection")
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        self._check_open()
        if bufsize == 0:
            return b""
        with self._read_lock:
            deadline = self._deadline()
            while True:
                with self._ssl_lock:
                    data = self._tls.recv(bufsize)
                    self._collect()
                    produced = bool(self._pending)
                if produced:  # e.g. a KeyUpdate answer; never block the read path on sending it
                    self._kick()
                if data is not None:
                    return data
                chunk = self._raw_recv(deadline)
                with self._ssl_lock:
                    self._tls.receive_data(chunk)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Like :meth:`recv`, into ``buffer``; returns the number of bytes read."""
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def _raw_recv(self, deadline: float | None) -> bytes:
        while True:
            try:
                return self._sock.recv(_READ_CHUNK)
            except BlockingIOError:
                pass
            self._wait(False, deadline)

    # --- writing -------------------------------------------------------------------------------------

    def _collect(self) -> None:
        """Move the records TLS produced to the pending buffer (caller holds _ssl_lock)."""
        out = self._tls.data_to_send()
        if out:
            self._pending += out

    def _encrypt(self, data: memoryview) -> None:
        with self._ssl_lock:
            if self._wrote_eof:
                raise BrokenPipeError(errno.EPIPE, "cannot send after shutdown(SHUT_WR) or close()")
            self._tls.send(data)
            self._collect()

    def _flush(self, deadline: float | None, *, wait: bool = True) -> None:
        """Hand every pending record to the kernel (caller holds _write_lock)."""
        while True:
            if not self._unsent:
                with self._ssl_lock:
                    self._collect()
                    if not self._pending:
                        return
                    self._unsent = memoryview(bytes(self._pending))
                    self._pending.clear()
            try:
                self._unsent = self._unsent[self._sock.send(self._unsent):]
                continue
            except BlockingIOError:
                if not wait:
                    return
            self._wait(True, deadline)

    def _kick(self) -> None:
        """Send what the read path produced if no writer is busy, without waiting on the socket."""
        if self._write_lock.acquire(blocking=False):
            try:
                self._flush(None, wait=False)
            except OSError:
                pass  # the next writer (or close) will see the failure
            finally:
                self._write_lock.release()

    def send(self, data: Any) -> int:
        """Send up to 64 KiB of ``data``; returns how many bytes were taken.

        Bytes are taken once encrypted: if the socket then cannot take the records before the
        timeout (or at once, in non-blocking mode), they stay queued and go out first on the next
        call (which raises if it cannot send them either), so nothing is ever sent twice."""
        self._check_open()
        view = memoryview(data).cast("B")[:_SEND_CHUNK]
        if not view:
            return 0
        with self._write_lock:
            deadline = self._deadline()
            self._flush(deadline)  # records an earlier call left behind go first; nothing taken yet
            self._encrypt(view)
            with contextlib.suppress(BlockingIOError, TimeoutError):
                self._flush(deadline)
        return len(view)

    def sendall(self, data: Any) -> None:
        """Send all of ``data`` (the timeout bounds the whole call, as for a socket)."""
        self._check_open()
        view = memoryview(data).cast("B")
        with self._write_lock:
            deadline = self._deadline()
            self._flush(deadline)
            for start in range(0, len(view), _SEND_CHUNK):
                self._encrypt(view[start:start + _SEND_CHUNK])
                self._flush(deadline)

    def _send_close_notify(self, deadline: float | None, *, lock_timeout: float = -1) -> None:
        if not self._write_lock.acquire(timeout=lock_timeout):
            return  # a writer is stuck on a full socket; closing will not wait for it
        try:
            with self._ssl_lock:
                if self._wrote_eof:
                    first = False
                else:
                    first = self._wrote_eof = True
                    self._tls.close()  # queues close_notify
                    self._collect()
            if first or self._unsent:
                self._flush(deadline)
        finally:
            self._write_lock.release()

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``: send close_notify, then half-close TCP; the peer reads EOF and may keep
        sending (TLS 1.3 allows it).  ``SHUT_RD`` stops reading; ``SHUT_RDWR`` does both."""
        self._check_open()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._send_close_notify(self._deadline())
        self._sock.shutdown(how)

    def close(self) -> None:
        """Send close_notify if not sent yet (best effort, without waiting for the peer) and close.

        As with a socket, the connection stays open until every file from :meth:`makefile` is
        closed too."""
        if self._closed:
            return
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        if self._real_closed:
            return
        self._real_closed = True
        try:
            grace = _CLOSE_GRACE if self._timeout is None else min(self._timeout, _CLOSE_GRACE)
            saved, self._timeout = self._timeout, grace
            try:
                self._send_close_notify(time.monotonic() + grace, lock_timeout=grace)
            finally:
                self._timeout = saved
        except (OSError, HybridKEXError):
            pass  # the peer is gone or slow; it will see an EOF without close_notify
        finally:
            self._sock.close()

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._real_close()

    def makefile(self, mode: str = "r", buffering: int | None = None, *, encoding: str | None = None,
                 errors: str | None = None, newline: str | None = None) -> Any:
        """A file object reading and/or writing application data, as :meth:`socket.socket.makefile`."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        if self._closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        raw = _HybridRawIO(self, rawmode)
        self._io_refs += 1
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, encoding, errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text


# ---------------------------------------------------------------------------------------------
# Connection setup: the setup machines of hybridkex.io.setup, driven by hybridkex.io.sync
# ---------------------------------------------------------------------------------------------


def connect(address: Address, config: ClientConfig | InitiatorConfig, *, key_source: KeySourceArg = None,
            timeout: float | None = None, ticket: ReconnectTicket | SteadyTicket | None = None,
            source_address: tuple[str, int] | None = None) -> HybridSocket:
    """Open a hybridkex connection to ``address`` and return it once TLS is verified.

    Args:
        address: ``(host, port)``.
        config: a :class:`ClientConfig` (or a bare :class:`~hybridkex.protocol.InitiatorConfig`).
        key_source: a :class:`~hybridkex.qkd.KeySource` (or a long-lived
            :class:`~hybridkex.io.QKDKeyManager`, required for an epoch key budget); None only
            when the policy disables QKD.
        timeout: deadline in seconds for the whole setup (default ``config.timeout``).  It does
            not apply to the returned socket, which blocks until you call ``settimeout``.
        ticket: a :class:`ReconnectTicket` from an earlier connection to the same server: while it
            is usable the connection goes straight to TLS (no hybrid exchange); otherwise a full
            handshake runs.
        source_address: as for :func:`socket.create_connection`.

    Raises:
        HybridKEXError: a subclass saying what failed (authentication, policy, QKD, TLS, protocol);
            :class:`~hybridkex.HandshakeTimeout` for a deadline; ``OSError`` if TCP cannot connect.
    """
    setup = ClientSetup(config, key_source, ticket=ticket, timeout=timeout)
    try:
        sock = socket.create_connection(address, timeout=setup.connect_timeout(), source_address=source_address)
    except TimeoutError as exc:
        raise HandshakeTimeout(f"TCP connect to {address[0]}:{address[1]} timed out") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the handshakes are latency-bound
        return _established(sock, drive(setup, sock))
    except BaseException:
        sock.close()
        raise


def accept(sock: socket.socket, state: ServerState) -> HybridSocket:
    """Run the server side of connection setup on an accepted socket: hybrid handshake then TLS,
    or a reconnect straight to TLS, told apart by the first byte.  Raises on any failure (the
    caller logs and closes ``sock``)."""
    try:
        peer = peer_ip(sock.getpeername())
    except OSError:  # already gone: the setup fails on its first read
        peer = None
    setup = ServerSetup(state, peer=peer)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _established(sock, drive(setup, sock))


def _established(sock: socket.socket, event: Established | HandshakeDone) -> HybridSocket:
    assert isinstance(event, Established)
    return HybridSocket(sock, event.tls, event.info, event.tls_info, reconnect_index=event.reconnect_index,
                        ticket=event.ticket, steady=event.steady)
