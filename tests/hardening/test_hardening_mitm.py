"""An active man in the middle on 127.0.0.1 against real hybridkex.start_server / open_connection.

The proxy (hardeninghelpers.AttackProxy) frames both directions into messages (hybrid frames "HK" ||
ver || type || u32 len, then TLS records) and, per case, drops, delays, reorders, duplicates,
replays (from an earlier session), truncates (with or without a recomputed length), injects before,
or flips one byte of one message.  The table covers every message of a real connection (the hybrid
exchange, the TLS handshake, application data both ways) times every action, with sampled byte
positions.  For every case:

* both ends fail closed: a typed HybridKEXError at the client (or, for attacks on application
  records, an error on read), never an untyped exception, never a hang of the setup;
* no key output: for attacks on the handshake (hybrid or TLS) the server's handler never runs for
  the attacked connection;
* no application data delivered that the peer did not send: what the handler receives is a prefix
  of what the client sent, and the client never reads bytes other than its echo;
* the server keeps serving: a legitimate client connecting right after gets its echo;
* no ERROR log line (an untyped exception) from hybridkex, and no QKD key ID in two sessions.

Only two outcomes count as success of the attacked connection: a delay within the deadlines, and a
flip of the legacy_record_version bytes of a plaintext TLS record (RFC 8446, 5.1: "MUST be ignored
for all purposes"; not part of any transcript).  Everything else must fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hardeninghelpers import C2S, S2C, Attack, AttackProxy, message_kind
from iohelpers import make_setup

import hybridkex
from hybridkex.exceptions import HybridKEXError

pytestmark = pytest.mark.exclusive  # timing-sensitive under load: runs alone (tests/conftest.py)

PAYLOAD_LEN = 3000
#: Deadlines of the attacked connections (a dropped message ends in a timeout, not a hang).
SETUP_TIMEOUT = 2.5
CONCURRENCY = 40
STATS: dict[str, Any] = {}


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


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _setup() -> Any:
    return make_setup(server_timeout=SETUP_TIMEOUT, client_timeout=SETUP_TIMEOUT, kme_timeout=2.0)


async def _echo_handler(rec: dict[str, Any], reader: Any, writer: Any) -> None:
    rec["runs"] += 1
    got = bytearray()
    try:
        while True:  # echo until the client's close_notify
            chunk = await reader.read(65536)
            if not chunk:
                break
            got += chunk
            writer.write(chunk)
            await writer.drain()
    except (HybridKEXError, ConnectionError) as exc:
        rec["errors"].append(type(exc).__name__)
    finally:
        rec["received"].append(bytes(got))
        writer.close()


async def _client(setup: Any, port: int, payload: bytes, *, app_timeout: float,
                  legit: bool = False) -> tuple[str, tuple[str, ...]]:
    """Connect, send ``payload``, read the echo.  Returns (outcome, QKD key IDs of the session).
    A ``legit`` client gets a generous setup deadline (it must not fail for a busy machine)."""
    config = dataclasses.replace(setup.client, timeout=30.0) if legit else setup.client
    try:
        async with asyncio.timeout(SETUP_TIMEOUT * 4 if not legit else 40):
            reader, writer = await hybridkex.open_connection("127.0.0.1", port, config,
                                                             key_source=setup.client_keys)
    except HybridKEXError as exc:
        return f"setup:{type(exc).__name__}", ()
    except TimeoutError:
        return "HANG-IN-SETUP", ()
    ids = writer.session.info.qkd_key_ids
    try:
        async with asyncio.timeout(app_timeout):
            writer.write(payload)
            writer.write_eof()  # close_notify: the server echoes, then closes with its own
            await writer.drain()
            got = await reader.readexactly(len(payload))
            if got != payload:
                return "WRONG-DATA", ids
            rest = await reader.read()
        return ("echo" if rest == b"" else "WRONG-DATA"), ids
    except HybridKEXError as exc:
        return f"app:{type(exc).__name__}", ids
    except asyncio.IncompleteReadError as exc:
        return ("app:eof" if payload.startswith(exc.partial) else "WRONG-DATA"), ids
    except (TimeoutError, ConnectionError) as exc:
        return f"app:{type(exc).__name__}", ids
    finally:
        writer.close()


async def _run_case(setup: Any, attack: Attack, kind: str, sem: asyncio.Semaphore) -> Outcome:
    async with sem:
        rec: dict[str, Any] = {"runs": 0, "received": [], "errors": []}
        server = await hybridkex.start_server(lambda r, w: _echo_handler(rec, r, w), "127.0.0.1", 0, setup.server,
                                              key_source=setup.server_keys)
        port = int(server.sockets[0].getsockname()[1])
        proxy = await AttackProxy(("127.0.0.1", port), attack).start()
        payload = os.urandom(PAYLOAD_LEN)
        out = Outcome(attack, kind, payload=payload)
        try:
            out.client, out.key_ids = await _client(setup, proxy.port, payload, app_timeout=SETUP_TIMEOUT * 2)
            await proxy.close()
            for _ in range(200):  # the attacked connection's server side settles (bounded)
                if server.active_connections == 0:
                    break
                await asyncio.sleep(0.05)
            out.attacked_handler_runs = rec["runs"]
            out.applied = proxy.applied
            legit = os.urandom(PAYLOAD_LEN)
            result, ids = await _client(setup, port, legit, app_timeout=10, legit=True)
            out.legit_ok = result == "echo"
            out.key_ids += ids
            out.received = [r for r in rec["received"] if r != legit]
        finally:
            await proxy.close()
            server.close()
            await server.wait_closed()
        return out


def _positions(msg: bytes) -> list[int]:
    header = [0, 2, 3, 4, 7] if msg[:2] == b"HK" else [0, 1, 2, 3, 4]
    body = [len(msg) // 2, len(msg) - 1] + ([8 if msg[:2] == b"HK" else 5] if len(msg) > 9 else [])
    return sorted({p for p in header + body if p < len(msg)})


def classify(recorded: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """Each message's role: a hybrid frame name, a TLS handshake record, or (after the sender's
    handshake) "app-data" (client) / "post-handshake" (server: ticket, application data, alerts).

    The client's TLS handshake ends with its Finished, its first encrypted record; the server's
    flight is EncryptedExtensions and Finished, its first two encrypted records (PSK: no
    certificate)."""
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
    return out


def _kinds(recorded: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """:func:`classify`, asserting a full connection's shape so that a change fails loudly instead
    of misclassifying."""
    out = classify(recorded)
    assert out[C2S][:5] == ["Hello", "Finished", "tls-handshake", "tls-ccs", "tls-encrypted"], out
    assert out[S2C][:6] == ["Response", "Finished", "tls-handshake", "tls-ccs", "tls-encrypted", "tls-encrypted"], out
    return out


def attack_cases(recorded: dict[str, list[bytes]], replay: dict[str, list[bytes]], kinds: dict[str, list[str]],
                 extra_positions: Callable[[str, int, bytes], list[int]] = lambda d, i, m: []
                 ) -> list[tuple[Attack, str]]:
    """Every message times every action (``extra_positions``: more bytes to flip in a message)."""
    cases: list[tuple[Attack, str]] = []
    for d in (C2S, S2C):
        msgs = recorded[d]
        for i, msg in enumerate(msgs):
            kind = kinds[d][i]
            actions = [Attack(d, i, "drop"), Attack(d, i, "duplicate"), Attack(d, i, "truncate"),
                       Attack(d, i, "truncate_fix"), Attack(d, i, "inject"),
                       Attack(d, i, "delay", delay=0.3)]
            if kind not in ("app-data", "post-handshake"):  # no deadline once the handshake is over
                actions.append(Attack(d, i, "delay", delay=SETUP_TIMEOUT + 1.0))
            if i + 1 < len(msgs):
                actions.append(Attack(d, i, "reorder"))
            if i < len(replay[d]):
                actions.append(Attack(d, i, "replay", replacement=replay[d][i]))
            positions = sorted({*_positions(msg), *extra_positions(d, i, msg)})
            actions += [Attack(d, i, "modify", position=p, xor=x)
                        for p in positions for x in ((0x01,) if p else (0x01, 0x80))]
            last = i == len(msgs) - 1
            cases += [(a, f"{kind}+last" if last else kind) for a in actions]
    return cases


def _cases(recorded: dict[str, list[bytes]], replay: dict[str, list[bytes]]) -> list[tuple[Attack, str]]:
    return attack_cases(recorded, replay, _kinds(recorded))


def _tolerated(attack: Attack, kind: str) -> bool:
    """Changes to bytes the protocol defines as meaningless (see the module docstring): a delay
    within the deadlines; TLS 1.3's middlebox-compatibility ChangeCipherSpec record, which is
    outside every transcript and "MUST simply be dropped" (RFC 8446, 5) whether missing, repeated,
    replayed (identical bytes) or moved; and legacy_record_version of plaintext records (5.1)."""
    if attack.action == "delay" and attack.delay < SETUP_TIMEOUT:
        return True
    if attack.action == "duplicate" and kind.endswith("+last"):
        return True  # a copy of the final close_notify arrives after the end: nothing reads it
    if kind == "tls-ccs" and attack.action in ("drop", "duplicate", "replay", "reorder"):
        return True
    return attack.action == "modify" and kind in ("tls-handshake", "tls-ccs") and attack.position in (1, 2)


async def _record(setup: Any) -> dict[str, list[bytes]]:
    rec: dict[str, Any] = {"runs": 0, "received": [], "errors": []}
    server = await hybridkex.start_server(lambda r, w: _echo_handler(rec, r, w), "127.0.0.1", 0, setup.server,
                                          key_source=setup.server_keys)
    proxy = await AttackProxy(("127.0.0.1", int(server.sockets[0].getsockname()[1]))).start()
    try:
        result, _ = await _client(setup, proxy.port, os.urandom(PAYLOAD_LEN), app_timeout=10, legit=True)
        assert result == "echo", result
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
    return proxy.record.messages


def check_outcomes(outcomes: list[Outcome], log: ErrorLog, *,
                   lockout: str = "a legitimate client was not served afterwards") -> None:
    """The table's checks (module docstring); ``lockout`` names a failed follow-up connection."""
    problems = []
    seen_ids: Counter[str] = Counter()
    for o in outcomes:
        seen_ids.update(o.key_ids)
        attack_label = o.attack.label
        if not o.applied:
            problems.append(f"{attack_label}: the proxy never saw the message")
        if not o.legit_ok:
            problems.append(f"{attack_label}: {lockout}")
        if "WRONG-DATA" in o.client or "HANG" in o.client or o.client == "NOT-STEADY":
            problems.append(f"{attack_label}: client outcome {o.client}")
        if any(not o.payload.startswith(r) for r in o.received):
            problems.append(f"{attack_label}: the server application received bytes the client never sent")
        if _tolerated(o.attack, o.kind):
            continue
        if o.client == "echo":
            problems.append(f"{attack_label} ({o.kind}): the attacked connection succeeded")
        # The handler may run once the server's handshake really completed: attacks on later records,
        # and a duplicate of the client's TLS Finished (the first, authentic copy completes it).
        completed = o.kind.startswith(("app-data", "post-handshake")) or (
            o.attack.action == "duplicate" and o.attack.direction == C2S and o.kind == "tls-encrypted")
        if not completed and o.attacked_handler_runs:
            problems.append(f"{attack_label} ({o.kind}): the server handler ran for an attacked handshake")
    assert not [k for k, n in seen_ids.items() if n > 1], "a QKD key ID was used in two sessions"
    assert not [r.getMessage() for r in log.records], [r.getMessage() for r in log.records][:5]
    assert not problems, "\n".join(problems)


def test_active_attacker_table() -> None:
    setup = _setup()
    log = ErrorLog()
    logging.getLogger("hybridkex").addHandler(log)

    async def main() -> list[Outcome]:
        recorded = await _record(setup)
        replay = await _record(setup)
        cases = _cases(recorded, replay)
        STATS["messages"] = _kinds(recorded)
        sem = asyncio.Semaphore(CONCURRENCY)
        return list(await asyncio.gather(*(_run_case(setup, a, k, sem) for a, k in cases)))

    try:
        outcomes = asyncio.run(main())
    finally:
        logging.getLogger("hybridkex").removeHandler(log)

    check_outcomes(outcomes, log)
    STATS["cases"] = len(outcomes)
    STATS["client_outcomes"] = Counter(o.client.split(":")[0] + ":" + o.client.split(":")[-1] for o in outcomes)
    STATS["tolerated_succeeded"] = sorted(o.attack.label for o in outcomes if o.client == "echo")
    print("mitm:", STATS)


@pytest.fixture(autouse=True)
def _quiet_asyncio(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="asyncio")
