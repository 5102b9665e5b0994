"""``hybridkex tunnel server|client --workers N``: N worker processes on one listening port, one supervisor.

Each worker is the single-process tunnel server or client (``python -m hybridkex`` with the same command line),
told by its environment that it is worker *i*: it binds the listening port with ``SO_REUSEPORT`` (the
kernel spreads new connections over the workers), serves no metrics endpoint of its own and writes
its metrics to the supervisor's private ``PROMETHEUS_MULTIPROC_DIR``.  Subprocesses of the same CLI
rather than ``multiprocessing``: a worker is then exactly today's tunnel (code path, signals, exit
statuses, logs), nothing is pickled, prometheus_client picks its multiprocess storage from the
environment before the worker imports it, and the supervisor only deals in PIDs.

The supervisor (this module): validates the configuration and reserves the port before starting any
worker (so configuration errors and a port in use are the usual one line and exit status), forwards
SIGTERM/SIGINT (drain) and, after checking the file itself, SIGHUP (reload) to every worker, restarts
a worker that died with a growing delay, gives up with one line when a worker keeps dying, and serves
``/metrics`` (the sum over the workers) and ``/healthz``.

Nothing here depends on the role.  A client worker is a tunnel client of its own towards the server:
its own full handshake, its own steady-state ticket (in its memory only) and its own announced QKD
keys, so N client workers look to the server like N clients of one peer identity (it keeps one
steady-state parent per handshake, not per identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ..exceptions import ConfigurationError, HybridKEXError
from .config import Address, TunnelConfig
from .logs import configure_logging, log_event
from .metrics import MetricsServer, start_metrics_server, without_created

__all__ = ["WORKER_ENV", "Supervisor", "WorkerSetup"]

#: Set (to the worker's index) in a worker's environment; the other two carry its port and readiness pipe.
WORKER_ENV: Final = "HYBRIDKEX_TUNNEL_WORKER"
_LISTEN_ENV: Final = "HYBRIDKEX_TUNNEL_WORKER_LISTEN"
_READY_ENV: Final = "HYBRIDKEX_TUNNEL_WORKER_READY_FD"
_PARENT_ENV: Final = "HYBRIDKEX_TUNNEL_WORKER_PARENT"
_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: A worker that exits sooner than this after it started counts as a crash in a row ...
_STABLE: Final = 10.0
#: ... and after this many in a row the supervisor gives up.
_MAX_CRASHES: Final = 6
_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 5.0
_PR_SET_PDEATHSIG: Final = 1
_SCRAPE_TRIES: Final = 20


def _signal_name(code: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(-code).name
    return f"signal {-code}"


def _describe_exit(code: int) -> str:
    return f"killed by {_signal_name(code)}" if code < 0 else f"exit status {code}"


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What a worker process learns from its environment (set by :class:`Supervisor`)."""

    index: int
    listen: Address
    ready_fd: int
    parent: int

    @classmethod
    def from_env(cls) -> WorkerSetup | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        try:
            host, _, port = os.environ[_LISTEN_ENV].rpartition(":")
            return cls(int(raw), Address(host.strip("[]"), int(port)), int(os.environ[_READY_ENV]),
                       int(os.environ[_PARENT_ENV]))
        except (KeyError, ValueError):
            raise ConfigurationError("is set only by the tunnel supervisor for its worker processes; unset it",
                                     field=WORKER_ENV) from None

    def adapt(self, config: TunnelConfig) -> TunnelConfig:
        """The worker's view: the supervisor's port (run it with ``metrics_endpoint=False``: the supervisor
        serves ``/metrics``, while ``[metrics]``/``[health]`` still switch on the KME probe and the like).
        Only worker 1 (the first) purges the shared state: one purger is enough for the rows of every worker, the
        supervisor opens no state (it deals in PIDs, holds no state key), and a restarted worker 1
        takes the purge up again under the same index."""
        if self.index != 1 and config.state is not None:
            config = replace(config, state=replace(config.state, purge_every=0.0))
        return replace(config, listen=self.listen, workers=1)

    def bind_to_parent(self) -> None:
        """Drain and exit when the supervisor dies (Linux ``PR_SET_PDEATHSIG``): no orphaned workers."""
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.parent:  # it died before the request above took effect
            os.kill(os.getpid(), signal.SIGTERM)

    def ready(self) -> None:
        """Tell the supervisor that this worker is listening."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"r")
        with contextlib.suppress(OSError):
            os.close(self.ready_fd)


def reuse_port_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def _reserve(listen: Address) -> tuple[socket.socket, Address]:
    """Bind (not listen on) the port with SO_REUSEPORT: it fails now if another program holds the port,
    picks the real port when the configured one is 0, and keeps the port ours while a worker restarts.
    Not listening, it is never handed a connection."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {listen}: {exc.strerror or exc}", field="listen") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ConfigurationError(f"cannot listen on {listen}: {why}", field="listen") from None
    return sock, Address(listen.host, int(sock.getsockname()[1]))


