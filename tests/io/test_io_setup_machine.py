"""The setup machines with no I/O at all: bytes in, events out (hybridkex.io.setup)."""

from __future__ import annotations

from typing import Any

import pytest
from iohelpers import Setup, make_setup

from hybridkex.api import ReconnectPolicy
from hybridkex.exceptions import HandshakeTimeout, LocalProtocolError, RemoteProtocolError, TLSError
from hybridkex.io.setup import (
    NEED_DATA,
    BlockingCall,
    ClientSetup,
    Established,
    Failed,
    QKDRequest,
    ServerSetup,
    ServerState,
)
from hybridkex.protocol import HEADER_LEN, MAGIC, AbortCode, FrameType


def _step(machine: Any, log: list[str]) -> Any:
    """Advance ``machine`` as a driver would, running blocking calls inline; the first event that
    needs the peer (NEED_DATA), or the final one."""
    while True:
        event = machine.next_event()
        log.append(type(event).__name__ if event is not NEED_DATA else "NEED_DATA")
        if isinstance(event, BlockingCall):
            try:
                machine.call_done(event.run())
            except Exception as exc:
                machine.call_failed(exc)
            continue
        return event


def _run(client: ClientSetup, server: ServerSetup) -> tuple[Any, Any, list[str], list[str]]:
    """Both ends as a network would run them: each answers once it has what the other sent."""
    c_log: list[str] = []
    s_log: list[str] = []
    c_ev = _step(client, c_log)
    s_ev: Any = NEED_DATA
    for _ in range(20):
        out = client.data_to_send()
        if out and s_ev is NEED_DATA:
            server.receive_data(out)
            s_ev = _step(server, s_log)
        back = server.data_to_send()
        if back and c_ev is NEED_DATA:
            client.receive_data(back)
            c_ev = _step(client, c_log)
        if c_ev is not NEED_DATA and s_ev is not NEED_DATA:
            return c_ev, s_ev, c_log, s_log
    raise AssertionError("setup did not finish")


def _pair(setup: Setup, **client_kwargs: Any) -> tuple[ClientSetup, ServerSetup, ServerState]:
    state = ServerState(setup.server, setup.server_keys)
    return ClientSetup(setup.client, setup.client_keys, **client_kwargs), ServerSetup(state), state


def test_a_full_setup_in_memory_yields_the_documented_events() -> None:
    client, server, _ = _pair(make_setup())
    c_ev, s_ev, c_log, s_log = _run(client, server)
    assert isinstance(c_ev, Established) and isinstance(s_ev, Established)
    # The server is the ETSI master: its KME is asked as soon as the Hello is in; the client fetches
    # the key by ID from the Response, then sends its Finished and ClientHello in one flight.
    assert s_log == ["QKDRequest", "NEED_DATA", "NEED_DATA", "Established"]
    assert c_log == ["NEED_DATA", "QKDRequest", "NEED_DATA", "Established"]
    assert client.stage == server.stage == "established"
    assert c_ev.info.qkd_key_ids == s_ev.info.qkd_key_ids and c_ev.info.qkd_used
    assert c_ev.tls_info.group == "X25519MLKEM768"
    exporter = c_ev.tls.connection.export_keying_material(b"EXPORTER-test", 32)
    assert exporter == s_ev.tls.connection.export_keying_material(b"EXPORTER-test", 32)
    with pytest.raises(LocalProtocolError):
        client.next_event()


def test_a_reconnect_goes_straight_to_tls_and_a_miss_fails_closed() -> None:
    setup = make_setup(reconnect=ReconnectPolicy(enabled=True, max_uses=4, lifetime=60.0))
    client, server, state = _pair(setup)
    first, _, _, _ = _run(client, server)
    assert first.ticket is not None
    again = ClientSetup(setup.client, None, ticket=first.ticket)
    assert again.reconnect
    c_ev, s_ev, c_log, s_log = _run(again, ServerSetup(state))
    assert (c_ev.reconnect_index, s_ev.reconnect_index) == (1, 1)
    assert "QKDRequest" not in c_log + s_log  # no hybrid exchange, no KME
    miss = ClientSetup(setup.client, None, ticket=first.ticket)
    c_ev, s_ev, _, _ = _run(miss, ServerSetup(ServerState(setup.server, setup.server_keys)))
    assert isinstance(c_ev, Failed) and isinstance(c_ev.error, TLSError)
    assert isinstance(s_ev, Failed) and isinstance(s_ev.error, TLSError)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "without sending anything"),
    (b"\x00", "neither a hybridkex Hello nor a TLS ClientHello (first byte 0x00)"),
    (b"\x16\x03\x01\x00\x10abc", "in the middle of its ClientHello"),
    (b"\x16\x09\x09\x00\x10", "not a TLS handshake record"),
])
def test_the_first_byte_demux_rejects_bad_starts(data: bytes, message: str) -> None:
    setup = make_setup()
    server = ServerSetup(ServerState(setup.server, setup.server_keys))
    if data:
        server.receive_data(data)
    server.receive_data(b"")
    event = server.next_event()
    assert isinstance(event, Failed) and isinstance(event.error, RemoteProtocolError)
    assert message in str(event.error)
    assert server.next_event() is event  # failed stays failed


def test_a_driver_timeout_queues_an_abort_naming_the_stage() -> None:
    setup = make_setup()
    client = ClientSetup(setup.client, setup.client_keys)
    assert client.next_event() is NEED_DATA and client.stage == "hybrid"
    client.data_to_send()  # the Hello went out; the peer never answers
    failed = client.fail(TimeoutError())
    assert isinstance(failed.error, HandshakeTimeout)
    assert "the hybrid handshake did not complete" in str(failed.error)
    abort = client.data_to_send()
    assert abort[:2] == MAGIC and abort[3] == FrameType.ABORT and abort[HEADER_LEN] == AbortCode.TIMEOUT
    assert client.next_event() is failed


def test_a_key_source_failure_is_answered_by_the_policy() -> None:
    setup = make_setup(qkd="optional")
    state = ServerState(setup.server, setup.server_keys)
    client, server = ClientSetup(setup.client, setup.client_keys), ServerSetup(state)
    server.receive_data(_first_flight(client))
    event = server.next_event()
    assert isinstance(event, QKDRequest) and event.what == "the QKD key source"
    from hybridkex.exceptions import KeySourceError

    server.call_failed(KeySourceError("the KME is down"))  # optional QKD: the no-QKD suite runs
    assert server.next_event() is NEED_DATA
    assert server.data_to_send()[:2] == MAGIC  # the Response flight


def _first_flight(client: ClientSetup) -> bytes:
    assert client.next_event() is NEED_DATA
    return client.data_to_send()
