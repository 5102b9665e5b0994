"""The blocking and the asyncio driver run the same setup machine: the same scripted exchanges give
the same outcomes, errors and session facts through both (over real TCP sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from iohelpers import CLIENT_ID, SERVER_ID, WAIT, Setup, make_setup

import hybridkex
from hybridkex.api import ReconnectPolicy
from hybridkex.exceptions import KeySourceError, StoreError
from hybridkex.io.aio import ServerSide, accept_on_streams
from hybridkex.io.connection import accept
from hybridkex.io.setup import ServerState
from hybridkex.protocol import PSKAuthenticator, ResponderConfig

Outcome = tuple[str, str, dict[str, Any] | None]


class _NoKeys:
    """A KME that is down: every request fails."""

    sae_id = "sae-server"
    kme_id = "kme-server"

    def get_keys(self, *args: Any, **kwargs: Any) -> Any:
        raise KeySourceError("the KME is down")

    def get_keys_by_id(self, *args: Any, **kwargs: Any) -> Any:
        raise KeySourceError("the KME is down")

    def status(self, *args: Any, **kwargs: Any) -> Any:
        raise KeySourceError("the KME is down")


class _FailingHook(PSKAuthenticator):
    """Authenticates like PSK, then fails to record the session (a full disk, say)."""

    def after_handshake(self, session: Any) -> None:
        raise StoreError("the recycled-key store is full")


def _facts(session: Any) -> dict[str, Any]:
    return {"peer": session.peer_identity, "suite": session.suite, "qkd": session.qkd_used,
            "reconnect": session.reconnect, "index": session.reconnect_index, "version": session.version,
            "group": session.group}


def _name(exc: BaseException | None) -> str:
    return "ok" if exc is None else type(exc).__name__


# --- the two drivers, each side capturing its result ------------------------------------------------


def _blocking(state: ServerState, client: Callable[[tuple[str, int]], Any]) -> Outcome:
    listener = socket.create_server(("127.0.0.1", 0))
    box: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            hs = accept(conn, state)
            box["server"] = hs.session
            hs.sendall(b"x")
            hs.close()
        except Exception as exc:
            box["server_error"] = exc
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = client(listener.getsockname())
        client_error = None
    except Exception as exc:
        result, client_error = None, exc
    thread.join(WAIT)
    listener.close()
    return _name(client_error), _name(box.get("server_error")), result


def _asyncio(side: ServerSide, client: Callable[[tuple[str, int]], Any]) -> Outcome:
    async def main() -> Outcome:
        done = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                _, hwriter = await accept_on_streams(reader, writer, side)
                hwriter.write(b"x")
                await hwriter.drain()
                hwriter.close()
                done.set_result(None)
            except Exception as exc:
                writer.close()
                done.set_result(exc)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            result, client_error = await client(server.sockets[0].getsockname()), None
        except Exception as exc:
            result, client_error = None, exc
        server_error = await asyncio.wait_for(done, WAIT)
        server.close()
        return _name(client_error), _name(server_error), result

    return asyncio.run(main())


def _blocking_client(setup: Setup, **kwargs: Any) -> Callable[[tuple[str, int]], Any]:
    def run(address: tuple[str, int]) -> Any:
        with hybridkex.connect(address, setup.client, key_source=setup.client_keys, **kwargs) as conn:
            assert conn.recv(1) == b"x"
            return _facts(conn.session)
    return run


def _asyncio_client(setup: Setup, **kwargs: Any) -> Callable[[tuple[str, int]], Any]:
    async def run(address: tuple[str, int]) -> Any:
        reader, writer = await hybridkex.open_connection(*address, setup.client, key_source=setup.client_keys,
                                                         **kwargs)
        try:
            assert await reader.readexactly(1) == b"x"
            return _facts(writer.session)
        finally:
            await writer.aclose()
    return run


def _raw_client(payload: bytes) -> Callable[[tuple[str, int]], Any]:
    def run(address: tuple[str, int]) -> Any:
        with socket.create_connection(address, timeout=WAIT) as sock:
            if payload:
                sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(WAIT)
            while sock.recv(4096):
                pass
        return None
    return run


def _async_raw_client(payload: bytes) -> Callable[[tuple[str, int]], Any]:
    async def run(address: tuple[str, int]) -> Any:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(payload)
        writer.write_eof()
        await reader.read()
        writer.close()
        return None
    return run


def _both(setup: Setup, *, server_keys: Any = "default", raw: bytes | None = None,
          **client_kwargs: Any) -> tuple[Outcome, Outcome]:
    keys = setup.server_keys if server_keys == "default" else server_keys
    state, side = ServerState(setup.server, keys), ServerSide(setup.server, key_source=keys)
    if raw is not None:
        return _blocking(state, _raw_client(raw)), _asyncio(side, _async_raw_client(raw))
    return (_blocking(state, _blocking_client(setup, **client_kwargs)),
            _asyncio(side, _asyncio_client(setup, **client_kwargs)))


# --- the scripted exchanges -------------------------------------------------------------------------

_OK_FACTS = {"peer": SERVER_ID, "suite": "x25519-mlkem768-qkd-hkdfsha256", "qkd": True, "reconnect": False,
             "index": None, "version": "TLSv1.3", "group": "X25519MLKEM768"}


def test_success_is_the_same_through_both_drivers() -> None:
    blocking, aio = _both(make_setup())
    assert blocking == aio == ("ok", "ok", _OK_FACTS)


@pytest.mark.parametrize(("name", "make", "server_keys", "expected"), [
    ("wrong PSK", lambda: make_setup(client_psk=b"\x01" * 32), "default",
     ("AuthenticationError", "AuthenticationError")),
    ("KME down, QKD required", make_setup, _NoKeys(), ("KeyUnavailableError", "KeyUnavailableError")),
    ("no common suite", lambda: _disjoint_suites(), "default", ("PolicyViolation", "PolicyViolation")),
    ("server hook fails", lambda: _failing_server_hook(), "default", ("TLSError", "StoreError")),
])
def test_each_failure_class_is_the_same_through_both_drivers(name: str, make: Callable[[], Setup],
                                                             server_keys: Any, expected: tuple[str, str]) -> None:
    blocking, aio = _both(make(), server_keys=server_keys)
    assert blocking == aio, name
    assert blocking[:2] == expected, name


@pytest.mark.parametrize(("payload", "error"), [
    (b"GET / HTTP/1.0\r\n\r\n", "RemoteProtocolError"),  # neither a Hello nor a ClientHello
    (b"", "RemoteProtocolError"),  # closed without a byte
    (b"\x16\x03\x01\x02\x00\x01", "RemoteProtocolError"),  # a ClientHello cut short by EOF
    (b"HK\x01\x01\x00\x00\x00\x05ab", "RemoteProtocolError"),  # a Hello frame cut short by EOF
])
def test_bad_peers_get_the_same_error_from_both_drivers(payload: bytes, error: str) -> None:
    blocking, aio = _both(make_setup(), raw=payload)
    assert blocking == aio == ("ok", error, None)


def test_a_silent_peer_times_out_the_same_way_in_both_drivers() -> None:
    setup = make_setup(server_timeout=0.3)

    def silent(address: tuple[str, int]) -> Any:
        with socket.create_connection(address, timeout=WAIT) as sock:
            sock.settimeout(WAIT)
            assert sock.recv(1) == b""  # the server gives up and closes
        return None

    async def silent_async(address: tuple[str, int]) -> Any:
        reader, writer = await asyncio.open_connection(*address)
        assert await reader.read() == b""
        writer.close()
        return None

    blocking = _blocking(ServerState(setup.server, setup.server_keys), silent)
    aio = _asyncio(ServerSide(setup.server, key_source=setup.server_keys), silent_async)
    assert blocking == aio == ("ok", "HandshakeTimeout", None)


def _reconnects(driver: str) -> dict[str, Outcome]:
    """A full connection, a reconnect with its ticket (hit), and the same ticket at a server that never
    saw the parent session (miss: a restarted server)."""
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True, max_uses=4, lifetime=60.0))
    keys = setup.server_keys
    tickets: list[Any] = []

    def first(address: tuple[str, int]) -> Any:
        with hybridkex.connect(address, setup.client, key_source=setup.client_keys) as conn:
            tickets.append(conn.reconnect_ticket)
            assert conn.recv(1) == b"x"
            return _facts(conn.session)

    async def first_async(address: tuple[str, int]) -> Any:
        reader, writer = await hybridkex.open_connection(*address, setup.client, key_source=setup.client_keys)
        tickets.append(writer.reconnect_ticket)
        assert await reader.readexactly(1) == b"x"
        await writer.aclose()
        return _facts(writer.session)

    def later(address: tuple[str, int]) -> Any:
        return (_blocking_client if driver == "blocking" else _asyncio_client)(setup, ticket=tickets[0])(address)

    if driver == "blocking":
        state = ServerState(setup.server, keys)
        return {"full": _blocking(state, first), "hit": _blocking(state, later),
                "miss": _blocking(ServerState(setup.server, keys), later)}
    side = ServerSide(setup.server, key_source=keys)
    return {"full": _asyncio(side, first_async), "hit": _asyncio(side, later),
            "miss": _asyncio(ServerSide(setup.server, key_source=keys), later)}


def test_a_reconnect_hit_and_miss_are_the_same_through_both_drivers() -> None:
    blocking, aio = _reconnects("blocking"), _reconnects("asyncio")
    assert blocking == aio
    assert blocking["full"] == ("ok", "ok", _OK_FACTS)
    assert blocking["hit"] == ("ok", "ok", _OK_FACTS | {"reconnect": True, "index": 1})
    assert blocking["miss"] == ("PSKRejected", "UnknownPSKIdentity", None)


def _disjoint_suites() -> Setup:
    setup = make_setup(suites=("x25519-mlkem768-qkd-hkdfsha256",))
    other = make_setup(suites=("x25519-mlkem1024-qkd-hkdfsha384",))
    server = dataclasses.replace(setup.server, handshake=dataclasses.replace(
        setup.server.handshake, policy=other.server.handshake.policy))
    return dataclasses.replace(setup, server=server)


def _failing_server_hook() -> Setup:
    setup = make_setup()
    res = setup.server.handshake
    hooked = ResponderConfig(SERVER_ID, (_FailingHook({CLIENT_ID: setup.psk}),), res.policy, res.qkd)
    return dataclasses.replace(setup, server=dataclasses.replace(setup.server, handshake=hooked))
