"""KME faults during real handshakes: the simulated ETSI GS QKD 014 KME pair over mutual TLS, and a
faulty KME (an aiohttp server with the KME's certificate, tests/qkd's ThreadedServer) that is down,
slow beyond the policy's KME deadline, answers 500, malformed bodies, or (as the slave's KME)
delivers other bytes under the right key ID.

Roles: the server is the ETSI master (SAE sae-a, KME A), the client the slave (sae-b, KME B).

* required: the handshake fails with a clear typed error (the client gets KeyUnavailableError, the
  server logs why); the server's handler never runs;
* optional: the no-QKD sibling suite runs and both SessionInfos say so (qkd_used False, qkd_note);
* key mismatch (same key ID, other bytes at the slave): KeyMismatchError at the client, key
  confirmation failure (AuthenticationError) at the server, whatever the policy;
* after every fault the same server serves a legitimate client with QKD;
* no QKD key ID is ever in two sessions, and the KME delivers a key ID once (a second dec_keys of
  the mismatched ID is refused).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from qkdhelpers import ThreadedServer, free_port, sae_args

import hybridkex
from hybridkex import KeyBudget, Policy, QKDConfig, Timeouts
from hybridkex.api import ClientConfig, ServerConfig
from hybridkex.exceptions import (
    HybridKEXError,
    KeyMismatchError,
    KeyUnavailableError,
)
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, ResponderConfig
from hybridkex.qkd import ETSI014Client, KMEKeyNotFoundError
from hybridkex.qkd.kme import SimulatedKMEPair, server_ssl_context
from hybridkex.qkd.pki import DemoPKI

CLIENT_ID, SERVER_ID = "client.example", "server.example"
PSK = bytes(range(100, 132))
KME_DEADLINE = 1.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return DemoPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def kmes(pki: DemoPKI) -> Iterator[SimulatedKMEPair]:
    with SimulatedKMEPair.start(pki, rate_bps=50_000_000, capacity_bits=1 << 22) as pair:
        yield pair


class FaultyKME:
    """A KME stand-in: ``mode`` says how it answers; "proxy" forwards to the real KME (``real``)."""

    def __init__(self, real: ETSI014Client) -> None:
        self.real = real
        self.mode = "proxy"
        self.requests = 0
        self.key_ids_seen: list[str] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            body = json.loads(await request.read() or b"{}")
            parts = request.path.rstrip("/").split("/")
            sae, endpoint = parts[-2], parts[-1]
            mode = self.mode
            if mode == "slow":
                await asyncio.sleep(KME_DEADLINE * 3)
            if mode == "500":
                return web.json_response({"message": "internal"}, status=500)
            if mode.startswith("malformed"):
                return _malformed(mode)
            loop = asyncio.get_running_loop()
            if endpoint == "enc_keys":
                keys = await loop.run_in_executor(None, self.real.get_keys, sae, body.get("number", 1),
                                                  body.get("size", 256))
            elif endpoint == "dec_keys":
                ids = [k["key_ID"] for k in body["key_IDs"]]
                keys = await loop.run_in_executor(None, self.real.get_keys_by_id, sae, ids)
            else:
                return web.json_response({"message": "Bad request format."}, status=400)
            self.key_ids_seen += [k.key_id for k in keys]
            flip = 0x01 if mode == "mismatch" else 0x00
            return web.json_response({"keys": [
                {"key_ID": k.key_id, "key": base64.b64encode(bytes(b ^ flip for b in k.key)).decode()} for k in keys]})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def _malformed(mode: str) -> web.Response:
    kid = "3b1f0a2e-5c4d-4e6f-8a9b-0c1d2e3f4a5b"
    bodies = {
        "malformed-json": (b"{\"keys\": [", "application/json"),
        "malformed-type": (b"<html>503</html>", "text/html"),
        "malformed-size": (json.dumps({"keys": [{"key_ID": kid, "key": base64.b64encode(b"k" * 16).decode()}]})
                           .encode(), "application/json"),
        "malformed-base64": (json.dumps({"keys": [{"key_ID": kid, "key": "!!!"}]}).encode(), "application/json"),
        "malformed-uuid": (json.dumps({"keys": [{"key_ID": "not-a-uuid", "key": base64.b64encode(b"k" * 32)
                                                 .decode()}]}).encode(), "application/json"),
        "malformed-count": (json.dumps({"keys": []}).encode(), "application/json"),
        "malformed-duplicate": (b'{"keys": [], "keys": []}', "application/json"),
    }
    raw, ctype = bodies[mode]
    return web.Response(body=raw, content_type=ctype.split(";")[0])


def _configs(kmes: SimulatedKMEPair, qkd: str) -> tuple[ClientConfig, ServerConfig]:
    policy = Policy(qkd=qkd, timeouts=Timeouts(handshake=8.0, kme=KME_DEADLINE), key_budget=KeyBudget())  # type: ignore[arg-type]
    ini = InitiatorConfig(CLIENT_ID, (PSKAuthenticator({SERVER_ID: PSK}),), policy,
                          QKDConfig("sae-b", kmes.kme_id_b), peer_identity=SERVER_ID)
    res = ResponderConfig(SERVER_ID, (PSKAuthenticator({CLIENT_ID: PSK}),), policy, QKDConfig("sae-a", kmes.kme_id_a))
    return ClientConfig(ini, timeout=8.0), ServerConfig(res, timeout=8.0)


def _client_for(url: str, pki: DemoPKI, sae: str, kme_id: str) -> ETSI014Client:
    return ETSI014Client(url, **sae_args(pki, sae), sae_id=sae, kme_id=kme_id, timeout=10, retries=1,
                         backoff=0.01, max_backoff=0.05)


async def _connect(cc: ClientConfig, port: int, source: Any) -> tuple[Any, BaseException | None]:
    try:
        reader, writer = await hybridkex.open_connection("127.0.0.1", port, cc, key_source=source)
    except HybridKEXError as exc:
        return None, exc
    writer.write(b"ping")
    assert await reader.read(4) == b"ping"
    info = writer.session.info
    writer.close()
    return info, None


async def _scenario(kmes: SimulatedKMEPair, qkd: str, server_source: Any, client_source: Any, *,
                    before: Any = None, after: Any = None) -> dict[str, Any]:
    """One faulty handshake, then (after ``after()``) a legitimate one on the same server."""
    cc, sc = _configs(kmes, qkd)
    runs: list[Any] = []

    async def handler(reader: Any, writer: Any) -> None:
        runs.append(writer.session.info)
        writer.write(await reader.read(4))
        await writer.drain()
        writer.close()

    server = await hybridkex.start_server(handler, "127.0.0.1", 0, sc, key_source=server_source)
    port = int(server.sockets[0].getsockname()[1])
    try:
        if before:
            before()
        faulty_info, error = await _connect(cc, port, client_source)
        for _ in range(100):
            if server.active_connections == 0:
                break
            await asyncio.sleep(0.05)
        faulty_runs = list(runs)
        if after:
            after()
        legit_info, legit_error = await _connect(cc, port, client_source)
    finally:
        server.close()
        await server.wait_closed()
    return {"info": faulty_info, "error": error, "server_sessions": faulty_runs, "legit": legit_info,
            "legit_error": legit_error}


SERVER_FAULTS = ["down", "slow", "500", "malformed-json", "malformed-type", "malformed-size", "malformed-base64",
                 "malformed-uuid", "malformed-count", "malformed-duplicate"]
#: QKD key IDs of every session these tests established (in this process), to check none is used twice.
KEY_IDS: set[str] = set()


def _record_unique(key_ids: tuple[str, ...]) -> None:
    """No QKD key ID serves two sessions, across the whole fault matrix (whatever order it runs in)."""
    assert key_ids, "the session used no QKD key"
    reused = KEY_IDS & set(key_ids)
    assert not reused, f"QKD key ID(s) {sorted(reused)} used in two sessions"
    KEY_IDS.update(key_ids)


@pytest.mark.parametrize("qkd", ["required", "optional"])
@pytest.mark.parametrize("fault", SERVER_FAULTS)
def test_master_kme_fault(fault: str, qkd: str, kmes: SimulatedKMEPair, pki: DemoPKI,
                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hybridkex")
    faulty = FaultyKME(kmes.key_source("sae-a"))
    ctx = server_ssl_context(pki.cert("kme-a"), pki.key("kme-a"), pki.ca_cert)
    slave = kmes.key_source("sae-b")
    with ThreadedServer(faulty.app, ctx) as srv:
        url = f"https://127.0.0.1:{free_port()}" if fault == "down" else srv.url
        master = _client_for(url, pki, "sae-a", kmes.kme_id_a)
        proxied = _client_for(srv.url, pki, "sae-a", kmes.kme_id_a)
        sources = {"master": master}

        def set_fault() -> None:
            faulty.mode = fault

        def heal() -> None:
            faulty.mode = "proxy"
            sources["master"] = proxied

        class Switch:  # the server's key source: the faulty one, then the healed one
            sae_id, kme_id = "sae-a", kmes.kme_id_a

            def get_keys(self, *a: Any, **k: Any) -> Any:
                return sources["master"].get_keys(*a, **k)

            def get_keys_by_id(self, *a: Any, **k: Any) -> Any:
                return sources["master"].get_keys_by_id(*a, **k)

            def status(self, *a: Any, **k: Any) -> Any:
                return sources["master"].status(*a, **k)

        result = asyncio.run(_scenario(kmes, qkd, Switch(), slave, before=set_fault, after=heal))
        for c in (master, proxied, slave):
            c.close()
    assert result["legit_error"] is None and result["legit"].qkd_used, "the server did not recover"
    _record_unique(result["legit"].qkd_key_ids)
    rejected = [r.getMessage() for r in caplog.records if "rejected connection" in r.getMessage()]
    if qkd == "required":
        assert isinstance(result["error"], KeyUnavailableError), repr(result["error"])
        assert "QKD" in str(result["error"])
        assert result["server_sessions"] == [], "the handler ran without QKD under a required policy"
        assert any("KeyUnavailableError" in m and "QKD keys are unavailable" in m for m in rejected), rejected
    else:
        info, srv = result["info"], result["server_sessions"]
        assert result["error"] is None, repr(result["error"])
        assert not info.qkd_used and info.suite == "x25519-mlkem768-hkdfsha256", info.summary()
        assert info.qkd_note and "unavailable" in info.qkd_note
        assert len(srv) == 1 and not srv[0].qkd_used and "unavailable" in (srv[0].qkd_note or "")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an untyped error was logged"


def test_master_kme_503_exhaustion(pki: DemoPKI, caplog: pytest.LogCaptureFixture) -> None:
    """The real simulated KME with room for one key and a negligible refill rate: the first
    handshake takes the key, the next ones get 503 (KMEUnavailableError): required fails,
    optional runs the sibling suite."""
    caplog.set_level(logging.INFO, logger="hybridkex")
    with SimulatedKMEPair.start(pki, rate_bps=0.001, capacity_bits=256) as pair:
        outcomes = {}
        for qkd in ("required", "optional"):
            master = _client_for(pair.url_a, pki, "sae-a", pair.kme_id_a)
            slave = _client_for(pair.url_b, pki, "sae-b", pair.kme_id_b)
            outcomes[qkd] = asyncio.run(_scenario(pair, qkd, master, slave))
            master.close()
            slave.close()
        stats = pair.store.stats()
    req, opt = outcomes["required"], outcomes["optional"]
    assert req["error"] is None and req["info"].qkd_used  # the one key there was
    assert isinstance(req["legit_error"], KeyUnavailableError), repr(req["legit_error"])
    assert opt["error"] is None and not opt["info"].qkd_used and "unavailable" in opt["info"].qkd_note
    assert opt["legit_error"] is None and not opt["legit"].qkd_used
    assert stats.keys_issued == 1 and stats.keys_delivered == 1, stats
    assert any("KMEUnavailableError" in r.getMessage() or "503" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("qkd", ["required", "optional"])
def test_key_mismatch_between_sites(qkd: str, kmes: SimulatedKMEPair, pki: DemoPKI,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """KME B hands the slave other bytes under the right key ID: key confirmation catches it."""
    caplog.set_level(logging.INFO, logger="hybridkex")
    faulty = FaultyKME(kmes.key_source("sae-b"))
    ctx = server_ssl_context(pki.cert("kme-b"), pki.key("kme-b"), pki.ca_cert)
    master = kmes.key_source("sae-a")
    with ThreadedServer(faulty.app, ctx) as srv:
        slave = _client_for(srv.url, pki, "sae-b", kmes.kme_id_b)

        def mismatch() -> None:
            faulty.mode = "mismatch"

        def heal() -> None:
            faulty.mode = "proxy"

        result = asyncio.run(_scenario(kmes, qkd, master, slave, before=mismatch, after=heal))
        slave.close()
    assert isinstance(result["error"], KeyMismatchError), repr(result["error"])
    assert result["server_sessions"] == []
    assert any("AuthenticationError" in r.getMessage() for r in caplog.records), "server did not log the failure"
    assert result["legit_error"] is None and result["legit"].qkd_used
    mismatched = faulty.key_ids_seen[0]
    assert mismatched not in result["legit"].qkd_key_ids
    _record_unique(result["legit"].qkd_key_ids)
    # The KME delivered the mismatched key ID once; asking again is refused, so it can never be reused.
    direct = kmes.key_source("sae-b")
    with pytest.raises(KMEKeyNotFoundError):
        direct.get_keys_by_id("sae-a", [mismatched])
    direct.close()
    master.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_slave_kme_down_fails_even_when_optional(kmes: SimulatedKMEPair, pki: DemoPKI) -> None:
    """The master already took the keys, so the slave cannot fall back: a clear failure, and the
    key taken is never used by another handshake."""
    master = kmes.key_source("sae-a")
    dead = _client_for(f"https://127.0.0.1:{free_port()}", pki, "sae-b", kmes.kme_id_b)
    slave = kmes.key_source("sae-b")
    sources = {"s": dead}

    class Switch:
        sae_id, kme_id = "sae-b", kmes.kme_id_b

        def get_keys(self, *a: Any, **k: Any) -> Any:
            return sources["s"].get_keys(*a, **k)

        def get_keys_by_id(self, *a: Any, **k: Any) -> Any:
            return sources["s"].get_keys_by_id(*a, **k)

        def status(self, *a: Any, **k: Any) -> Any:
            return sources["s"].status(*a, **k)

    result = asyncio.run(_scenario(kmes, "optional", master, Switch(),
                                   after=lambda: sources.__setitem__("s", slave)))
    for c in (master, dead, slave):
        c.close()
    assert isinstance(result["error"], KeyUnavailableError) and "cannot go on" in str(result["error"])
    assert result["server_sessions"] == []
    assert result["legit_error"] is None and result["legit"].qkd_used
    _record_unique(result["legit"].qkd_key_ids)


def test_pki_dir_is_private(pki: DemoPKI) -> None:
    """The demo PKI keys the faulty KMEs use are private files (sanity of the fixture)."""
    assert (Path(pki.key("kme-a")).stat().st_mode & 0o077) == 0
