"""The asyncio API: :func:`open_connection`, :func:`start_server`, and the asyncio driver of the
sans-IO handshake (:func:`run_initiator`, :func:`run_responder`).

Shaped like :func:`asyncio.open_connection` / :func:`asyncio.start_server`: a connection is a
(:class:`HybridStreamReader`, :class:`HybridStreamWriter`) pair with the methods of asyncio's
``StreamReader``/``StreamWriter``; ``writer.get_extra_info("hybridkex_session")`` is the
:class:`~hybridkex.io.session.HybridSession`.

TLS runs on memory BIOs (:class:`hybridkex.tls.AsyncTLSStream`); only writes and the handshake
await ``drain()``, the read path never does (two peers sending at once would deadlock).  QKD
requests are answered by a :class:`~hybridkex.io.QKDKeyManager` in a worker thread under the
policy's KME deadline, whether the key source is blocking (:class:`~hybridkex.qkd.KeySource`) or
asyncio (:class:`~hybridkex.qkd.AsyncKeySource`, whose coroutines then run on this event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

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
    Authenticator,
    HandshakeComplete,
    Initiator,
    InitiatorConfig,
    QKDKeysByIdRequired,
    QKDKeysRequired,
    Responder,
    ResponderConfig,
    Session,
)
from ..protocol._wire import MAGIC, AbortCode
from ..qkd.base import KeySourceStatus, QKDKey
from ..tls._bio import AsyncTLSStream, MemoryTLS
from ..tls.pyopenssl import bind_psk, bind_psk_lookup, export_keying_material
from . import _stale
from ._plumbing import (
    Deadline,
    ReconnectLookup,
    ServerState,
    Stage,
    check_key_source,
    check_server_first_bytes,
    client_keys,
    is_async_source,
    log_rejection,
    server_keys,
    tls_context,
)
from .config import ClientConfig, ServerConfig
from .keys import QKDKeyManager
from .reconnect import (
    TLS_HANDSHAKE_BYTE,
    ReconnectKey,
    ReconnectRegistry,
    ReconnectTicket,
    client_hello_cipher,
    tls_record_length,
)
from .session import HybridSession

if TYPE_CHECKING:
    from ..tls._common import TLSInfo

__all__ = [
    "HybridAsyncServer",
    "HybridStreamReader",
    "HybridStreamWriter",
    "open_connection",
    "run_initiator",
    "run_responder",
    "start_server",
]

_log = logging.getLogger("hybridkex.server")
T = TypeVar("T")

#: Default buffer limit of the reader (as asyncio's): readline() refuses longer lines.
DEFAULT_LIMIT = 2**16
_RECV_CHUNK = 65536
_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# ---------------------------------------------------------------------------------------------
# Key sources
# ---------------------------------------------------------------------------------------------


class _BlockingBridge:
    """A blocking :class:`~hybridkex.qkd.KeySource` view of an :class:`~hybridkex.qkd.AsyncKeySource`,
    for the key manager's worker threads: each call runs the coroutine on ``loop`` and waits."""

    def __init__(self, source: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._loop = loop

    def __repr__(self) -> str:
        return f"<blocking view of {self._source!r}>"

    @property
    def sae_id(self) -> str:
        return str(self._source.sae_id)

    @property
    def kme_id(self) -> str:
        return str(self._source.kme_id)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise RuntimeError("the blocking view of an asyncio key source was called on its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get_keys(self, slave_sae_id: str, number: int = 1, size_bits: int = 256) -> list[QKDKey]:
        return list(self._run(self._source.get_keys(slave_sae_id, number, size_bits)))

    def get_keys_by_id(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QKDKey]:
        return list(self._run(self._source.get_keys_by_id(master_sae_id, key_ids)))

    def status(self, slave_sae_id: str) -> KeySourceStatus:
        result: KeySourceStatus = self._run(self._source.status(slave_sae_id))
        return result

    def discard_stale(self, slave_sae_id: str, key_ids: Sequence[str] = (), *, reported_by_peer: bool = True) -> int:
        discard = getattr(self._source, "discard_stale", None)  # a plain method on AsyncKeyPool
        return int(discard(slave_sae_id, key_ids, reported_by_peer=reported_by_peer)) if callable(discard) else 0


def _manager(source: Any, config: InitiatorConfig | ResponderConfig) -> QKDKeyManager | None:
    """The key manager for one handshake (a long-lived one if ``source`` is one)."""
    policy = config.policy
    if source is None:
        if policy.uses_qkd:
            raise ConfigurationError(f"the policy's QKD mode is {policy.qkd.value!r} but no key source was "
                                     "given", field="key_source")
        return None
    if isinstance(source, QKDKeyManager):
        return source
    if policy.key_budget.mode == "epoch":
        raise ConfigurationError("an epoch key budget keeps keys between handshakes: pass one long-lived "
                                 "QKDKeyManager (or use HybridClient / start_server, which keep one)",
                                 field="key_source")
    if is_async_source(source):
        source = _BlockingBridge(source, asyncio.get_running_loop())
    return QKDKeyManager(source, policy.key_budget)


# ---------------------------------------------------------------------------------------------
# The asyncio driver of the sans-IO handshake
# ---------------------------------------------------------------------------------------------


async def _flush(conn: Initiator | Responder, writer: asyncio.StreamWriter) -> None:
    data = conn.data_to_send()
    if data:
        writer.write(data)
        await writer.drain()


def _flush_nowait(conn: Initiator | Responder, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        data = conn.data_to_send()
        if data and not writer.is_closing():
            writer.write(data)


async def _answer(conn: Initiator | Responder, keys: QKDKeyManager | None,
                  event: QKDKeysRequired | QKDKeysByIdRequired, timeout: float, use: _stale.QKDUse) -> None:
    if keys is None:
        conn.qkd_unavailable("no key source is configured")
        return
    try:
        delivered = await workers.call_async(lambda: keys.answer(event), timeout, "the QKD key source")
    except (KeySourceError, HandshakeTimeout) as exc:
        conn.qkd_unavailable(exc)  # the policy decides: the no-QKD suite, or a clear failure
        return
    except PolicyViolation:
        conn.abort(AbortCode.POLICY)
        raise
    except Exception:
        conn.abort(AbortCode.GENERIC)
        raise
    use.got(delivered)
    conn.provide_qkd_keys(delivered)


def _hooks(config: InitiatorConfig | ResponderConfig) -> list[Authenticator]:
    """Authenticators with an ``after_handshake`` of their own (recycled keys record a rotation)."""
    return [a for a in config.authenticators if type(a).after_handshake is not Authenticator.after_handshake]


async def _after_handshake(config: InitiatorConfig | ResponderConfig, session: Session, timeout: float) -> None:
    """Run the authenticators' after-handshake hooks, as the blocking driver does (in a thread:
    they may block); a failure erases the session."""
    hooks = _hooks(config)
    if not hooks:
        return

    def run() -> None:
        for auth in hooks:
            auth.after_handshake(session)

    try:
        await workers.call_async(run, timeout, "the after-handshake hook")
    except BaseException:
        session.erase()
        raise


async def _drive(conn: Initiator | Responder, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 keys: QKDKeyManager | None, *, timeout: float, kme_timeout: float,
                 config: InitiatorConfig | ResponderConfig) -> Session:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    use = _stale.QKDUse()
    try:
        async with asyncio.timeout_at(end):
            await _flush(conn, writer)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    await _flush(conn, writer)  # whatever next_event() produced goes out before we wait
                    # Exactly the current frame's bytes: what follows (TLS) stays in the reader.
                    conn.receive_data(await reader.read(max(conn.bytes_wanted(), 1)))
                elif isinstance(event, QKDKeysRequired | QKDKeysByIdRequired):
                    use.asked(event)
                    await _answer(conn, keys, event, min(kme_timeout, max(end - loop.time(), 0.0)), use)
                elif isinstance(event, HandshakeComplete):
                    await _flush(conn, writer)  # the initiator's Finished leaves before anything is recorded
                    await _after_handshake(config, event.session, max(end - loop.time(), 0.0))
                    return event.session
                await _flush(conn, writer)
    except TimeoutError as exc:
        if isinstance(exc, HandshakeTimeout):
            _flush_nowait(conn, writer)
            raise
        conn.abort(AbortCode.TIMEOUT)
        _flush_nowait(conn, writer)
        raise HandshakeTimeout(f"the hybrid handshake did not complete within {timeout:.3g} s") from None
    except HybridKEXError as exc:
        _flush_nowait(conn, writer)
        use.failed(exc, keys)  # a KME did not know our QKD key: drop stale pooled keys
        if _stale.must_await_close(conn, exc):
            await _stale.await_close_async(reader)
        raise
    except OSError as exc:
        conn.abort(AbortCode.GENERIC)
        raise RemoteProtocolError(f"the connection to the peer failed during the handshake: {exc}") from exc


async def run_initiator(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: InitiatorConfig,
                        key_source: Any = None, *, timeout: float | None = None,
                        randbytes: Callable[[int], bytes] | None = None,
                        clock: Callable[[], float] | None = None) -> Session:
    """Run the initiator side of the hybrid handshake over an asyncio stream pair.

    ``key_source``: a :class:`~hybridkex.io.QKDKeyManager`, a :class:`~hybridkex.qkd.KeySource` or an
    :class:`~hybridkex.qkd.AsyncKeySource`; None only when the policy disables QKD.  ``timeout``
    defaults to ``config.policy.timeouts.handshake``; each key-source call is bounded by
    ``config.policy.timeouts.kme``.  On failure the peer is sent an Abort where possible and a
    :class:`~hybridkex.HybridKEXError` is raised; the caller closes the stream.  On success the
    stream is positioned right after the handshake.
    """
    keys = _manager(key_source, config)
    conn = Initiator(config, randbytes=randbytes, clock=clock)
    t = config.policy.timeouts
    return await _drive(conn, reader, writer, keys, timeout=timeout or t.handshake, kme_timeout=t.kme, config=config)


async def run_responder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: ResponderConfig,
                        key_source: Any = None, *, timeout: float | None = None, initial: bytes = b"",
                        randbytes: Callable[[int], bytes] | None = None,
                        clock: Callable[[], float] | None = None) -> Session:
    """Run the responder side over an asyncio stream pair; ``initial`` holds bytes already read
    from the stream (e.g. the first byte a server looked at).  Otherwise as :func:`run_initiator`."""
    keys = _manager(key_source, config)
    conn = Responder(config, randbytes=randbytes, clock=clock)
    if initial:
        conn.receive_data(initial)
    t = config.policy.timeouts
    return await _drive(conn, reader, writer, keys, timeout=timeout or t.handshake, kme_timeout=t.kme, config=config)


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


class HybridStreamReader:
    """Application data of a hybridkex connection, with :class:`asyncio.StreamReader`'s methods.

    Reads pull TLS records from the socket only when asked (natural backpressure).  ``read``
    returns ``b""`` at the peer's close_notify; an EOF without close_notify raises
    :class:`~hybridkex.TLSError` (possible truncation).  One task reads at a time.
    """

    def __init__(self, stream: AsyncTLSStream, limit: int = DEFAULT_LIMIT) -> None:
        if limit <= 0:
            raise ValueError("Limit cannot be <= 0")
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False
        self._busy = False

    def __repr__(self) -> str:
        return f"<HybridStreamReader buffered={len(self._buffer)}{' eof' if self._eof else ''}>"

    async def _fill(self) -> bool:
        """Read more application data; False at EOF."""
        if self._eof:
            return False
        if self._busy:
            raise RuntimeError("another coroutine is already waiting for incoming data")
        self._busy = True
        try:
            data = await self._stream.recv(max(self._limit, _RECV_CHUNK))
        finally:
            self._busy = False
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    def at_eof(self) -> bool:
        """True once the peer's close_notify arrived and the buffer is empty."""
        return self._eof and not self._buffer

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``n < 0``: everything until EOF); ``b""`` at EOF."""
        if n == 0:
            return b""
        if n < 0:
            while await self._fill():
                pass
            return self._take(len(self._buffer))
        if not self._buffer:
            await self._fill()
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`asyncio.IncompleteReadError` at EOF."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while len(self._buffer) < n:
            if not await self._fill():
                partial = self._take(len(self._buffer))
                raise asyncio.IncompleteReadError(partial, n)
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Data up to and including ``separator`` (asyncio's semantics and limit errors)."""
        seplen = len(separator)
        if seplen == 0:
            raise ValueError("Separator should be at least one-byte string")
        offset = 0
        while True:
            index = self._buffer.find(separator, offset)
            if index != -1:
                if index > self._limit:
                    raise asyncio.LimitOverrunError("Separator is found, but chunk is longer than limit", index)
                return self._take(index + seplen)
            offset = max(0, len(self._buffer) + 1 - seplen)
            if offset > self._limit:
                raise asyncio.LimitOverrunError("Separator is not found, and chunk exceed the limit", offset)
            if not await self._fill():
                raise asyncio.IncompleteReadError(self._take(len(self._buffer)), None)

    async def readline(self) -> bytes:
        """One line including ``\\n``; the partial last line at EOF; ValueError past the limit."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            if self._buffer.startswith(b"\n", exc.consumed):
                del self._buffer[: exc.consumed + 1]
            else:
                self._buffer.clear()
            raise ValueError(exc.args[0]) from None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class HybridStreamWriter:
    """Sends application data of a hybridkex connection, with :class:`asyncio.StreamWriter`'s methods.

    ``write`` encrypts at once and hands the records to the transport; ``drain`` applies
    backpressure; ``write_eof`` sends close_notify and half-closes TCP (the peer reads EOF, data
    still flows to us: TLS 1.3 allows it); ``close`` sends close_notify and closes.
    ``get_extra_info("hybridkex_session")`` is the :class:`HybridSession`.
    """

    def __init__(self, stream: AsyncTLSStream, writer: asyncio.StreamWriter, session_facts: tuple[Any, ...],
                 ticket: ReconnectTicket | None = None) -> None:
        self._stream = stream
        self._writer = writer
        self._eof_sent = False
        self._ticket = ticket
        conn = stream.tls.connection

        def exporter(label: bytes, length: int, context: bytes | None) -> bytes:
            return export_keying_material(conn, label, length, context)

        info, tls_info, index = session_facts
        self._session = HybridSession(info, tls_info, index is not None, index, exporter)

    def __repr__(self) -> str:
        return f"<HybridStreamWriter peer={self._session.peer_identity!r} {self._session.group}>"

    @property
    def session(self) -> HybridSession:
        """The hybrid handshake and TLS facts of this connection (no secrets)."""
        return self._session

    @property
    def reconnect_ticket(self) -> ReconnectTicket | None:
        """The client's ticket for reconnects (None unless a full handshake ran with reconnects on)."""
        return self._ticket

    @property
    def transport(self) -> asyncio.BaseTransport:
        """The TCP transport underneath (writing to it directly would bypass TLS: don't)."""
        return self._writer.transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``"hybridkex_session"``: the :class:`HybridSession`; ``"tls_info"``: the TLS facts;
        ``"hybridkex_ticket"``: the reconnect ticket; anything else: the TCP transport's."""
        if name == "hybridkex_session":
            return self._session
        if name == "tls_info":
            return self._session.tls
        if name == "hybridkex_ticket":
            return self._ticket
        return self._writer.get_extra_info(name, default)

    def _flush_nowait(self) -> None:
        out = self._stream.tls.data_to_send()
        if out:
            self._writer.write(out)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and hand it to the transport (call :meth:`drain` for backpressure)."""
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof() or close()")
        if self._writer.is_closing():
            raise ConnectionResetError("the connection is closing")
        self._stream.tls.send(data)
        self._flush_nowait()

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        await self._writer.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify and half-close TCP; reading goes on until the peer's EOF."""
        if self._eof_sent:
            return
        self._eof_sent = True
        self._stream.tls.close()
        self._flush_nowait()
        if self._writer.can_write_eof():
            self._writer.write_eof()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        """Send close_notify (if not sent yet) and close the transport."""
        if self._writer.is_closing():
            return
        if not self._eof_sent:
            self._eof_sent = True
            with contextlib.suppress(Exception):  # a broken TLS state has nothing to announce
                self._stream.tls.close()
                self._flush_nowait()
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def aclose(self) -> None:
        """:meth:`close` and :meth:`wait_closed`."""
        self.close()
        await self.wait_closed()


# ---------------------------------------------------------------------------------------------
# Setup (client and server)
# ---------------------------------------------------------------------------------------------


async def _within(stage: Stage, awaitable: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout(stage.left()):
            return await awaitable
    except TimeoutError as exc:
        if isinstance(exc, HandshakeTimeout):
            raise
        raise HandshakeTimeout(f"{stage.name} did not complete within {stage.limit:.3g} s") from None


class _FirstReadCheck:
    """A stream reader whose first chunk is shown to ``check`` (which may raise) before anyone else."""

    def __init__(self, reader: asyncio.StreamReader, check: Callable[[bytes], None]) -> None:
        self._reader = reader
        self._check: Callable[[bytes], None] | None = check

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        if self._check is not None:
            check, self._check = self._check, None
            check(data)
        return data


async def _tls(ctx_role: str, cipher: str, cfg: ClientConfig | ServerConfig, streams: _Streams, stage: Stage, *,
               reconnect: bool, bind: Callable[[Any], None], initial: bytes = b"",
               check_first: Callable[[bytes], None] | None = None) -> tuple[AsyncTLSStream, TLSInfo]:
    reader, writer = streams
    tls = MemoryTLS(tls_context(ctx_role, cipher, cfg.tls, reconnect=reconnect), server_side=ctx_role == "server")
    bind(tls.connection)
    if initial:
        tls.receive_data(initial)
    source = cast(asyncio.StreamReader, _FirstReadCheck(reader, check_first)) if check_first else reader
    stream = AsyncTLSStream(tls, source, writer)
    info = await stream.handshake(stage.left())
    return stream, info


async def _client_full(streams: _Streams, cfg: ClientConfig, keys: Any, deadline: Deadline,
                       limit: int) -> tuple[HybridStreamReader, HybridStreamWriter]:
    reader, writer = streams
    policy = cfg.handshake.policy
    session = await run_initiator(reader, writer, cfg.handshake, keys,
                                  timeout=deadline.remaining("the hybrid handshake", policy.timeouts.handshake))
    k = client_keys(session, cfg.reconnect)
    try:
        stream, info = await _tls("client", k.cipher, cfg, streams,
                                  deadline.stage("the TLS handshake", cfg.tls.timeout), reconnect=False,
                                  bind=lambda c: bind_psk(c, k.identity, k.psk),
                                  check_first=check_server_first_bytes)
    except BaseException:
        if k.ticket is not None:
            k.ticket.erase()
        raise
    return (HybridStreamReader(stream, limit),
            HybridStreamWriter(stream, writer, (session.info, info, None), k.ticket))


async def _client_reconnect(streams: _Streams, cfg: ClientConfig, key: ReconnectKey, deadline: Deadline,
                            limit: int) -> tuple[HybridStreamReader, HybridStreamWriter]:
    stream, info = await _tls("client", key.cipher, cfg, streams,
                              deadline.stage("the TLS handshake (reconnect)", cfg.tls.timeout), reconnect=True,
                              bind=lambda c: bind_psk(c, key.identity, key.psk))
    return HybridStreamReader(stream, limit), HybridStreamWriter(stream, streams[1], (key.info, info, key.index))


async def open_connection(host: str | None = None, port: int | None = None,
                          config: ClientConfig | InitiatorConfig | None = None, *, key_source: Any = None,
                          timeout: float | None = None, ticket: ReconnectTicket | None = None,
                          limit: int = DEFAULT_LIMIT, **kwargs: Any) -> tuple[HybridStreamReader, HybridStreamWriter]:
    """Open a hybridkex connection; returns ``(reader, writer)`` once TLS is verified.

    Args:
        host, port: as for :func:`asyncio.open_connection` (extra ``kwargs`` go to it, e.g.
            ``local_addr``, ``family``).
        config: a :class:`ClientConfig` (or a bare :class:`~hybridkex.protocol.InitiatorConfig`).
        key_source: :class:`~hybridkex.qkd.KeySource`, :class:`~hybridkex.qkd.AsyncKeySource` or
            :class:`~hybridkex.io.QKDKeyManager`; None only when the policy disables QKD.
        timeout: deadline in seconds for the whole setup (default ``config.timeout``).
        ticket: a :class:`ReconnectTicket`: while usable, the connection goes straight to TLS.
        limit: the reader's buffer limit (``readline``), as in asyncio.

    Raises:
        HybridKEXError: the typed reason (authentication, policy, QKD, TLS, protocol, timeout);
            ``OSError`` if TCP cannot connect.
    """
    if config is None:
        raise ConfigurationError("a ClientConfig is required", field="config")
    cfg = ClientConfig.coerce(config)
    deadline = Deadline(cfg.timeout if timeout is None else timeout)
    key = ticket.take() if ticket is not None else None
    keys = None
    if key is None:
        check_key_source(cfg, key_source)
        keys = _manager(key_source, cfg.handshake)
    try:
        reader, writer = await _within(deadline.stage("TCP connect"),
                                       asyncio.open_connection(host, port, limit=limit, **kwargs))
    except HandshakeTimeout as exc:
        raise HandshakeTimeout(f"TCP connect to {host}:{port} timed out") from exc
    try:
        if key is not None:
            return await _client_reconnect((reader, writer), cfg, key, deadline, limit)
        return await _client_full((reader, writer), cfg, keys, deadline, limit)
    except BaseException:
        writer.close()
        raise


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: ServerState,
                  limit: int) -> tuple[HybridStreamReader, HybridStreamWriter]:
    cfg = state.config
    deadline = Deadline(cfg.timeout)
    first = await _within(deadline.stage("waiting for the client's first byte"), reader.read(1))
    if not first:
        raise RemoteProtocolError("the peer closed the connection without sending anything")
    if first[0] == TLS_HANDSHAKE_BYTE:
        stage = deadline.stage("the TLS handshake (reconnect)", cfg.tls.timeout)
        try:
            header = first + await _within(stage, reader.readexactly(4))
            body = await _within(stage, reader.readexactly(tls_record_length(header)))
        except asyncio.IncompleteReadError:
            raise RemoteProtocolError("the peer closed the connection in the middle of its ClientHello") from None
        cipher = client_hello_cipher(body)
        lookup = ReconnectLookup(state.registry, cipher)
        stream, info = await _tls("server", cipher, cfg, (reader, writer), stage, reconnect=True,
                                  bind=lambda c: bind_psk_lookup(c, lookup), initial=header + body)
        match = lookup.match
        if match is None:  # pragma: no cover - verify_connection() already insists on our PSK
            raise RemoteProtocolError("TLS completed without a reconnect PSK")
        return HybridStreamReader(stream, limit), HybridStreamWriter(stream, writer, (match.info, info, match.index))
    if first[0] != MAGIC[0]:
        raise RemoteProtocolError(f"the peer sent neither a hybridkex Hello nor a TLS ClientHello "
                                  f"(first byte 0x{first[0]:02x})")
    policy = cfg.handshake.policy
    session = await run_responder(reader, writer, cfg.handshake, state.keys, initial=first,
                                  timeout=deadline.remaining("the hybrid handshake", policy.timeouts.handshake))
    k = server_keys(session, state.registry)
    try:
        stream, info = await _tls("server", k.cipher, cfg, (reader, writer),
                                  deadline.stage("the TLS handshake", cfg.tls.timeout), reconnect=False,
                                  bind=lambda c: bind_psk(c, k.identity, k.psk))
    except BaseException:
        if k.handle is not None and state.registry is not None:
            state.registry.discard(k.handle)
        raise
    return HybridStreamReader(stream, limit), HybridStreamWriter(stream, writer, (session.info, info, None))


ClientConnected = Callable[[HybridStreamReader, HybridStreamWriter], "Awaitable[None] | None"]


class HybridAsyncServer:
    """What :func:`start_server` returns: an :class:`asyncio.Server` look-alike.

    ``close``, ``wait_closed``, ``serve_forever``, ``start_serving``, ``is_serving``, ``sockets``,
    ``get_loop`` and ``async with`` behave as on asyncio's server; :attr:`reconnect_registry` holds
    the parent sessions reconnects are accepted for.
    """

    def __init__(self, state: ServerState, callback: ClientConnected, limit: int) -> None:
        self._state = state
        self._callback = callback
        self._limit = limit
        self._active = 0
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<HybridAsyncServer sockets={self.sockets!r} active={self._active}>"

    @property
    def _srv(self) -> asyncio.Server:
        if self._server is None:  # pragma: no cover - start_server() sets it before returning
            raise RuntimeError("the server is not started")
        return self._server

    @property
    def config(self) -> ServerConfig:
        return self._state.config

    @property
    def reconnect_registry(self) -> ReconnectRegistry | None:
        return self._state.registry

    @property
    def active_connections(self) -> int:
        """Connections in setup or in the callback right now."""
        return self._active

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._srv.sockets) if self._server is not None else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._srv.get_loop()

    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start_serving(self) -> None:
        await self._srv.start_serving()

    async def serve_forever(self) -> None:
        await self._srv.serve_forever()

    def close(self) -> None:
        """Stop listening and erase the reconnect registry (open connections go on)."""
        self._srv.close()
        self._state.close()

    async def wait_closed(self) -> None:
        await self._srv.wait_closed()

    async def __aenter__(self) -> HybridAsyncServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._active >= self._state.config.max_connections:
            _log.warning("rejected connection from %s: %d connections are already being served", peer,
                         self._state.config.max_connections)
            writer.close()
            return
        self._active += 1
        try:
            try:
                hreader, hwriter = await _accept(reader, writer, self._state, self._limit)
            except Exception as exc:
                log_rejection(peer, exc)
                writer.close()
                return
            except BaseException:  # cancelled (the loop is shutting down): do not leak the transport
                writer.close()
                raise
            try:
                result = self._callback(hreader, hwriter)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                _log.error("client_connected_cb failed for %s", peer, exc_info=True)
                hwriter.close()
            except BaseException:
                hwriter.close()
                raise
        finally:
            self._active -= 1


