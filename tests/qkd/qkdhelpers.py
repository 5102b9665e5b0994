"""Helpers for the QKD tests: raw HTTPS requests with client certificates, servers in threads, KME processes.

Everything here is real: TLS on 127.0.0.1 with the demo PKI's certificates, aiohttp servers, and
``python -m hybridkex kme`` subprocesses.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import selectors
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openapicheck
from aiohttp import web

from hybridkex.qkd.pki import DemoPKI


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def sae_args(pki: DemoPKI, name: str) -> dict[str, Any]:
    """cert/key/ca keyword arguments for a client acting as ``name``."""
    return {"cert": pki.cert(name), "key": pki.key(name), "ca": pki.ca_cert}


def client_context(pki: DemoPKI, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if name is not None:
        ctx.load_cert_chain(str(pki.cert(name)), str(pki.key(name)))
    return ctx


def https_request(
    url: str,
    method: str,
    path: str,
    *,
    pki: DemoPKI,
    name: str | None = "sae-a",
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    check_openapi: bool = True,
) -> Response:
    """One request over a fresh mutual-TLS connection, as client ``name`` (``None``: no client cert).

    The answer is checked against the KME's OpenAPI document (:mod:`openapicheck`) unless
    ``check_openapi`` is false (a server that is not a KME)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname and parts.port
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                       context=client_context(pki, name))
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = dict(headers or {})
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        answer = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
    if check_openapi:
        openapicheck.check(openapicheck.Exchange(method, path, answer.status, answer.headers, answer.body))
    return answer


class ThreadedServer:
    """An aiohttp app served over TLS on 127.0.0.1 (free port) by a background event loop."""

    def __init__(self, app_factory: Callable[[], web.Application], ssl_context: ssl.SSLContext | None) -> None:
        self._factory = app_factory
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._stop = asyncio.Event()
            runner = web.AppRunner(self._factory(), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._ssl)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        try:
            self._loop.run_until_complete(serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    def start(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(15), "server did not start"
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}" if self._ssl else f"http://127.0.0.1:{self.port}"

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SyncOverAsync:
    """Drive an AsyncETSI014Client (or async pool) from sync test code, on a private event loop."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return self.loop.run_until_complete(result)
            return result

        return call

    def close(self) -> None:
        closer = getattr(self.client, "aclose", None)
        if closer is not None:
            self.loop.run_until_complete(closer())

    def dispose(self) -> None:
        if not self.loop.is_closed():
            self.close()
            self.loop.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KMEProcess:
    """``python -m hybridkex kme`` as a real subprocess; stderr goes to a file (never a full pipe)."""

    def __init__(self, pki: DemoPKI, *args: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridkex", "kme", "--pki", str(pki.directory), *args],
            stdout=subprocess.PIPE, stderr=self._log, env=env,
        )
        self.url_a, self.url_b = self._read_urls(timeout=30)

    def _read_urls(self, timeout: float) -> tuple[str, str]:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        urls: dict[str, str] = {}
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            while len(urls) < 2:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"KME did not print its URLs; log: {self.log_path.read_text()}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"KME exited ({self.proc.wait(5)}); log: {self.log_path.read_text()}")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    name, _, url = line.decode().partition(" ")
                    urls[name] = url
        finally:
            sel.close()
        return urls["KME-A"], urls["KME-B"]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return code
