"""An echo server and client on the blocking API (``hybridkex.connect`` and a ``HybridServer``).

    python examples/echo_blocking.py

Both ends run in this one process, on 127.0.0.1, with:

* PSK authentication: one fresh random 32-byte key that client and server share (in real life you
  would distribute it once, e.g. with ``hybridkex genpsk FILE``);
* an in-memory QKD link (``MemoryKeyLink``) standing in for a pair of ETSI GS QKD 014 KMEs.

Each connection runs the hybrid handshake (ML-KEM-768 + X25519 + a QKD key, combined into one
secret), then TLS 1.3 keyed with that secret. The client then sends a few messages and prints what
was established.
"""

from __future__ import annotations

import secrets

import hybridkex
from hybridkex import Policy, QKDConfig
from hybridkex.api import ClientConfig, HybridSocket, ServerConfig
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import MemoryKeyLink

# --- the shared setup -----------------------------------------------------------------------------
bootstrap = secrets.token_bytes(32)  # the pre-shared authentication key; never print or log it
link = MemoryKeyLink(("kme-a", "kme-b"))  # QKD stand-in: KME A serves the client, KME B the server
client_keys = link.source("sae-client", 0)  # the client SAE's key source, at KME A
server_keys = link.source("sae-server", 1)  # the server SAE's key source, at KME B

# The server knows its clients by identity; each identity has its own key.
server_cfg = ServerConfig(ResponderConfig(
    "server.example", [PSKAuthenticator({"client.example": bootstrap})], Policy(),  # Policy(): QKD required
    QKDConfig(sae_id="sae-server", kme_id="kme-b")))
# The client names the server it expects to reach; the handshake fails if someone else answers.
client_cfg = ClientConfig(InitiatorConfig(
    "client.example", [PSKAuthenticator({"server.example": bootstrap})], Policy(),
    QKDConfig(sae_id="sae-client", kme_id="kme-a"), peer_identity="server.example"))


# --- the server: handler(conn, address) runs in a thread per verified connection ------------------
def echo(conn: HybridSocket, address: tuple[str, int]) -> None:
    """Send every byte back until the client closes its side (conn behaves like a socket)."""
    # Printed before echoing, so it always appears before the client's lines for this connection.
    print(f"server: {conn.session.peer_identity} connected from {address[0]}, "
          f"QKD key {', '.join(conn.session.info.qkd_key_ids)}")
    while data := conn.recv(65536):
        conn.sendall(data)


# HybridServer is what ``hybridkex.serve(address, server_cfg, echo, key_source=...)`` runs (that call
# blocks until Ctrl-C, as a real server program would). Here ``.start()`` serves from a background
# thread so this script can be its own client; leaving the ``with`` block stops the server.
with hybridkex.HybridServer(("127.0.0.1", 0), server_cfg, echo, key_source=server_keys).start() as server:
    host, port = "127.0.0.1", server.server_address[1]
    print(f"echo server listening on {host}:{port}")

    # --- the client -------------------------------------------------------------------------------
    for n in range(2):  # two connections: each takes its own, never reused, QKD key
        with hybridkex.connect((host, port), client_cfg, key_source=client_keys) as sock:
            message = f"hello #{n + 1} over a quantum-safe channel".encode()
            sock.sendall(message)
            echoed = b""
            while len(echoed) < len(message):  # TCP is a stream: read until everything came back
                chunk = sock.recv(65536)
                if not chunk:
                    break
                echoed += chunk
            print(f"connection {n + 1}: sent {len(message)} bytes, echoed back intact: {echoed == message}")

            s = sock.session  # what was established; holds no secret
            print(f"  suite          {s.suite}")
            print(f"  components     {', '.join(f'{c.name} ({c.secret_bytes * 8}-bit)' for c in s.info.components)}")
            print(f"  QKD key IDs    {', '.join(s.info.qkd_key_ids)}")
            print(f"  peer           {s.peer_identity} (authenticated by {s.info.auth_mode})")
            print(f"  TLS            {s.version} {s.cipher}, key exchange group {s.group}")
            if echoed != message:
                raise SystemExit("echo mismatch")

print("server stopped; done")