async def start_server(client_connected_cb: ClientConnected, host: str | Sequence[str] | None = None,
                       port: int | None = None, config: ServerConfig | ResponderConfig | None = None, *,
                       key_source: Any = None, limit: int = DEFAULT_LIMIT,
                       reconnect_registry: ReconnectRegistry | None = None, **kwargs: Any) -> HybridAsyncServer:
    """Start a hybridkex server; ``client_connected_cb(reader, writer)`` runs per verified connection.

    Like :func:`asyncio.start_server` (extra ``kwargs`` go to it: ``backlog``, ``reuse_port``,
    ``start_serving``, ...).  Each connection's setup runs in its own task under
    ``config.timeout``; a peer that fails it is logged on ``hybridkex.server`` with its typed error
    and closed, and the server keeps serving.  At most ``config.max_connections`` connections are
    handled at once.  ``key_source`` may be blocking or asyncio; one key manager serves every
    connection.
    """
    if config is None:
        raise ConfigurationError("a ServerConfig is required", field="config")
    cfg = ServerConfig.coerce(config)
    state = ServerState(cfg, key_source, reconnect_registry)
    if state.async_source is not None:
        state.keys = QKDKeyManager(_BlockingBridge(state.async_source, asyncio.get_running_loop()),
                                   cfg.handshake.policy.key_budget)
    server = HybridAsyncServer(state, client_connected_cb, limit)
    server._server = await asyncio.start_server(server._on_connect, host, port, limit=limit, **kwargs)
    return server


