"""Reconnect tickets on an asyncio server with a shared state: no state call on the event loop.

The lookup is resolved from the ClientHello's PSK identity on a worker thread before TLS starts
(not inside OpenSSL's PSK callback), and a full handshake's parent is written in the background.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

from iohelpers import make_setup
from statehelpers import SEAL_KEY, raw_rows

import hybridkex
from hybridkex.api import ReconnectPolicy
from hybridkex.io.aio import ServerSide, accept_on_streams, connect_on_streams
from hybridkex.state import SQLiteState


class ThreadRecordingState(SQLiteState):
    """A real SQLite state that notes which thread made each call the reconnect registry makes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, seal_key=SEAL_KEY)
        self.calls: list[tuple[str, int]] = []

    def spend(self, scope: str, ids: Any) -> bool:
        self.calls.append(("spend", threading.get_ident()))
        return super().spend(scope, ids)

    def get_ticket(self, kind: str, handle: bytes) -> Any:
        self.calls.append(("get_ticket", threading.get_ident()))
        return super().get_ticket(kind, handle)

    def put_ticket(self, kind: str, handle: bytes, secret: bytes, *, expires_at: float) -> None:
        self.calls.append(("put_ticket", threading.get_ident()))
        super().put_ticket(kind, handle, secret, expires_at=expires_at)


def test_reconnects_on_an_asyncio_server_call_the_state_off_the_loop(tmp_path: Path) -> None:
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True))
    url = str(tmp_path / "state.sqlite3")
    state = ThreadRecordingState(Path(url))
    config = dataclasses.replace(setup.server, state=state, purge_every=0)

    async def main() -> tuple[list[tuple[bytes, bool]], int]:
        loop_thread = threading.get_ident()
        sides = [ServerSide(config, key_source=setup.server_keys) for _ in range(2)]  # A and B: two servers

        def on_tcp(side: ServerSide) -> Any:
            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    hreader, hwriter = await accept_on_streams(reader, writer, side)
                except hybridkex.HybridKEXError:
                    writer.close()
                    return
                hwriter.write(await hreader.readexactly(3))
                await hwriter.drain()
                await hwriter.aclose()
            return serve

        plain = [await asyncio.start_server(on_tcp(s), "127.0.0.1", 0) for s in sides]
        a, b = (p.sockets[0].getsockname()[1] for p in plain)
        out, ticket = [], None
        for port in (a, b, a):  # the full handshake on A; reconnects on B (shared parent) and A (its own)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            hr, hw = await connect_on_streams(r, w, setup.client, key_source=setup.client_keys, ticket=ticket)
            hw.write(b"abc")
            out.append((await hr.read(), hw.session.reconnect))
            ticket = ticket or hw.reconnect_ticket
            await hw.aclose()
            for _ in range(200):  # A's parent is written in the background: B accepts it once it landed
                if any(kind == "reconnect" for kind, _ in raw_rows(url, "state_tickets")):
                    break
                await asyncio.sleep(0.02)
        for p in plain:
            p.close()
        for s in sides:
            s.close()
        return out, loop_thread

    try:
        out, loop_thread = asyncio.run(main())
    finally:
        state.close()
    assert out == [(b"abc", False), (b"abc", True), (b"abc", True)]
    names = [name for name, _ in state.calls]
    # A's parent written; B read it and spent its counter; A spent its own counter.
    assert names.count("put_ticket") == 1 and names.count("get_ticket") == 1 and names.count("spend") == 2, names
    assert all(thread != loop_thread for _, thread in state.calls), state.calls
