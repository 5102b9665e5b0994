"""Recycled authentication: a PSK bootstraps a pair once, then keys from earlier handshakes take over.

    python examples/recycled_auth.py [DIRECTORY]

Runs three connections of one client/server pair on 127.0.0.1 (blocking API, in-memory QKD link).
Each side keeps its own key store, as two hosts would: ``server-keys.sqlite3`` and
``client-keys.sqlite3`` in DIRECTORY (default: the current directory), created 0600 on first use.

* Connection 1 is authenticated by the bootstrap PSK; both sides store the key it derived.
* Connection 2 is authenticated by that recycled key, which retires the bootstrap PSK
  (policy ``bootstrap-once``): from now on the PSK is refused and can be deleted.
* Connection 3 uses the next recycled key, and so on: every handshake rotates the key.

Run it again and every connection is recycled (the stores remember the pair). Inspect a store with
``hybridkex recycle --store server-keys.sqlite3 list`` (it prints epochs and times, never keys).
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import hybridkex
from hybridkex import Policy, QKDConfig
from hybridkex.api import ClientConfig, HybridSocket, ServerConfig
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import MemoryKeyLink
from hybridkex.recycle import RecycledAuthenticator, RecyclePolicy, SQLiteAuthKeyStore

directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
bootstrap = secrets.token_bytes(32)  # needed only until the first recycled handshake; never printed
link = MemoryKeyLink()
server_kme, client_kme = link.source("sae-b", 1), link.source("sae-a", 0)

with SQLiteAuthKeyStore(directory / "server-keys.sqlite3") as server_store, \
        SQLiteAuthKeyStore(directory / "client-keys.sqlite3") as client_store:
    # The recycled authenticator comes first (the configuration refuses anything else), the
    # bootstrap second: it is used only while the pair has no recycled key in common.
    policy = RecyclePolicy("bootstrap-once")
    server_cfg = ServerConfig(ResponderConfig(
        "server.example",
        [RecycledAuthenticator(server_store, policy), PSKAuthenticator({"client.example": bootstrap})],
        Policy(), QKDConfig.from_key_source(server_kme)))
    client_cfg = ClientConfig(InitiatorConfig(
        "client.example",
        [RecycledAuthenticator(client_store, policy), PSKAuthenticator({"server.example": bootstrap})],
        Policy(), QKDConfig.from_key_source(client_kme), peer_identity="server.example"))

    def echo(conn: HybridSocket, address: tuple[str, int]) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    with hybridkex.HybridServer(("127.0.0.1", 0), server_cfg, echo, key_source=server_kme).start() as server:
        for n in range(1, 4):
            with hybridkex.connect(server.server_address, client_cfg, key_source=client_kme) as sock:
                sock.sendall(b"ping")
                assert sock.recv(16) == b"ping"
                print(f"connection {n}: authenticated by {sock.session.info.auth_mode}")

    for name, store in (("server", server_store), ("client", client_store)):
        for pair in store.summaries():
            print(f"{name} store {store.path.name}: {pair.local_id} <-> {pair.peer_id}, newest epoch "
                  f"{pair.newest_epoch}, bootstrap {'retired' if pair.bootstrap_retired else 'active'}")