# ---------------------------------------------------------------------------------------------
# Over streams the caller already has (tunnels, proxies, custom transports)
# ---------------------------------------------------------------------------------------------


class ServerSide:
    """Server-side state shared by every connection handed to :func:`accept_on_streams`.

    Holds the configuration, one QKD key manager (so a pool and epoch keys serve all connections)
    and the reconnect registry.  Build it once inside the event loop; :meth:`close` erases it.
    """

    def __init__(self, config: ServerConfig | ResponderConfig, *, key_source: Any = None,
                 reconnect_registry: ReconnectRegistry | None = None) -> None:
        cfg = ServerConfig.coerce(config)
        self._state = ServerState(cfg, key_source, reconnect_registry)
        if self._state.async_source is not None:
            self._state.keys = QKDKeyManager(_BlockingBridge(self._state.async_source, asyncio.get_running_loop()),
                                             cfg.handshake.policy.key_budget)

    @property
    def config(self) -> ServerConfig:
        return self._state.config

    def close(self) -> None:
        self._state.close()


async def accept_on_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: ServerSide, *,
                            limit: int = DEFAULT_LIMIT) -> tuple[HybridStreamReader, HybridStreamWriter]:
    """Run the server side of a hybridkex connection over an accepted ``(reader, writer)`` pair.

    The same setup as :func:`start_server` runs per connection (hybrid handshake or reconnect, then
    TLS), under ``config.timeout``.  Raises the typed error on failure; the caller closes ``writer``.
    """
    return await _accept(reader, writer, server._state, limit)


async def connect_on_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             config: ClientConfig | InitiatorConfig, *, key_source: Any = None,
                             timeout: float | None = None, ticket: ReconnectTicket | None = None,
                             limit: int = DEFAULT_LIMIT) -> tuple[HybridStreamReader, HybridStreamWriter]:
    """Run the client side of a hybridkex connection over an already connected ``(reader, writer)``.

    Like :func:`open_connection` without the TCP connect.  Raises the typed error on failure; the
    caller closes ``writer``.
    """
    cfg = ClientConfig.coerce(config)
    deadline = Deadline(cfg.timeout if timeout is None else timeout)
    key = ticket.take() if ticket is not None else None
    if key is not None:
        return await _client_reconnect((reader, writer), cfg, key, deadline, limit)
    check_key_source(cfg, key_source)
    return await _client_full((reader, writer), cfg, _manager(key_source, cfg.handshake), deadline, limit)
