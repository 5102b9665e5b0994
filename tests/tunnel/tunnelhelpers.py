"""Real things for the tunnel tests: a TCP service, tunnel processes, raw client connections, a scraper.

Everything binds to 127.0.0.1 only, every wait is bounded, and every process or thread started here
is stopped by the fixture that owns it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PY = sys.executable
WAIT = 15.0  # upper bound for anything that should happen "soon"; never a timing assertion

#: The environment that selects the INSECURE plain channel (test-only hook).
TEST_ENV = {"HYBRIDKEX_TESTING": "1", "HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "1"}

BANNER = b"reverse-mode banner: the service speaks first, then half-closes\n"
AFTER_EOF = bytes(range(256)) * 256  # 64 KiB the service sends *after* it saw the client's EOF


def trailer(payload: bytes) -> bytes:
    return b"\nEOF %d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())


def expected_echo(payload: bytes) -> bytes:
    return payload + trailer(payload) + AFTER_EOF


# --- the protected TCP service ---------------------------------------------------------------------


class ThreadedService:
    """A TCP listener on 127.0.0.1 serving each connection in a thread of its own: subclasses give
    :meth:`_serve` and set their own attributes before calling ``super().__init__()``."""

    def __init__(self, backlog: int = 512) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port: int = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)


class EchoService:
    """A real TCP service on 127.0.0.1. The first byte a client sends picks the behaviour:

    ``E``: echo every later byte; when the client half-closes, send ``trailer(received)`` and then
    :data:`AFTER_EOF` (so data keeps flowing after the client's EOF), then close.
    ``R``: send :data:`BANNER` and half-close first; then read until EOF and record what arrived in
    :attr:`received` (so the client keeps sending after the service's EOF).
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.eof_seen = 0
        self._lock = threading.Lock()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            mode = conn.recv(1)
            if mode == b"E":
                digest = hashlib.sha256()
                n = 0
                while data := conn.recv(65536):
                    digest.update(data)
                    n += len(data)
                    conn.sendall(data)
                with self._lock:
                    self.eof_seen += 1
                conn.sendall(b"\nEOF %d %s\n" % (n, digest.hexdigest().encode()))
                conn.sendall(AFTER_EOF)
                conn.shutdown(socket.SHUT_WR)
            elif mode == b"R":
                conn.sendall(BANNER)
                conn.shutdown(socket.SHUT_WR)
                chunks = []
                while data := conn.recv(65536):
                    chunks.append(data)
                with self._lock:
                    self.received.append(b"".join(chunks))
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        self._acceptor.join(timeout=5)


# --- a client connection ---------------------------------------------------------------------------


class Conn:
    """A real TCP client connection whose received bytes are collected by a background thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.data = bytearray()
        self.eof = threading.Event()
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                with self._cond:
                    self.data += chunk
                    self._cond.notify_all()
        except OSError as exc:
            self.error = exc
        finally:
            with self._cond:
                self.eof.set()
                self._cond.notify_all()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def wait_received(self, n: int, timeout: float = WAIT) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: len(self.data) >= n or self.eof.is_set(), timeout=timeout)
            assert len(self.data) >= n, f"received {len(self.data)} bytes, expected at least {n}"
            return bytes(self.data)

    def wait_eof(self, timeout: float = WAIT) -> bytes:
        assert self.eof.wait(timeout), "connection not closed in time"
        return bytes(self.data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo_exchange(port: int, payload: bytes) -> bytes:
    """Send ``E`` + payload, half-close, and return everything received until EOF."""
    with Conn(port) as c:
        c.send(b"E" + payload)
        c.shutdown_write()
        return c.wait_eof()


def refused_or_closed_without_data(port: int) -> bool:
    """True when a new connection is refused outright or closed without any byte of the service."""
    try:
        c = Conn(port)
    except ConnectionRefusedError:
        return True
    with c:
        with contextlib.suppress(OSError):
            c.send(b"E" + b"x" * 100)
            c.shutdown_write()
        return c.wait_eof() == b""


# --- tunnel processes ------------------------------------------------------------------------------


def write_psk(directory: Path, name: str) -> Path:
    path = directory / f"{name}.psk"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def tunnel_toml(*, listen: str, target: str, identity: str, peers: Iterable[str], keydir: Path,
                extra: str = "") -> str:
    lines = [f'listen = "{listen}"', f'target = "{target}"', f'identity = "{identity}"', ""]
    # A top-level key may not follow a table, so the extra tables go after the peers' array of tables.
    for peer in peers:
        psk = keydir / f"{peer}.psk"
        if not psk.exists():
            write_psk(keydir, peer)
        lines += ["[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', ""]
    lines += ["[policy]", 'qkd = "disabled"', "", "[logging]", 'format = "json"', ""]
    return "\n".join(lines) + extra + "\n"


class TunnelProcess:
    """``python -m hybridkex tunnel ROLE --config FILE`` as a real subprocess, logs to a file."""

    def __init__(self, role: str, config: Path, *, args: Iterable[str] = (), env: dict[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.role = role
        self.config = config
        self.log_path = (log_dir or config.parent) / f"{config.stem}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **TEST_ENV, **(env or {})}
        self.proc = subprocess.Popen(
            [PY, "-m", "hybridkex", "tunnel", role, "--config", str(config), *args],
            stdout=subprocess.DEVNULL, stderr=self._log, env=full_env, cwd=config.parent)
        self._records: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (each line must be JSON: the json log format is under test too)."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    self._records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise AssertionError(f"{self.role} log line is not JSON: {line!r}") from None
        return list(self._records)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = WAIT,
                 start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.records()[start:]:
                if predicate(r):
                    return r
            if self.proc.poll() is not None:
                self.records()
                raise AssertionError(f"{self.role} exited ({self.proc.returncode}) before {what}; log:\n"
                                     + self.log_path.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.role}: no {what} within {timeout}s; log:\n"
                                     + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.02)

    def wait_event(self, name: str, timeout: float = WAIT, start: int = 0, **fields: Any) -> dict[str, Any]:
        return self.wait_for(lambda r: r.get("event") == name and all(r.get(k) == v for k, v in fields.items()),
                             f"{name} event {fields or ''}", timeout, start)

    def started(self) -> TunnelProcess:
        rec = self.wait_event("listening")
        self.port = int(rec["address"].rsplit(":", 1)[1])
        metrics = self.events("metrics_listening")
        self.metrics_port = int(metrics[0]["address"].rsplit(":", 1)[1]) if metrics else None
        return self

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout=timeout)

    def terminate(self) -> None:
        """SIGTERM, without waiting (see :func:`stop_all`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def stop_all(procs: list[TunnelProcess]) -> None:
    """Stop tunnel processes: all told at once, then each waited for (each takes about a second to
    drain and exit; one after the other, a test's teardown paid that once per process)."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.stop()


# --- metrics ---------------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """GET http://127.0.0.1:port/path -> (status, content type, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def metric_families(text: str) -> dict[str, Metric]:
    """The text exposition format parsed by prometheus_client's own parser (it raises on malformed input)."""
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"metric family {family.name} exposed twice"
        families[family.name] = family
    return families


def parse_prometheus(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, sorted labels); a duplicate sample fails."""
    samples: Samples = {}
    for family in metric_families(text).values():
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"sample {key} exposed twice"
            samples[key] = s.value
    return samples


def scrape(port: int) -> Samples:
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
    return parse_prometheus(body)


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Tunnels:
    """Starts tunnel processes under one directory and stops them all at teardown."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.keys = directory / "keys"
        self.keys.mkdir(exist_ok=True)
        self.procs: list[TunnelProcess] = []
        self._params: dict[Path, dict[str, Any]] = {}

    def config(self, name: str, **kw: Any) -> Path:
        path = self.dir / f"{name}.toml"
        path.write_text(tunnel_toml(keydir=self.keys, **kw))
        self._params[path] = kw
        return path

    def rewrite(self, proc: TunnelProcess, **changes: Any) -> None:
        """Rewrite a running tunnel's configuration file with some parameters changed."""
        kw = {**self._params[proc.config], **changes}
        proc.config.write_text(tunnel_toml(keydir=self.keys, **kw))

    def start(self, role: str, name: str, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
              **kw: Any) -> TunnelProcess:
        proc = TunnelProcess(role, self.config(name, **kw), args=args, env=env)
        self.procs.append(proc)
        return proc.started()

    def pair(self, echo_port: int, *, server_extra: str = "", client_extra: str = "",
             server_peers: tuple[str, ...] = ("client-a",), client_identity: str = "client-a",
             name: str = "") -> tuple[TunnelProcess, TunnelProcess]:
        """A tunnel server in front of the echo service and a tunnel client pointing at it."""
        server = self.start("server", f"server{name}", listen="127.0.0.1:0", target=f"127.0.0.1:{echo_port}",
                            identity="server", peers=server_peers, extra=server_extra)
        client = self.client(server, client_identity, client_extra, name=f"client{name}")
        return server, client

    def client(self, server: TunnelProcess, identity: str, extra: str = "", *, name: str = "") -> TunnelProcess:
        return self.start("client", name or f"client-{identity}", listen="127.0.0.1:0",
                          target=f"127.0.0.1:{server.port}", identity=identity, peers=("server",), extra=extra)

    def stop_all(self) -> None:
        stop_all(self.procs)
