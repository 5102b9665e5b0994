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
from iohelpers import Setup, echo_on, make_setup
from statehelpers import SEAL_KEY

from hybridkex.api import ReconnectPolicy, ServerConfig
from hybridkex.io.aio import ServerSide, connect_on_streams
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


def through_a_and_b(setup: Setup, config: ServerConfig, order: str) -> tuple[list[tuple[bytes, bool]], int]:
    """Two asyncio servers A and B on one state; one connection per letter of ``order``, back to
    back (no pause: a full handshake's parent is in the state before that handshake completes).
    Each connection's echo and whether it was one round trip (steady state or reconnect); the loop's
    thread."""
    async def main() -> tuple[list[tuple[bytes, bool]], int]:
        sides = [ServerSide(config, key_source=setup.server_keys) for _ in range(2)]
        plain = [await asyncio.start_server(echo_on(s), "127.0.0.1", 0) for s in sides]
        ports = {name: p.sockets[0].getsockname()[1] for name, p in zip("ab", plain, strict=True)}
        out, ticket = [], None
        for name in order:
            r, w = await asyncio.open_connection("127.0.0.1", ports[name])
            hr, hw = await connect_on_streams(r, w, setup.client, key_source=setup.client_keys, ticket=ticket)
            hw.write(b"abc")
            out.append((await hr.read(), hw.session.steady is not None or hw.session.reconnect))
            ticket = ticket or hw.reconnect_ticket
            await hw.aclose()
        for p in plain:
            p.close()
        for s in sides:
            s.close()
        return out, threading.get_ident()
    return asyncio.run(main())


def test_reconnects_on_an_asyncio_server_call_the_state_off_the_loop(tmp_path: Path) -> None:
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True))
    state = ThreadRecordingState(tmp_path / "state.sqlite3")
    try:
        # The full handshake on A; reconnects on B (shared parent) and A (its own).
        out, loop_thread = through_a_and_b(setup, dataclasses.replace(setup.server, state=state, purge_every=0),
                                           "aba")
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
    try:
        out, _ = through_a_and_b(setup, dataclasses.replace(setup.server, state=state, purge_every=0), "abb")
    finally:
        state.close()
    assert out == [(b"abc", False), (b"abc", True), (b"abc", True)]
    assert state.puts >= 1
