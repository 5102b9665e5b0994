"""Handshakes over real TCP on 127.0.0.1: a threaded server, a delaying/counting proxy, and the client
worker process.

The server side runs in the benchmark process (accept thread + a fixed pool of handler threads,
like a small production server); the clients run in a separate worker process
(``python -m hybridkex.bench.worker``), so client and server do not share a GIL.  The two talk over
the worker's stdin/stdout, one JSON object per line.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Self

from ..exceptions import HybridKEXError
from .endpoints import prepare
from .wire import WireLog, WireSummary

__all__ = ["ClientWorker", "DelayProxy", "LoopbackServer", "WorkerError"]

_HOST = "127.0.0.1"


class _Stopping:
    """``with`` support for the threads-and-sockets helpers below: leaving the block stops them."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerError(HybridKEXError):
    """The client worker process failed (its message says why)."""


def _close_listener(listener: socket.socket) -> None:
    """Close a listening socket and wake the thread blocked in its accept() (close alone does not)."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        listener.close()


class LoopbackServer(_Stopping):
    """Accepts on 127.0.0.1 and runs ``handshake(sock)`` for each connection on a worker thread.

    ``handshake`` returns the object to close (an SSL connection); ``finish(conn)`` then waits for
    the client to close (as a server reading a request would), and the server closes it.
    Counts completed handshakes and failures; :meth:`stop` unblocks and joins every thread.
    """

    def __init__(self, handshake: Callable[[socket.socket], Any], workers: int = 4,
                 finish: Callable[[Any], None] | None = None) -> None:
        self._handshake = handshake
        self._finish = finish
        self._listener = socket.create_server((_HOST, 0), backlog=256)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._queue: queue.Queue[socket.socket | None] = queue.Queue()
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.completed = 0
        self.failed = 0
        self.last_error = ""
        self._stopping = False
        self._threads = [threading.Thread(target=self._accept, name="bench-accept", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"bench-server-{i}", daemon=True)
                          for i in range(workers)]
        for t in self._threads:
            t.start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            prepare(sock)
            self._queue.put(sock)

    def _work(self) -> None:
        while True:
            sock = self._queue.get()
            if sock is None:
                return
            with self._lock:
                self._live.add(sock)
            conn: Any = None
            try:
                conn = self._handshake(sock)
                with self._lock:
                    self.completed += 1
                if self._finish is not None:
                    self._finish(conn)
            except Exception as exc:  # a failed handshake is counted, the server keeps serving
                with self._lock:
                    self.failed += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                with self._lock:
                    self._live.discard(sock)
                for obj in (conn, sock):
                    if obj is not None:
                        with contextlib.suppress(Exception):
                            obj.close()

    def stop(self) -> None:
        self._stopping = True
        _close_listener(self._listener)
        with self._lock:
            for sock in self._live:  # unblock handlers stuck on a vanished client
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(5)



class DelayProxy(_Stopping):
    """A TCP relay that delays each direction by ``one_way`` seconds and counts what it relays.

    Latency, not bandwidth: every chunk is forwarded ``one_way`` seconds after it arrived, so
    pipelined data stays pipelined and only round trips cost time.  With ``one_way=0`` it is a
    counting socket: :meth:`wire_logs` gives the transfers of each finished connection.
    """

    def __init__(self, upstream: tuple[str, int], one_way: float = 0.0) -> None:
        self._upstream = upstream
        self._delay = one_way
        self._listener = socket.create_server((_HOST, 0), backlog=256)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._logs: list[WireLog] = []
        self._live: list[WireLog] = []
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name="bench-proxy", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            log = WireLog()
            done = [0]
            with self._lock:
                self._live.append(log)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.update((client, server))
            self._spawn(self._relay, client, server, "c2s", log, done)
            self._spawn(self._relay, server, client, "s2c", log, done)

    def _relay(self, src: socket.socket, dst: socket.socket, direction: str, log: WireLog, done: list[int]) -> None:
        pending: queue.Queue[tuple[float, bytes]] = queue.Queue()
        sender = threading.Thread(target=self._send_later, args=(pending, dst), daemon=True)
        sender.start()
        try:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                with self._lock:
                    log.record(direction, len(data))  # type: ignore[arg-type]
                pending.put((time.monotonic() + self._delay, data))
                if not data:
                    break
        finally:
            sender.join(30)
            with self._lock:
                done[0] += 1
                if done[0] == 2:
                    self._logs.append(log)
                    for s in (src, dst):
                        self._socks.discard(s)
                        with contextlib.suppress(OSError):
                            s.close()

    @staticmethod
    def _send_later(pending: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        while True:
            due, data = pending.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def wire_logs(self) -> list[WireSummary]:
        """A summary of every connection relayed and finished so far (see :meth:`live_logs`)."""
        with self._lock:
            return self._summaries(list(self._logs))

    def live_logs(self) -> list[WireSummary]:
        """A summary of what every connection relayed so far, finished or not.

        The client's last flight marks its completion (the proxy cannot see inside TLS), so round
        trips are the server flights that a later client flight answered.
        """
        with self._lock:
            return self._summaries([WireLog(list(log.transfers)) for log in self._live])

    @staticmethod
    def _summaries(logs: list[WireLog]) -> list[WireSummary]:
        out = []
        for log in logs:
            last_c2s = max((i for i, (d, _) in enumerate(log.transfers) if d == "c2s"), default=None)
            marked = WireLog(list(log.transfers), last_c2s)
            out.append(marked.summary())
        return out

    def stop(self) -> None:
        self._stopping = True
        _close_listener(self._listener)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)



class ClientWorker:
    """The client side in its own process (``python -m hybridkex.bench.worker``).

    Requests and answers are JSON lines; an answer with ``"error"`` raises :class:`WorkerError`.
    """

    def __init__(self, timeout: float = 300.0) -> None:
        self._timeout = timeout
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        env = dict(os.environ)
        # The worker imports the same hybridkex as this process, even from a source tree.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hybridkex.bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, env=env, text=True, bufsize=1,
        )
        self._lock = threading.Lock()
        self.request({"op": "ping"})

    @property
    def pid(self) -> int:
        """The worker process's id (its CPU time is the client side's: benchmarks/bench_steady_cpu.py)."""
        return self._proc.pid

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-3:])

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer."""
        with self._lock:
            stdin: IO[str] | None = self._proc.stdin
            stdout: IO[str] | None = self._proc.stdout
            assert stdin is not None and stdout is not None
            try:
                stdin.write(json.dumps(msg) + "\n")
                stdin.flush()
            except OSError:
                raise WorkerError(f"the client worker process is gone ({self._stderr_tail()})") from None
            box: dict[str, str] = {}
            reader = threading.Thread(target=lambda: box.setdefault("line", stdout.readline()), daemon=True)
            reader.start()
            reader.join(self._timeout)
            line = box.get("line")
            if line is None:
                self._proc.kill()
                raise WorkerError(f"the client worker did not answer {msg.get('op')!r} within {self._timeout:g} s")
            if not line:
                raise WorkerError(f"the client worker process exited ({self._stderr_tail() or 'no message'})")
            answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise WorkerError(f"client worker: {answer['error']}")
        return answer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._proc.poll() is None:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self._proc.stdin.flush()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        self._stderr.close()

    def __enter__(self) -> ClientWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
