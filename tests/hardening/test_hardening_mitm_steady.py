"""The active man-in-the-middle table of test_hardening_mitm.py, for steady-state connections.

Per case: a server, one full handshake (direct) that gives the client its steady-state ticket,
then one steady-state connection through the attacking proxy (AttackProxy: drop, delay, reorder,
duplicate, replay from another parent, truncate, inject, flip one byte, for every message of a real
steady-state connection: ClientHello with its announcing identity, ServerHello, the encrypted
flight, Finished, application data both ways).  For every case:

* both ends fail closed: a typed HybridKEXError (or an error on read for application records),
  never an untyped exception, never a hang;
* the server's handler never runs for an attacked handshake; what it receives is a prefix of what
  the client sent; the client never reads bytes other than its echo;
* no lockout: the same ticket's next steady-state connection (direct) succeeds, one TLS round trip;
* no QKD key ID in two sessions, and no ERROR log line from hybridkex.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any

import pytest
from hardeninghelpers import C2S, S2C, Attack, AttackProxy
from iohelpers import make_setup
from test_hardening_mitm import (
    CONCURRENCY,
    PAYLOAD_LEN,
    SETUP_TIMEOUT,
    ErrorLog,
    Outcome,
    _echo_handler,
    attack_cases,
    check_outcomes,
    classify,
)

import hybridkex
from hybridkex.exceptions import HybridKEXError
from hybridkex.steady import SteadyTicket

pytestmark = pytest.mark.exclusive  # timing-sensitive under load: runs alone (tests/conftest.py)


def _setup() -> Any:
    return make_setup(server_timeout=SETUP_TIMEOUT, client_timeout=SETUP_TIMEOUT, kme_timeout=2.0)


async def _first_contact(setup: Any, port: int) -> SteadyTicket:
    reader, writer = await hybridkex.open_connection("127.0.0.1", port, setup.client, key_source=setup.client_keys)
    writer.write(b"x")
    writer.write_eof()
    await writer.drain()
    assert await reader.read() == b"x"
    writer.close()
    ticket = writer.reconnect_ticket
    assert isinstance(ticket, SteadyTicket)
    return ticket


async def _steady(setup: Any, port: int, ticket: SteadyTicket, payload: bytes,
                  app_timeout: float) -> tuple[str, tuple[str, ...]]:
    try:
        async with asyncio.timeout(SETUP_TIMEOUT * 4):
            reader, writer = await hybridkex.open_connection("127.0.0.1", port, setup.client,
                                                             key_source=setup.client_keys, ticket=ticket)
    except HybridKEXError as exc:
        return f"setup:{type(exc).__name__}", ()
    except TimeoutError:
        return "HANG-IN-SETUP", ()
    steady = writer.session.steady
    if steady is None:
        writer.close()
        return "NOT-STEADY", ()
    ids = writer.session.qkd_key_ids
    try:
        async with asyncio.timeout(app_timeout):
            writer.write(payload)
            writer.write_eof()
            await writer.drain()
            got = await reader.readexactly(len(payload))
            rest = await reader.read()
        return ("echo" if got == payload and rest == b"" else "WRONG-DATA"), ids
    except HybridKEXError as exc:
        return f"app:{type(exc).__name__}", ids
    except asyncio.IncompleteReadError as exc:
        return ("app:eof" if payload.startswith(exc.partial) else "WRONG-DATA"), ids
    except (TimeoutError, ConnectionError) as exc:
        return f"app:{type(exc).__name__}", ids
    finally:
        writer.close()


async def _server(setup: Any, rec: dict[str, Any]) -> Any:
    return await hybridkex.start_server(lambda r, w: _echo_handler(rec, r, w), "127.0.0.1", 0, setup.server,
                                        key_source=setup.server_keys)


async def _run_case(setup: Any, attack: Attack, kind: str, sem: asyncio.Semaphore) -> Outcome:
    async with sem:
        rec: dict[str, Any] = {"runs": 0, "received": [], "errors": []}
        server = await _server(setup, rec)
        port = int(server.sockets[0].getsockname()[1])
        proxy = await AttackProxy(("127.0.0.1", port), attack).start()
        payload = os.urandom(PAYLOAD_LEN)
        out = Outcome(attack, kind, payload=payload)
        try:
            ticket = await _first_contact(setup, port)
            runs_before, received_before = rec["runs"], len(rec["received"])
            out.client, out.key_ids = await _steady(setup, proxy.port, ticket, payload, SETUP_TIMEOUT * 2)
            await proxy.close()
            for _ in range(200):
                if server.active_connections == 0:
                    break
                await asyncio.sleep(0.05)
            out.attacked_handler_runs = rec["runs"] - runs_before
            out.applied = proxy.applied
            out.received = rec["received"][received_before:]
            legit = os.urandom(PAYLOAD_LEN)
            result, ids = await _steady(setup, port, ticket, legit, 10)
            out.legit_ok = result == "echo"
            out.key_ids += ids
            out.received = [r for r in out.received if r != legit]
        finally:
            await proxy.close()
            server.close()
            await server.wait_closed()
        return out


async def _record(setup: Any) -> dict[str, list[bytes]]:
    rec: dict[str, Any] = {"runs": 0, "received": [], "errors": []}
    server = await _server(setup, rec)
    port = int(server.sockets[0].getsockname()[1])
    proxy = await AttackProxy(("127.0.0.1", port)).start()
    try:
        ticket = await _first_contact(setup, port)
        result, _ = await _steady(setup, proxy.port, ticket, os.urandom(PAYLOAD_LEN), 10)
        assert result == "echo", result
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
    return proxy.record.messages


def _kinds(recorded: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """A steady-state connection: the client's ClientHello, (CCS), Finished, then data; the server's
    ServerHello, (CCS), EncryptedExtensions and Finished, then data.  Asserted so a change of shape
    fails loudly."""
    out = classify(recorded)
    assert out[C2S][0] == "tls-handshake" and "tls-encrypted" in out[C2S], out
    assert out[S2C][0] == "tls-handshake" and out[S2C].count("tls-encrypted") == 2, out
    return out


def _identity_positions(direction: str, index: int, msg: bytes) -> list[int]:
    """In the ClientHello: the identity's prefix, body and tag, and the binder at its end."""
    if (direction, index) != (C2S, 0):
        return []
    at = msg.find(b"hk1-ss.")
    assert at > 0
    return [at, at + 10, at + 40, len(msg) - 20]


def test_active_attacker_table_in_the_steady_state() -> None:
    setup = _setup()
    log = ErrorLog()
    logging.getLogger("hybridkex").addHandler(log)

    async def main() -> list[Outcome]:
        recorded = await _record(setup)
        replay = await _record(setup)
        cases = attack_cases(recorded, replay, _kinds(recorded), _identity_positions)
        sem = asyncio.Semaphore(CONCURRENCY)
        return list(await asyncio.gather(*(_run_case(setup, a, k, sem) for a, k in cases)))

    try:
        outcomes = asyncio.run(main())
    finally:
        logging.getLogger("hybridkex").removeHandler(log)

    check_outcomes(outcomes, log, lockout="the ticket's next steady-state connection failed (lockout)")
    print("mitm steady:", len(outcomes), "cases;", Counter(o.client.split(":")[0] for o in outcomes))


@pytest.fixture(autouse=True)
def _quiet_asyncio(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="asyncio")