class _Exposition:
    """The supervisor's ``/metrics`` and ``/healthz``: every worker's values (summed by prometheus_client's
    multiprocess collector) and the supervisor's own two metrics."""

    def __init__(self, directory: Path, workers: int) -> None:
        own = CollectorRegistry(auto_describe=True)
        self.wanted = workers
        self.live = Gauge("hybridkex_tunnel_workers", "Worker processes serving.", registry=own)
        self.restarts = Counter("hybridkex_tunnel_worker_restarts_total",
                                "Worker processes restarted after they died.", registry=own)
        self.reloads = Counter("hybridkex_tunnel_supervisor_reloads_total",
                               "SIGHUPs checked by the supervisor, by outcome (ok: forwarded to every worker).",
                               ("outcome",), registry=own)
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, path=str(directory))  # type: ignore[no-untyped-call]
        self.registry.register(without_created(own))
        for outcome in ("ok", "error"):
            self.reloads.labels(outcome)
        self.draining = False
        self.live_count = 0

    def set_live(self, n: int) -> None:
        self.live_count = n
        self.live.set(n)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        # A worker that is starting creates its value file before it writes the file's header, and
        # prometheus_client's reader fails on such a file (struct.error): a scrape that lands in that
        # instant is tried again, briefly, instead of answering 500.
        for _ in range(_SCRAPE_TRIES - 1):
            try:
                return encode(self.registry), content_type
            except struct.error:
                time.sleep(0.01)
        return encode(self.registry), content_type

    def health_report(self) -> tuple[bool, str]:
        live = self.live_count
        if self.draining:
            return False, "draining\n"
        if live >= self.wanted:
            return True, "ok\n"
        state = "degraded" if live else "unhealthy"
        return live > 0, f"{state}\nworkers: {live} of {self.wanted} serving\n"


