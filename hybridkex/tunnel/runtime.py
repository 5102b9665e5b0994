"""The tunnel process: listener, limits, per-connection bookkeeping, signals, reload and drain.

:class:`TunnelRuntime` is shared by both roles; :class:`~hybridkex.tunnel.server.TunnelServer` and
:class:`~hybridkex.tunnel.client.TunnelClient` only differ in what they do with an accepted
connection.  Signals (POSIX): SIGTERM/SIGINT stop accepting and drain open connections until the
drain deadline (a second signal ends the drain at once); SIGHUP re-reads the configuration file and
applies it to new connections without touching open ones, or keeps the running configuration and
logs one error line if the new one is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Final

from ..exceptions import (
    AuthenticationError,
    ConfigurationError,
    HybridKEXError,
    KeyMismatchError,
    KeySourceError,
    PolicyViolation,
    ProtocolError,
    RateLimited,
    TLSError,
)
from .channel import ChannelFactory, ChannelFactoryProvider
from .config import Address, TunnelConfig
from .ktls import ktls_status
from .limits import ADMISSION, HandshakeRateLimiter, LogThrottle, rate_key
from .logs import ConnectionLog, configure_logging, log_event, new_connection_id, safe_fields
from .metrics import MetricsServer, TunnelMetrics, start_metrics_server
from .relay import Direction, RelayResult, relay
from .streams import SecureStream

__all__ = ["ConfigLoader", "Connection", "TunnelRuntime", "handshake_outcome"]

#: Re-reads the configuration for a reload (the file plus the flags given at startup).
ConfigLoader = Callable[[], TunnelConfig]

_BACKLOG: Final = 1024
_CANCEL_GRACE: Final = 5.0
#: A refused connection is told why, then kept open this long (reading what the peer had sent) so
#: that closing it does not reset it before the peer has read the refusal...
_REFUSE_LINGER: Final = 1.0
#: ... but only this many at a time; beyond, refused connections are closed at once.
_MAX_LINGERING: Final = 256
#: How often a worker process refreshes the metrics its collectors set (seconds).
_REFRESH: Final = 1.0


def handshake_outcome(exc: BaseException) -> str:
    """The metrics label for a failed handshake."""
    if isinstance(exc, TimeoutError):  # includes HandshakeTimeout
        return "timeout"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, (AuthenticationError, KeyMismatchError)):
        return "auth_failed"
    if isinstance(exc, ProtocolError):
        return "protocol_error"
    if isinstance(exc, PolicyViolation):
        return "policy_violation"
    if isinstance(exc, KeySourceError):
        return "key_source_error"
    if isinstance(exc, TLSError):
        return "tls_error"
    if isinstance(exc, HybridKEXError):
        return "failed"
    if isinstance(exc, (OSError, asyncio.IncompleteReadError)):
        return "io_error"
    return "internal_error"


def _reason(exc: BaseException) -> str:
    """A local, key-free description of why a handshake failed."""
    if isinstance(exc, AuthenticationError):
        return f"authentication failed: {exc.detail}" if exc.detail else "authentication failed"
    if isinstance(exc, RateLimited):  # the client side: the server's limits refused the connection
        return f"rate limited by server ({exc})"
    if isinstance(exc, TimeoutError) and not str(exc):
        return "handshake deadline exceeded"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    text = str(exc)
    name = next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))  # a public class
    return f"{name}: {text}" if text else name


def _os_error(exc: OSError) -> str:
    # asyncio wraps bind errors in an OSError whose text repeats the address; the errno text suffices.
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def _format_peer(peername: object) -> tuple[str, str]:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = str(peername[0]), peername[1]
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host
    return "unknown", "unknown"


class Connection:
    """Bookkeeping for one accepted connection (its ID, logger, start time, config snapshot)."""

    __slots__ = ("address_key", "config", "ip", "log", "peer_addr", "started")

    def __init__(self, config: TunnelConfig, peer_addr: str, ip: str) -> None:
        self.config = config
        self.peer_addr = peer_addr
        self.ip = ip
        self.address_key = rate_key(ip)
        self.log = ConnectionLog(new_connection_id(), peer_addr)
        self.started = time.monotonic()


class TunnelRuntime:
    """Runs one tunnel endpoint until stopped. Subclasses implement :meth:`serve_connection`."""

    role: str = ""

    def __init__(self, config: TunnelConfig, provider: ChannelFactoryProvider, *,
                 loader: ConfigLoader | None = None, insecure: bool = False,
                 metrics: TunnelMetrics | None = None, reuse_port: bool = False,
                 metrics_endpoint: bool = True) -> None:
        self.config = config
        #: A worker process: bind the listener with SO_REUSEPORT (its siblings bind the same port), and
        #: leave ``/metrics`` and ``/healthz`` to the supervisor (``metrics_endpoint=False``).
        self.reuse_port = reuse_port
        self.metrics_endpoint = metrics_endpoint
        self._provider = provider
        self._loader = loader
        self._insecure = insecure
        self.metrics = metrics or TunnelMetrics(config.role)
        self.factory: ChannelFactory | None = None
        lim = config.limits
        self._address_limit = HandshakeRateLimiter(lim.address_rate, lim.address_burst)  # before authentication
        self._peer_limit = HandshakeRateLimiter(lim.handshake_rate, lim.handshake_burst)  # per peer identity
        self._lingering = 0
        self._throttle = LogThrottle()
        self._server: asyncio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[object]] = set()
        self.draining = False

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The bound listening address (the real port when the configured port was 0)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    @property
    def metrics_address(self) -> Address | None:
        return self._metrics_server.address if self._metrics_server else None

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        """Build the channel factory, bind the listener and the metrics endpoint."""
        cfg = self.config
        if self._insecure:
            log_event(logging.WARNING, "insecure_test_channel",
                      "INSECURE plain channel selected by the test hook: no encryption, no authentication")
        for w in cfg.warnings:
            log_event(logging.WARNING, "config_warning", w.message, field=w.field)
        self.factory = await self._provider(cfg, self.metrics)
        try:
            try:
                self._server = await asyncio.start_server(
                    self._on_connection, cfg.listen.host, cfg.listen.port, backlog=_BACKLOG,
                    reuse_port=self.reuse_port or None)
            except OSError as exc:
                raise ConfigurationError(f"cannot listen on {cfg.listen}: {_os_error(exc)}", field="listen") from None
            if (cfg.metrics.enabled or cfg.health.enabled) and not self.metrics_endpoint:
                self._spawn_background(self._refresh_metrics())
            elif cfg.metrics.enabled or cfg.health.enabled:
                try:
                    self._metrics_server = await start_metrics_server(
                        self.metrics, cfg.metrics.listen, serve_metrics=cfg.metrics.enabled,
                        serve_health=cfg.health.enabled)
                except OSError as exc:
                    raise ConfigurationError(f"cannot listen on {cfg.metrics.listen}: {_os_error(exc)}",
                                             field="metrics.listen") from None
        except BaseException:
            await self._close_listeners()
            await self.factory.aclose()
            raise
        self.metrics.set_configured_peers(len(cfg.peers))
        log_event(logging.INFO, "listening", f"tunnel {self.role} listening", role=self.role,
                  address=str(self.address), target=str(cfg.target), identity=cfg.identity,
                  peers=sorted(cfg.peer_identities), suites=list(cfg.policy.suites), qkd=cfg.policy.qkd,
                  event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
                  ktls=ktls_status().summary)

    async def run(self, ready: Callable[[], None] | None = None) -> int:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), drain, stop. Returns 0.

        ``ready`` is called once the listener is bound and the signal handlers are installed.
        """
        await self.start()
        self._install_signals()
        if ready is not None:
            ready()
        try:
            await self._stop.wait()
        finally:
            try:
                await self.shutdown()  # signal handlers stay installed: a second SIGTERM ends the drain
            finally:
                self._remove_signals()
        return 0

    def request_stop(self) -> None:
        """Begin a graceful stop; a second call ends the drain immediately."""
        if self._stop.is_set():
            if not self._force.is_set():
                log_event(logging.WARNING, "drain_forced", "second stop signal: closing open connections now")
            self._force.set()
        self._stop.set()

    def request_reload(self) -> None:
        self._spawn_background(self.reload())

    def _spawn_background(self, coro: Coroutine[object, object, object]) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_metrics(self) -> None:
        """A worker's collectors (pool levels, ...) run before each scrape of its own endpoint; with the
        supervisor scraping the shared files instead, run them every second."""
        while True:
            self.metrics.collect()
            await asyncio.sleep(_REFRESH)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, AttributeError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in ("SIGTERM", "SIGINT", "SIGHUP"):
            with contextlib.suppress(NotImplementedError, AttributeError, RuntimeError, ValueError):
                loop.remove_signal_handler(getattr(signal, sig))

    async def _close_listeners(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._metrics_server is not None:
            await self._metrics_server.close()

    async def shutdown(self) -> None:
        """Stop accepting, let open connections finish until the drain deadline, then close the rest."""
        self.draining = True
        self.metrics.health.draining = True
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # let connections accepted just before close register themselves
        deadline = time.monotonic() + self.config.timeouts.drain
        log_event(logging.INFO, "draining", "stopped accepting; draining open connections",
                  open_connections=len(self._conns), deadline_s=self.config.timeouts.drain)
        force = asyncio.ensure_future(self._force.wait())
        try:
            while self._conns and not self._force.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait({*self._conns, force}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            force.cancel()
        leftover = set(self._conns)
        if leftover:
            log_event(logging.WARNING, "drain_deadline",
                      "closing connections still open (drain deadline reached or drain forced)",
                      open_connections=len(leftover))
            for t in leftover:
                t.cancel()
            await asyncio.wait(leftover, timeout=_CANCEL_GRACE)
        if self._metrics_server is not None:
            await self._metrics_server.close()
        for task in list(self._background):
            task.cancel()
        if self.factory is not None:
            try:
                await self.factory.aclose()
            except Exception as exc:
                log_event(logging.ERROR, "factory_close_failed", "channel factory did not close cleanly",
                          error=f"{type(exc).__name__}: {exc}")
        log_event(logging.INFO, "stopped", "tunnel stopped", forced=len(leftover))

    # --- reload -------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Apply a re-read configuration to new connections; ``False`` (old one kept) on any error."""
        async with self._reload_lock:
            if self._loader is None:
                log_event(logging.WARNING, "config_reload_skipped", "SIGHUP ignored: started without --config")
                return False
            old = self.config
            try:
                new = self._loader()
            except ConfigurationError as exc:
                self.metrics.count_reload(ok=False)
                log_event(logging.ERROR, "config_reload_failed",
                          f"configuration reload failed, keeping the running configuration: {exc}")
                return False
            fixed = [name for name in ("listen", "metrics", "health") if getattr(new, name) != getattr(old, name)]
            if fixed:
                new = replace(new, listen=old.listen, metrics=old.metrics, health=old.health)
            assert self.factory is not None
            try:
                await self.factory.reconfigure(new)
            except Exception as exc:
                self.metrics.count_reload(ok=False)
                log_event(logging.ERROR, "config_reload_failed",
                          f"configuration reload failed, keeping the running configuration: {_reason(exc)}")
                return False
            self.config = new
            configure_logging(new.logging.format, new.logging.level)
            self._address_limit.configure(new.limits.address_rate, new.limits.address_burst)
            self._peer_limit.configure(new.limits.handshake_rate, new.limits.handshake_burst)
            self.metrics.set_configured_peers(len(new.peers))
            self.metrics.count_reload(ok=True)
            for w in new.warnings:
                log_event(logging.WARNING, "config_warning", w.message, field=w.field)
            if fixed:
                log_event(logging.WARNING, "config_reload_partial",
                          "changes to these settings need a restart and were not applied", settings=fixed)
            log_event(logging.INFO, "config_reloaded", "configuration reloaded; open connections unaffected",
                      peers=sorted(new.peer_identities),
                      added=sorted(new.peer_identities - old.peer_identities),
                      removed=sorted(old.peer_identities - new.peer_identities))
            return True

    # --- connections --------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        peer_addr, ip = _format_peer(writer.get_extra_info("peername"))
        if self.draining:
            writer.close()
            return
        if len(self._conns) >= cfg.limits.max_connections:
            await self._refuse(reader, writer, "max_connections", peer_addr,
                               f"{cfg.limits.max_connections} connections open")
            return
        conn = Connection(cfg, peer_addr, ip)
        if not self._address_limit.allow(conn.address_key):
            await self._refuse(reader, writer, "rate_limited", peer_addr,
                               "too many handshakes in flight or failed from this address (limits.address_rate)")
            return
        target = cfg.target_identity
        if self.role == "client" and target is not None and not self._peer_limit.peek(target):
            await self._refuse(reader, writer, "peer_rate_limited", peer_addr,
                               f"handshake rate to {target!r} exceeded (limits.handshake_rate)")
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.metrics.connection_opened()
        conn.log.log(logging.DEBUG, "accepted", "connection accepted")
        admission = ADMISSION.set(self._peer_limit.peek)  # the channel asks it when the peer names itself
        try:
            await self.serve_connection(conn, reader, writer)
        except asyncio.CancelledError:
            if not self.draining:
                raise
            # Drain deadline: serve_connection logged the close; end this task quietly.
        except Exception as exc:  # a bug must cost one connection, never the process
            conn.log.log(logging.ERROR, "internal_error", "unexpected error; connection closed",
                         error=f"{type(exc).__name__}: {exc}")
        finally:
            ADMISSION.reset(admission)
            self._conns.discard(task)
            self.metrics.connection_ended()
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str,
                      peer_addr: str, why: str) -> None:
        """Count and (rate-limited) log a refusal; on the server, tell the peer before closing."""
        self._count_refusal(reason, peer_addr, why)
        factory = self.factory
        refuse = getattr(factory, "refuse", None)
        if self.role != "server" or refuse is None or self._lingering >= _MAX_LINGERING:
            writer.close()
            return
        self._lingering += 1
        try:
            async with asyncio.timeout(_REFUSE_LINGER):
                await refuse(writer)
                if writer.can_write_eof():
                    writer.write_eof()
                while await reader.read(65536):  # until the peer, having read the refusal, closes
                    pass
        except (OSError, TimeoutError, RuntimeError):
            pass
        finally:
            self._lingering -= 1
            writer.close()

    def _count_refusal(self, reason: str, peer_addr: str, why: str, peer_identity: str | None = None) -> None:
        self.metrics.count_refused(reason)
        suppressed = self._throttle.check(reason)
        if suppressed is not None:
            fields: dict[str, object] = {"reason": reason, "peer_addr": peer_addr,
                                         "suppressed_since_last": suppressed}
            if peer_identity is not None:
                fields["peer_identity"] = peer_identity
            log_event(logging.WARNING, "connection_refused", f"connection refused: {why}", **fields)

    async def serve_connection(self, conn: Connection, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    # --- helpers for subclasses ---------------------------------------------------------------

    def handshake_failed(self, conn: Connection, exc: BaseException) -> None:
        if isinstance(exc, RateLimited) and self.role == "server":  # our per-peer limit: a refusal
            who = exc.peer_identity or "?"
            self._count_refusal("peer_rate_limited", conn.peer_addr,
                                f"peer {who!r} is over its handshake rate (limits.handshake_rate)", who)
            return
        outcome = handshake_outcome(exc)
        self.metrics.count_handshake(outcome)
        level = logging.ERROR if outcome == "internal_error" else logging.WARNING
        reason = _reason(exc)
        # The message carries the error class and why, so a plain "%(message)s" log (the demo's) shows it.
        name = next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))
        why = reason if reason.startswith(name) else f"{name}: {reason}"
        conn.log.log(level, "handshake_failed", f"handshake failed: {why}; connection closed", outcome=outcome,
                     reason=reason, duration_ms=round((time.monotonic() - conn.started) * 1000, 3))

    def handshake_ok(self, conn: Connection, stream: SecureStream, started: float) -> Mapping[str, object]:
        elapsed = time.monotonic() - started
        self.metrics.count_handshake("ok", elapsed)
        facts = safe_fields(stream.session_facts)
        # Authenticated: the address gets its token back, the peer identity pays for the handshake.
        self._address_limit.refund(conn.address_key)
        identity = facts.get("peer_identity")
        if isinstance(identity, str):
            self._peer_limit.charge(identity)
        conn.log.log(logging.INFO, "handshake_ok", "handshake complete", duration_ms=round(elapsed * 1000, 3),
                     session=facts)
        return facts

    async def relay_connection(self, conn: Connection, listen_side: SecureStream, target_side: SecureStream,
                               facts: Mapping[str, object]) -> None:
        add_bytes = self.metrics.add_bytes
        idle = conn.config.timeouts.idle or None
        # Counted here as well as in the relay so that a connection cut at the drain deadline still
        # reports what it moved.
        moved = {"in": 0, "out": 0}

        def on_bytes(direction: Direction, n: int) -> None:
            moved[direction] += n
            add_bytes(direction, n)

        result: RelayResult | None = None
        try:
            result = await relay(listen_side, target_side, idle_timeout=idle, on_bytes=on_bytes)
        finally:
            outcome = result.outcome if result else "shutdown"
            self.metrics.count_closed(outcome)
            fields: dict[str, object] = {"outcome": outcome, "bytes_in": moved["in"], "bytes_out": moved["out"],
                                         "duration_s": round(time.monotonic() - conn.started, 3)}
            if result is not None and result.error:
                fields["error"] = result.error
            if "peer_identity" in facts:
                fields["peer_identity"] = facts["peer_identity"]
            conn.log.log(logging.INFO, "connection_closed", "connection closed", **fields)

    def target_failed(self, conn: Connection, exc: BaseException) -> None:
        self.metrics.count_closed("target_unreachable")
        conn.log.log(logging.WARNING, "target_unreachable", f"cannot connect to target {conn.config.target}",
                     reason=_reason(exc) if str(exc) or isinstance(exc, OSError) else "connect deadline exceeded")
