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
from dataclasses import dataclass, field
from typing import Any

import pytest
from hardeninghelpers import C2S, S2C, Attack, AttackProxy, message_kind
from iohelpers import make_setup
from test_hardening_mitm import CONCURRENCY, PAYLOAD_LEN, SETUP_TIMEOUT, ErrorLog, _echo_handler, _positions, _tolerated

import hybridkex
from hybridkex.exceptions import HybridKEXError
from hybridkex.steady import SteadyTicket


@dataclass
class Outcome:
    attack: Attack
    kind: str
    client: str = ""
    attacked_handler_runs: int = 0
    received: list[bytes] = field(default_factory=list)
    payload: bytes = b""
    legit_ok: bool = False
    key_ids: tuple[str, ...] = ()
    applied: bool = False


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
    out: dict[str, list[str]] = {}
    for d, handshake_encrypted in ((C2S, 1), (S2C, 2)):
        kinds, seen = [], 0
        for msg in recorded[d]:
            kind = message_kind(msg)
            if kind == "tls-encrypted":
                seen += 1
                if seen > handshake_encrypted:
                    kind = "app-data" if d == C2S else "post-handshake"
            kinds.append(kind)
        out[d] = kinds
    assert out[C2S][0] == "tls-handshake" and "tls-encrypted" in out[C2S], out
    assert out[S2C][0] == "tls-handshake" and out[S2C].count("tls-encrypted") == 2, out
    return out


def _cases(recorded: dict[str, list[bytes]], replay: dict[str, list[bytes]]) -> list[tuple[Attack, str]]:
    cases: list[tuple[Attack, str]] = []
    kinds = _kinds(recorded)
    for d in (C2S, S2C):
        msgs = recorded[d]
        for i, msg in enumerate(msgs):
            kind = kinds[d][i]
            actions = [Attack(d, i, "drop"), Attack(d, i, "duplicate"), Attack(d, i, "truncate"),
                       Attack(d, i, "truncate_fix"), Attack(d, i, "inject"), Attack(d, i, "delay", delay=0.3)]
            if kind not in ("app-data", "post-handshake"):
                actions.append(Attack(d, i, "delay", delay=SETUP_TIMEOUT + 1.0))
            if i + 1 < len(msgs):
                actions.append(Attack(d, i, "reorder"))
            if i < len(replay[d]):
                actions.append(Attack(d, i, "replay", replacement=replay[d][i]))
            positions = _positions(msg)
            if i == 0 and d == C2S:  # the identity, its tag and the binder, inside the ClientHello
                at = msg.find(b"hk1-ss.")
                assert at > 0
                positions = sorted({*positions, at, at + 10, at + 40, len(msg) - 20})
            actions += [Attack(d, i, "modify", position=p, xor=x) for p in positions
                        for x in ((0x01,) if p else (0x01, 0x80))]
            last = i == len(msgs) - 1
            cases += [(a, f"{kind}+last" if last else kind) for a in actions]
    return cases


def test_active_attacker_table_in_the_steady_state() -> None:
    setup = _setup()
    log = ErrorLog()
    logging.getLogger("hybridkex").addHandler(log)

    async def main() -> list[Outcome]:
        recorded = await _record(setup)
        replay = await _record(setup)
        cases = _cases(recorded, replay)
        sem = asyncio.Semaphore(CONCURRENCY)
        return list(await asyncio.gather(*(_run_case(setup, a, k, sem) for a, k in cases)))

    try:
        outcomes = asyncio.run(main())
    finally:
        logging.getLogger("hybridkex").removeHandler(log)

    problems = []
    seen_ids: Counter[str] = Counter()
    for o in outcomes:
        seen_ids.update(o.key_ids)
        label = o.attack.label
        if not o.applied:
            problems.append(f"{label}: the proxy never saw the message")
        if not o.legit_ok:
            problems.append(f"{label}: the ticket's next steady-state connection failed (lockout)")
        if "WRONG-DATA" in o.client or "HANG" in o.client or o.client == "NOT-STEADY":
            problems.append(f"{label}: client outcome {o.client}")
        if any(not o.payload.startswith(r) for r in o.received):
            problems.append(f"{label}: the server application received bytes the client never sent")
        if _tolerated(o.attack, o.kind):
            continue
        if o.client == "echo":
            problems.append(f"{label} ({o.kind}): the attacked connection succeeded")
        completed = o.kind.startswith(("app-data", "post-handshake")) or (
            o.attack.action == "duplicate" and o.attack.direction == C2S and o.kind == "tls-encrypted")
        if not completed and o.attacked_handler_runs:
            problems.append(f"{label} ({o.kind}): the server handler ran for an attacked handshake")
    assert not [k for k, n in seen_ids.items() if n > 1], "a QKD key ID was used in two sessions"
    assert not [r.getMessage() for r in log.records], [r.getMessage() for r in log.records][:5]
    assert not problems, "\n".join(problems)
    print("mitm steady:", len(outcomes), "cases;", Counter(o.client.split(":")[0] for o in outcomes))


@pytest.fixture(autouse=True)
def _quiet_asyncio(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="asyncio")
