"""Python's own http.server, served over hybridkex, fetched with http.client.

    python examples/http_server.py

``HybridHTTPServer`` is a ``socketserver``/``http.server`` server whose connections run the hybrid
handshake (ML-KEM-768 + X25519 + QKD) and TLS 1.3 before the handler sees a byte, so the standard
``SimpleHTTPRequestHandler`` works unchanged. ``HybridHTTPConnection`` is an
``http.client.HTTPConnection`` that connects the same way. Everything runs in this process on
127.0.0.1, with PSK authentication (a fresh random key) and an in-memory QKD link.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import secrets
import tempfile
import threading
from pathlib import Path

from hybridkex import Policy, QKDConfig
from hybridkex.api import ClientConfig, HybridHTTPConnection, HybridHTTPServer, ServerConfig
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import MemoryKeyLink

bootstrap = secrets.token_bytes(32)  # the pre-shared authentication key; never print or log it
link = MemoryKeyLink(("kme-a", "kme-b"))  # QKD stand-in: KME A serves the client, KME B the server

server_cfg = ServerConfig(ResponderConfig(
    "www.example", [PSKAuthenticator({"browser.example": bootstrap})], Policy(),  # Policy(): QKD required
    QKDConfig(sae_id="sae-server", kme_id="kme-b")))
client_cfg = ClientConfig(InitiatorConfig(
    "browser.example", [PSKAuthenticator({"www.example": bootstrap})], Policy(),
    QKDConfig(sae_id="sae-client", kme_id="kme-a"), peer_identity="www.example"))


class Site(http.server.SimpleHTTPRequestHandler):
    """The standard file server, plus one header saying who the authenticated client is."""

    def end_headers(self) -> None:
        # self.connection is the HybridSocket: its session names the peer the handshake authenticated.
        self.send_header("X-Authenticated-Peer", self.connection.session.peer_identity)
        super().end_headers()


with tempfile.TemporaryDirectory() as site_dir:
    page = "Hello from http.server, over ML-KEM-768 + X25519 + QKD and TLS 1.3.\n"
    (Path(site_dir) / "hello.txt").write_text(page)

    handler = functools.partial(Site, directory=site_dir)
    with HybridHTTPServer(("127.0.0.1", 0), handler, server_cfg, key_source=link.source("sae-server", 1)) as httpd:
        port = httpd.server_address[1]
        thread = threading.Thread(target=httpd.serve_forever, args=(0.1,), daemon=True)
        thread.start()
        print(f"http.server listening on 127.0.0.1:{port} (hybridkex connections only)")
        try:
            # The client: the usual http.client calls; only the connection class differs.
            conn = HybridHTTPConnection("127.0.0.1", port, config=client_cfg,
                                        key_source=link.source("sae-client", 0), timeout=30)
            conn.request("GET", "/hello.txt")  # connects first: hybrid handshake, then TLS
            assert conn.sock is not None
            s = conn.sock.session  # read it now: http.client drops the socket once an HTTP/1.0 reply is read
            resp = conn.getresponse()
            body = resp.read().decode()
            print(f"GET /hello.txt -> {resp.status} {resp.reason}, {len(body)} bytes")
            print(f"  body           {body.strip()}")
            print(f"  server saw     X-Authenticated-Peer: {resp.getheader('X-Authenticated-Peer')}")
            print(f"  suite          {s.suite}")
            print(f"  QKD key IDs    {', '.join(s.info.qkd_key_ids)}")
            print(f"  TLS            {s.version} {s.cipher}, key exchange group {s.group}")
            conn.close()
            if resp.status != 200 or body != page:
                raise SystemExit("unexpected response")

            # A plain HTTP client is refused: the server expects a hybridkex handshake, sees "GET"
            # and closes the connection (it logs the rejection on the hybridkex.server logger).
            plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                plain.request("GET", "/hello.txt")
                plain.getresponse()
                raise SystemExit("a plain HTTP client was served")
            except (http.client.HTTPException, ConnectionError) as exc:
                print(f"plain http.client GET -> refused ({type(exc).__name__})")
            finally:
                plain.close()
        finally:
            httpd.shutdown()  # stop serve_forever; leaving the with-block closes the listening socket
            thread.join(10)

print("server stopped; done")
