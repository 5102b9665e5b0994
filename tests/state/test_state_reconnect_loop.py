"""Reconnect tickets on an asyncio server with a shared state: no state call on the event loop.

The lookup is resolved from the ClientHello's PSK identity on a worker thread before TLS starts
(not inside OpenSSL's PSK callback), and a full handshake's parent is written on a worker thread
before the server answers the ClientHello, so the client finds it at any server at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from iohelpers import make_setup
from statehelpers import SEAL_KEY

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
            # No wait: A wrote its parent (on a worker thread) before it answered the ClientHello.
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


class SlowWriteState(SQLiteState):
    """A real SQLite state whose parent writes take ``delay`` s (a loaded database)."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path, seal_key=SEAL_KEY)
        self.delay = delay
        self.puts = 0

    def put_ticket(self, kind: str, handle: bytes, secret: bytes, *, expires_at: float) -> None:
        time.sleep(self.delay)
        super().put_ticket(kind, handle, secret, expires_at=expires_at)
        self.puts += 1


@pytest.mark.parametrize("mode", ["steady", "reconnect"])
def test_a_client_that_finished_a_full_handshake_finds_its_parent_at_another_server_at_once(
        tmp_path: Path, mode: str) -> None:
    """The parent's shared write is made before the server answers the ClientHello (a slow write
    used to race the client's next connection, which then fell back to a full handshake)."""
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True) if mode == "reconnect" else None)
    state = SlowWriteState(tmp_path / "state.sqlite3", delay=0.3)
    config = dataclasses.replace(setup.server, state=state, purge_every=0)

    async def main() -> list[tuple[bytes, bool]]:
        sides = [ServerSide(config, key_source=setup.server_keys) for _ in range(2)]

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
        for port in (a, b, b):  # no pause between connections: B must already have A's parent
            r, w = await asyncio.open_connection("127.0.0.1", port)
            hr, hw = await connect_on_streams(r, w, setup.client, key_source=setup.client_keys, ticket=ticket)
            hw.write(b"abc")
            quick = hw.session.steady is not None if mode == "steady" else hw.session.reconnect
            out.append((await hr.read(), quick))
            ticket = ticket or hw.reconnect_ticket
            await hw.aclose()
        for p in plain:
            p.close()
        for s in sides:
            s.close()
        return out

    try:
        out = asyncio.run(main())
    finally:
        state.close()
    assert out == [(b"abc", False), (b"abc", True), (b"abc", True)]
    assert state.puts >= 1
