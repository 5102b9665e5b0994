"""An echo server and client on the asyncio API (``hybridkex.start_server`` / ``open_connection``).

    python examples/echo_asyncio.py

The same as echo_blocking.py, with asyncio streams: one event loop runs the server and three
concurrent clients, on 127.0.0.1, with PSK authentication (a fresh random key) and an in-memory QKD
link (``MemoryKeyLink``) standing in for a pair of ETSI GS QKD 014 KMEs.
"""

from __future__ import annotations

import asyncio
import secrets

import hybridkex
from hybridkex import Policy, QKDConfig
from hybridkex.api import ClientConfig, HybridStreamReader, HybridStreamWriter, ServerConfig
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import MemoryKeyLink

bootstrap = secrets.token_bytes(32)  # the pre-shared authentication key; never print or log it
link = MemoryKeyLink(("kme-a", "kme-b"))  # QKD stand-in: KME A serves the client, KME B the server

server_cfg = ServerConfig(ResponderConfig(
    "server.example", [PSKAuthenticator({"client.example": bootstrap})], Policy(),  # Policy(): QKD required
    QKDConfig(sae_id="sae-server", kme_id="kme-b")))
client_cfg = ClientConfig(InitiatorConfig(
    "client.example", [PSKAuthenticator({"server.example": bootstrap})], Policy(),
    QKDConfig(sae_id="sae-client", kme_id="kme-a"), peer_identity="server.example"))


async def echo(reader: HybridStreamReader, writer: HybridStreamWriter) -> None:
    """Runs for each verified connection only; the streams behave like asyncio's."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    await writer.aclose()  # close_notify, then close


async def client(port: int, n: int) -> bool:
    reader, writer = await hybridkex.open_connection(
        "127.0.0.1", port, client_cfg, key_source=link.source("sae-client", 0))
    try:
        message = f"hello from client {n}".encode()
        writer.write(message)
        writer.write_eof()  # TLS close_notify + TCP half-close: "I am done sending"
        echoed = await asyncio.wait_for(reader.read(-1), 30)  # everything, until the server closes
        s = writer.session  # what was established; holds no secret
        print(f"client {n}: echoed back intact: {echoed == message}")
        print(f"  suite          {s.suite}")
        print(f"  components     {', '.join(f'{c.name} ({c.secret_bytes * 8}-bit)' for c in s.info.components)}")
        print(f"  QKD key IDs    {', '.join(s.info.qkd_key_ids)}")
        print(f"  peer           {s.peer_identity} (authenticated by {s.info.auth_mode})")
        print(f"  TLS            {s.version} {s.cipher}, key exchange group {s.group}")
        return echoed == message
    finally:
        writer.close()
        await writer.wait_closed()


async def main() -> int:
    server = await hybridkex.start_server(echo, "127.0.0.1", 0, server_cfg,
                                          key_source=link.source("sae-server", 1))
    async with server:  # closes the server when the block ends
        port = server.sockets[0].getsockname()[1]
        print(f"echo server listening on 127.0.0.1:{port}")
        # Three clients at once: each runs its own handshake with its own QKD key.
        results = await asyncio.gather(*(client(port, n) for n in range(1, 4)))
    print("server stopped; done")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
