"""socketserver and http.server handlers, unchanged, over hybridkex; http.client over a hybrid
connection, in-process and against a real subprocess server."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from iohelpers import CLIENT_ID, SERVER_ID, WAIT, make_setup

import hybridkex
from hybridkex import Policy
from hybridkex.api import (
    ClientConfig,
    HybridClient,
    HybridHTTPConnection,
    HybridHTTPServer,
    HybridSocket,
    HybridTCPServer,
    ReconnectPolicy,
)
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator

HERE = Path(__file__).parent


class EchoHandler(socketserver.BaseRequestHandler):
    """A plain socketserver handler, written for TCP sockets."""

    def handle(self) -> None:
        while True:
            data = self.request.recv(4096)
            if not data:
                return
            self.request.sendall(data)


class UpperLines(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


class WhoAmI(http.server.BaseHTTPRequestHandler):
    """Answers with what the hybrid session says about the client, and echoes POST bodies."""

    protocol_version = "HTTP/1.1"

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        session = self.connection.session
        self._reply(json.dumps({"peer": session.peer_identity, "group": session.group,
                                "reconnect": session.reconnect, "path": self.path}).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(body[::-1])

    def log_message(self, format: str, *args: Any) -> None:
        pass


class QuietStatic(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[Any]:
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        t.join(WAIT)
        server.server_close()


def test_base_request_handler_echo(setup: Any) -> None:
    server = HybridTCPServer(("127.0.0.1", 0), EchoHandler, setup.server, key_source=setup.server_keys)
    with serving(server):
        for payload in (b"x", os.urandom(100_000)):
            with hybridkex.connect(server.server_address, setup.client, key_source=setup.client_keys) as sock:
                sock.settimeout(WAIT)
                sock.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += sock.recv(65536)
                assert got == payload
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(10) == b""  # the handler saw EOF, returned, close_notify came back


def test_stream_request_handler_lines(setup: Any) -> None:
    server = HybridTCPServer(("127.0.0.1", 0), UpperLines, setup.server, key_source=setup.server_keys)
    with serving(server), hybridkex.connect(server.server_address, setup.client, key_source=setup.client_keys) as sock:
        f = sock.makefile("rwb")
        f.write(b"hello\nworld\n")
        f.flush()
        assert f.readline() == b"HELLO\n" and f.readline() == b"WORLD\n"
        f.close()


def test_http_server_and_client(setup: Any, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_bytes(b"<h1>quantum-safe</h1>")
    blob = os.urandom(300_000)
    (tmp_path / "blob.bin").write_bytes(blob)
    server = HybridHTTPServer(("127.0.0.1", 0), functools.partial(QuietStatic, directory=str(tmp_path)), setup.server,
                              key_source=setup.server_keys)
    with serving(server):
        port = server.server_address[1]
        conn = HybridHTTPConnection("127.0.0.1", port, config=setup.client, key_source=setup.client_keys,
                                    timeout=WAIT)
        conn.request("GET", "/index.html")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"<h1>quantum-safe</h1>"
        assert resp.getheader("Content-Type") == "text/html"
        conn.close()
        conn = HybridHTTPConnection("127.0.0.1", port, config=setup.client, key_source=setup.client_keys)
        conn.request("GET", "/blob.bin")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == blob
        assert conn.sock is None or conn.sock.session.peer_identity == SERVER_ID
        conn.close()
        conn = HybridHTTPConnection("127.0.0.1", port, config=setup.client, key_source=setup.client_keys)
        conn.request("GET", "/missing")
        assert conn.getresponse().status == 404
        conn.close()


def test_http_keep_alive_post_and_session_in_handler(setup: Any) -> None:
    server = HybridHTTPServer(("127.0.0.1", 0), WhoAmI, setup.server, key_source=setup.server_keys)
    with serving(server):
        conn = HybridHTTPConnection("127.0.0.1", server.server_address[1], config=setup.client,
                                    key_source=setup.client_keys, timeout=WAIT)
        conn.request("GET", "/who")
        first = json.loads(conn.getresponse().read())
        sock = conn.sock
        conn.request("POST", "/echo", body=b"abcdef", headers={"Content-Length": "6"})
        assert conn.getresponse().read() == b"fedcba"
        assert conn.sock is sock  # one hybrid connection, two requests (HTTP/1.1 keep-alive)
        conn.close()
    assert first == {"peer": CLIENT_ID, "group": "X25519MLKEM768", "reconnect": False, "path": "/who"}


def test_http_client_reuses_reconnect_tickets(setup: Any) -> None:
    rc = ReconnectPolicy(enabled=True, max_uses=5)
    s = make_setup(reconnect=rc)
    server = HybridHTTPServer(("127.0.0.1", 0), WhoAmI, s.server, key_source=s.server_keys)
    client = HybridClient(s.client, key_source=s.client_keys)
    with serving(server):
        seen = []
        for _ in range(4):
            conn = HybridHTTPConnection("127.0.0.1", server.server_address[1], client=client, timeout=WAIT)
            conn.request("GET", "/")
            seen.append(json.loads(conn.getresponse().read())["reconnect"])
            conn.close()
    assert seen == [False, True, True, True]
    assert (client.full_handshakes, client.reconnects) == (1, 3)
    client.close()


def test_http_connection_arguments(setup: Any) -> None:
    with pytest.raises(hybridkex.ConfigurationError):
        HybridHTTPConnection("127.0.0.1", 1)
    with pytest.raises(hybridkex.ConfigurationError):
        HybridHTTPConnection("127.0.0.1", config=setup.client)


def test_http_over_a_subprocess_server(tmp_path: Path) -> None:
    """A real server process (its own interpreter) serving files; fetched with http.client here."""
    (tmp_path / "hello.txt").write_bytes(b"from another process\n")
    psk = os.urandom(32)
    proc = subprocess.Popen([sys.executable, str(HERE / "http_server_proc.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(HERE.parent.parent))
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"identity": SERVER_ID, "peer": CLIENT_ID, "psk": psk.hex(),
                                     "directory": str(tmp_path)}).encode() + b"\n")
        proc.stdin.flush()
        line = proc.stdout.readline().decode()
        assert line.startswith("PORT "), (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split()[1])
        config = ClientConfig(InitiatorConfig(CLIENT_ID, [PSKAuthenticator({SERVER_ID: psk})], Policy(qkd="disabled"),
                                              peer_identity=SERVER_ID))
        conn = HybridHTTPConnection("127.0.0.1", port, config=config, timeout=WAIT)
        conn.request("GET", "/hello.txt")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"from another process\n"
        session = conn.sock.session if conn.sock is not None else None
        conn.close()
        assert session is None or (session.peer_identity == SERVER_ID and not session.qkd_used)
        # A wrong bootstrap key is refused by the other process too.
        bad = ClientConfig(InitiatorConfig(CLIENT_ID, [PSKAuthenticator({SERVER_ID: os.urandom(32)})],
                                           Policy(qkd="disabled"), peer_identity=SERVER_ID))
        with pytest.raises(hybridkex.AuthenticationError):
            HybridHTTPConnection("127.0.0.1", port, config=bad, timeout=WAIT).request("GET", "/hello.txt")
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0


def test_handler_sees_a_hybrid_socket(setup: Any) -> None:
    kinds: list[type] = []

    class Probe(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            kinds.append(type(self.request))
            self.request.sendall(b"k")

    server = HybridTCPServer(("127.0.0.1", 0), Probe, setup.server, key_source=setup.server_keys)
    with serving(server), hybridkex.connect(server.server_address, setup.client, key_source=setup.client_keys) as sock:
        assert sock.recv(1) == b"k"
    assert kinds == [HybridSocket]
    with pytest.raises(hybridkex.ConfigurationError):
        HybridTCPServer(("127.0.0.1", 0), Probe)
