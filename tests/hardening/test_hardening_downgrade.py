"""Downgrade attempts by an active attacker, through the real asyncio server and client.

The attacker rewrites the Hello (or the Response) so that it still parses, lengths recomputed:
strips the QKD suites (leaving their no-QKD siblings), strips the stronger ML-KEM suite and its key
share, strips every ML-KEM share, or makes the Response claim the responder ran the no-QKD sibling
because its KME was down.  What happens (docs/security.md, "Downgrade"):

* QKD required on the server: the stripped Hello is refused at once (PolicyViolation; the client
  gets Abort "policy"); no key, no handler, no QKD key taken.
* QKD optional on both sides: the server would accept the sibling, but the Hello is in the
  authenticated transcript, so the client's check of the server's Finished fails
  (AuthenticationError): the modified handshake fails; a silent QKD-less session never results.
  (A genuine fallback, KME down, is reported in SessionInfo.qkd_note: test_hardening_kme_faults.)
* Stripping ML-KEM: decode/policy error or authentication failure, never a session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hardeninghelpers import C2S, S2C, Attack, AttackProxy
from iohelpers import make_setup

import hybridkex
from hybridkex.exceptions import AuthenticationError, HybridKEXError, PolicyViolation, RemoteProtocolError
from hybridkex.protocol import _wire as w
from hybridkex.suites import SUITES, suite_by_code


def _reframe(frame: bytes, body: bytes) -> bytes:
    return frame[:4] + len(body).to_bytes(4, "big") + body


def hello_rewrite(fn: Callable[[w.HelloMsg], w.HelloMsg]) -> Callable[[bytes], bytes]:
    return lambda frame: _reframe(frame, fn(w.HelloMsg.decode(frame[8:])).encode())


def strip_qkd(msg: w.HelloMsg) -> w.HelloMsg:
    """Only suites without QKD (siblings of the offered ones if none), no QKD parameters."""
    plain = [c for c in msg.suites if (s := suite_by_code(c)) is not None and not s.qkd]
    if not plain:
        plain = [s.without_qkd().code for c in msg.suites if (s := suite_by_code(c)) is not None]
    qkd = w.HelloQKD(w.QKDMaster.NONE, "", "", 0, w.QKDNote.KEY_SOURCE_UNAVAILABLE)
    return dataclasses.replace(msg, suites=tuple(dict.fromkeys(plain)), qkd=qkd)


def strip_mlkem1024(msg: w.HelloMsg) -> w.HelloMsg:
    code = w.KEM_CODES["ML-KEM-1024"]
    suites = tuple(c for c in msg.suites if (s := suite_by_code(c)) is not None and s.pq_kem != "ML-KEM-1024")
    return dataclasses.replace(msg, suites=suites, key_shares=tuple(k for k in msg.key_shares if k.kem_code != code))


def strip_all_mlkem(msg: w.HelloMsg) -> w.HelloMsg:
    """Keep one share but for an unknown KEM code (a Hello needs at least one)."""
    return dataclasses.replace(msg, key_shares=(w.KeyShare(0x7777, b"\x00" * 32),))


def response_claims_no_qkd(frame: bytes) -> bytes:
    """The Response says: sibling suite, no QKD, 'key source unavailable'."""
    msg = w.ResponseMsg.decode(frame[8:])
    sibling = suite_by_code(msg.suite)
    assert sibling is not None
    q = w.ResponseQKD(w.QKDUsage.NONE, w.QKDNote.KEY_SOURCE_UNAVAILABLE, "", "", ())
    return _reframe(frame, dataclasses.replace(msg, suite=sibling.without_qkd().code, qkd=q).encode())


async def _attempt(setup: Any, attack: Attack) -> tuple[BaseException | None, int, int, bool]:
    """(client error, handler runs for the attacked connection, QKD keys taken, legit client served)."""
    runs = [0]

    async def handler(reader: Any, writer: Any) -> None:
        runs[0] += 1
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await hybridkex.start_server(handler, "127.0.0.1", 0, setup.server, key_source=setup.server_keys)
    port = int(server.sockets[0].getsockname()[1])
    proxy = await AttackProxy(("127.0.0.1", port), attack).start()
    stock = setup.link.stock()
    error: BaseException | None = None
    try:
        try:
            _, writer = await hybridkex.open_connection("127.0.0.1", proxy.port, setup.client,
                                                        key_source=setup.client_keys)
            writer.close()
        except HybridKEXError as exc:
            error = exc
        for _ in range(100):
            if server.active_connections == 0:
                break
            await asyncio.sleep(0.05)
        attacked_runs, taken = runs[0], stock - setup.link.stock()
        reader, writer = await hybridkex.open_connection("127.0.0.1", port, setup.client,
                                                         key_source=setup.client_keys)
        writer.write(b"legit")
        ok = await reader.read(100) == b"legit" and writer.session.qkd_used == setup.server.handshake.policy.uses_qkd
        writer.close()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
    assert proxy.applied
    return error, attacked_runs, taken, ok


CASES = [
    # (name, qkd policy of both sides, suites, attack, expected client error, QKD keys the server may take)
    ("strip-qkd/required", "required", (), Attack(C2S, 0, "rewrite", rewrite=hello_rewrite(strip_qkd)),
     PolicyViolation, 0),
    ("strip-qkd/optional", "optional", (), Attack(C2S, 0, "rewrite", rewrite=hello_rewrite(strip_qkd)),
     AuthenticationError, 0),
    ("strip-mlkem1024/required", "required", ("x25519-mlkem1024-qkd-hkdfsha384", "x25519-mlkem768-qkd-hkdfsha256"),
     Attack(C2S, 0, "rewrite", rewrite=hello_rewrite(strip_mlkem1024)), AuthenticationError, 1),
    ("strip-all-mlkem/required", "required", (), Attack(C2S, 0, "rewrite", rewrite=hello_rewrite(strip_all_mlkem)),
     RemoteProtocolError, 0),
    ("response-claims-no-qkd/optional", "optional", (), Attack(S2C, 0, "rewrite", rewrite=response_claims_no_qkd),
     AuthenticationError, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_downgrade_fails_closed(case: tuple[Any, ...], caplog: pytest.LogCaptureFixture) -> None:
    name, qkd, suites, attack, expected, keys_taken = case
    caplog.set_level(logging.INFO, logger="hybridkex")
    setup = make_setup(qkd=qkd, suites=suites, server_timeout=5, client_timeout=5)
    assert all(s in SUITES for s in suites)
    error, runs, taken, legit_ok = asyncio.run(_attempt(setup, attack))
    assert isinstance(error, expected), (name, repr(error))
    assert runs == 0, "the server handler ran for a downgraded handshake"
    assert taken <= keys_taken, f"{taken} QKD keys taken for a downgraded Hello"
    assert legit_ok, "a legitimate client was not served afterwards"
    rejections = [r.getMessage() for r in caplog.records if "rejected connection" in r.getMessage()]
    assert rejections, "the server did not log the refused handshake"
    if qkd == "required" and "strip-qkd" in name:
        assert any("PolicyViolation" in m for m in rejections), rejections


def test_honest_optional_handshake_uses_qkd() -> None:
    """Without the attacker the optional policy does use QKD (the downgrade above is a real change)."""
    setup = make_setup(qkd="optional")

    async def main() -> Any:
        async def handler(reader: Any, writer: Any) -> None:
            writer.close()

        server = await hybridkex.start_server(handler, "127.0.0.1", 0, setup.server, key_source=setup.server_keys)
        try:
            _, writer = await hybridkex.open_connection("127.0.0.1", int(server.sockets[0].getsockname()[1]),
                                                        setup.client, key_source=setup.client_keys)
            info = writer.session.info
            writer.close()
            return info
        finally:
            server.close()
            await server.wait_closed()

    info = asyncio.run(main())
    assert info.qkd_used and info.suite == "x25519-mlkem768-qkd-hkdfsha256" and info.qkd_note is None
    assert "x25519-mlkem768-hkdfsha256" in info.offered_suites