class _Worker:
    __slots__ = ("crashes", "index", "proc", "ready", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.crashes = 0
        #: Listening, so its signal handlers are installed (a SIGHUP before that would kill it).
        self.ready = False


class Supervisor:
    """Runs ``config.workers`` worker processes of the command line ``argv`` until SIGTERM."""

    def __init__(self, config: TunnelConfig, loader: Callable[[], TunnelConfig] | None,
                 argv: Sequence[str]) -> None:
        self.config = config
        self._loader = loader
        self._argv = list(argv)
        self._workers = [_Worker(i + 1) for i in range(config.workers)]
        self._stop = asyncio.Event()
        self._stopping = False
        self._fatal: str | None = None
        self._listen = config.listen
        self._dir: Path | None = None
        self._exposition: _Exposition | None = None

    # --- process management ---------------------------------------------------------------------

    async def _spawn(self, w: _Worker) -> int | None:
        """Start worker ``w``; None once it listens, else its exit status (it died while starting)."""
        assert self._dir is not None
        w.ready = False
        read_end, write_end = os.pipe()
        env = {**os.environ, WORKER_ENV: str(w.index), _LISTEN_ENV: str(self._listen), _READY_ENV: str(write_end),
               _PARENT_ENV: str(os.getpid()), _MULTIPROC_ENV: str(self._dir / "metrics")}
        try:
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which drains the workers.
            w.proc = await asyncio.create_subprocess_exec(*self._argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                          pass_fds=(write_end,), start_new_session=True)
        finally:
            os.close(write_end)
        w.started = time.monotonic()
        try:
            ready = await asyncio.to_thread(os.read, read_end, 1)  # b"" once the worker exited unready
        finally:
            os.close(read_end)
        if ready:
            w.ready = True
            self._count_live()
            log_event(logging.INFO, "worker_started", f"tunnel worker {w.index} serving", worker=w.index,
                      pid=w.proc.pid)
            return None
        return await w.proc.wait()

    def _count_live(self) -> None:
        assert self._exposition is not None
        self._exposition.set_live(sum(1 for w in self._workers if w.proc and w.proc.returncode is None))

    def _reap(self, w: _Worker) -> None:
        assert self._dir is not None and w.proc is not None
        mark_process_dead(w.proc.pid, str(self._dir / "metrics"))  # type: ignore[no-untyped-call]
        self._count_live()

    def _signal_all(self, sig: int, *, ready_only: bool = False) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None and (w.ready or not ready_only):
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def _watch(self, w: _Worker) -> None:
        """Wait for worker ``w`` to exit; restart it (with a growing delay) unless the supervisor is stopping."""
        assert w.proc is not None
        while True:
            code = await w.proc.wait()
            self._reap(w)
            if self._stopping:
                return
            ran = time.monotonic() - w.started
            w.crashes = w.crashes + 1 if ran < _STABLE else 1
            if w.crashes >= _MAX_CRASHES:
                self._fatal = (f"tunnel worker {w.index} died {w.crashes} times in a row, each within "
                               f"{_STABLE:g} s of starting (last: {_describe_exit(code)}); giving up, see the "
                               "log above")
                self._stop.set()
                return
            delay = min(_BACKOFF_FIRST * 2 ** (w.crashes - 1), _BACKOFF_MAX)
            log_event(logging.ERROR, "worker_exited", f"tunnel worker {w.index} {_describe_exit(code)}; "
                      f"restarting in {delay:g} s", worker=w.index, pid=w.proc.pid, exit=code, restart_in_s=delay)
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stopping:
                    return
                if await self._config_ok("restart_skipped", f"tunnel worker {w.index} not restarted"):
                    break
                delay = _BACKOFF_MAX  # a broken file is not fixed in 0.1 s
            assert self._exposition is not None
            self._exposition.restarts.inc()
            code_at_start = await self._spawn(w)
            if code_at_start is not None:
                continue  # died while starting: the loop above counts it and waits longer

    async def _config_ok(self, event: str, what: str) -> TunnelConfig | None:
        if self._loader is None:
            return self.config
        try:
            return await asyncio.to_thread(self._loader)
        except HybridKEXError as exc:
            log_event(logging.ERROR, event, f"{what}: the configuration file is invalid: {exc}")
            return None

    # --- signals --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: every worker drains; a second signal is forwarded too (it ends the drain)."""
        if self._stopping:
            log_event(logging.WARNING, "drain_forced", "second stop signal: forwarded to the workers")
        else:
            log_event(logging.INFO, "draining", "stopping: the workers drain their connections",
                      workers=sum(1 for w in self._workers if w.proc and w.proc.returncode is None))
        self._stopping = True
        if self._exposition is not None:
            self._exposition.draining = True
        self._signal_all(signal.SIGTERM)
        self._stop.set()

    async def _reload(self) -> None:
        """SIGHUP: check the file here first; forward only a valid one, so a bad edit is logged once."""
        assert self._exposition is not None
        if self._loader is None:
            log_event(logging.WARNING, "config_reload_skipped", "SIGHUP ignored: started without --config")
            return
        new = await self._config_ok("config_reload_failed",
                                    "configuration reload failed, the workers keep the running configuration")
        if new is None:
            self._exposition.reloads.labels("error").inc()
            return
        fixed = [n for n in ("listen", "metrics", "health", "workers") if getattr(new, n) != getattr(self.config, n)]
        if fixed:
            log_event(logging.WARNING, "config_reload_partial",
                      "changes to these settings need a restart and were not applied", settings=fixed)
        self.config = replace(new, listen=self.config.listen, metrics=self.config.metrics,
                              health=self.config.health, workers=self.config.workers)
        configure_logging(new.logging.format, new.logging.level)
        self._exposition.reloads.labels("ok").inc()
        self._signal_all(signal.SIGHUP, ready_only=True)  # one still starting reads the file itself
        log_event(logging.INFO, "config_reload_forwarded", "configuration valid; every worker reloads it",
                  workers=[w.proc.pid for w in self._workers if w.proc and w.proc.returncode is None and w.ready])

    def _install_signals(self, tasks: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()

        def reload() -> None:
            task = loop.create_task(self._reload())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, reload)

    # --- the whole run --------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM; 0 when every worker drained and exited 0."""
        if not reuse_port_available():
            raise ConfigurationError("needs SO_REUSEPORT, which this platform lacks; run with workers = 1",
                                     field="workers")
        reserved, self._listen = _reserve(self.config.listen)
        self._dir = Path(tempfile.mkdtemp(prefix="hybridkex-workers-"))  # 0700: metrics of this run only
        (self._dir / "metrics").mkdir()
        self._exposition = _Exposition(self._dir / "metrics", len(self._workers))
        metrics_server: MetricsServer | None = None
        background: set[asyncio.Task[None]] = set()
        try:
            cfg = self.config
            if cfg.metrics.enabled or cfg.health.enabled:
                try:
                    metrics_server = await start_metrics_server(
                        self._exposition, cfg.metrics.listen, serve_metrics=cfg.metrics.enabled,
                        serve_health=cfg.health.enabled)
                except OSError as exc:
                    why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                    raise ConfigurationError(f"cannot listen on {cfg.metrics.listen}: {why}",
                                             field="metrics.listen") from None
            self._install_signals(background)
            return await self._serve()
        finally:
            self._stopping = True
            self._signal_all(signal.SIGTERM)
            for w in self._workers:
                if w.proc is not None and w.proc.returncode is None:
                    await w.proc.wait()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in background:
                task.cancel()
            if metrics_server is not None:
                await metrics_server.close()
            reserved.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _serve(self) -> int:
        # The first worker alone, then the others: what stops one worker from starting (the KME is down,
        # say) stops them all, and its error line should be printed once, not N times.
        first = await self._spawn(self._workers[0])
        rest = [] if first is not None or self._stopping else await asyncio.gather(
            *(self._spawn(w) for w in self._workers[1:]))
        results = [first, *rest]
        failed = [(w, code) for w, code in zip(self._workers, results, strict=False) if code is not None]
        if failed and not self._stopping:
            w, code = failed[0]
            self._stopping = True
            if code > 0:  # the worker printed its one-line error; exit as the single process would have
                return code
            raise HybridKEXError(f"tunnel worker {w.index} {_describe_exit(code)} while starting")
        log_event(logging.INFO, "workers_ready", f"{len(self._workers)} tunnel workers serving",
                  address=str(self._listen), workers=[w.proc.pid for w in self._workers if w.proc])
        watchers = [asyncio.create_task(self._watch(w)) for w in self._workers if w.proc is not None]
        await self._stop.wait()
        if self._fatal is not None:
            self._stopping = True
            self._signal_all(signal.SIGTERM)
        await asyncio.gather(*watchers)
        if self._fatal is not None:
            raise HybridKEXError(self._fatal)
        codes = {w.index: w.proc.returncode for w in self._workers if w.proc is not None}
        bad = {i: c for i, c in codes.items() if c not in (0, -signal.SIGTERM)}
        log_event(logging.INFO if not bad else logging.ERROR, "stopped", "every tunnel worker stopped",
                  exits={str(i): c for i, c in codes.items()})
        return 0 if not bad else 1
