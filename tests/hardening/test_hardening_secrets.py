"""Secrets hygiene: a full session with everything switched on, then a search for every secret.

The session: the simulated KME pair over HTTPS with mutual TLS (master behind a KeyPool), the
hybrid handshake with PSK bootstrap then recycled authentication (rotations in a SQLite store), TLS
1.3, application data, exporters; a sans-IO run to reach the Session objects; failures (wrong PSK,
a replayed key ID at the KME, API misuse); and the CLI (`hybridkex kme` at debug level, `hybridkex
genpsk`, `hybridkex recycle list/audit`).  Logging is captured at DEBUG for every logger.

Secrets collected: the PSKs, every QKD key any KME delivered (recorded at the key sources), each
handshake's combined secret S and its TLS PSK, next authentication key and exporter outputs, the
TLS exporter / channel binding of each connection, every recycled key in both stores, and the
PSK written by genpsk.  Searched for (raw repr, hex lower/upper, base64 standard/URL-safe/unpadded,
and a 12-byte hex prefix) in: all log records (with tracebacks), repr() and str() of every public
object involved, exception texts, details and tracebacks, and the CLI output.  None may appear.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest
from hardeninghelpers import secret_forms

import hybridkex
from hybridkex import KeyBudget, Policy, QKDConfig, Timeouts
from hybridkex.api import ClientConfig, ServerConfig
from hybridkex.exceptions import HybridKEXError, LocalProtocolError
from hybridkex.io import run_initiator, run_responder
from hybridkex.protocol import InitiatorConfig, PSKAuthenticator, Responder, ResponderConfig
from hybridkex.qkd import ETSI014Client, KeyPool
from hybridkex.qkd.base import QKDKey
from hybridkex.qkd.kme import SimulatedKMEPair
from hybridkex.qkd.pki import DemoPKI
from hybridkex.recycle import RecycledAuthenticator, SQLiteAuthKeyStore

CLIENT_ID, SERVER_ID = "client.example", "server.example"
PSK = bytes.fromhex("5f" * 8) + bytes(range(200, 224))


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # includes the traceback of exc_info


class Recording:
    """A KeySource wrapper that remembers every QKD key it handed out (the secrets to look for)."""

    def __init__(self, inner: ETSI014Client, keys: list[bytes]) -> None:
        self.inner, self.keys = inner, keys

    @property
    def sae_id(self) -> str:
        return self.inner.sae_id

    @property
    def kme_id(self) -> str:
        return self.inner.kme_id

    def _note(self, got: list[QKDKey]) -> list[QKDKey]:
        self.keys.extend(k.key for k in got)
        return got

    def get_keys(self, *a: Any, **k: Any) -> list[QKDKey]:
        return self._note(self.inner.get_keys(*a, **k))

    def get_keys_by_id(self, *a: Any, **k: Any) -> list[QKDKey]:
        return self._note(self.inner.get_keys_by_id(*a, **k))

    def status(self, *a: Any, **k: Any) -> Any:
        return self.inner.status(*a, **k)

    def __repr__(self) -> str:
        return f"Recording({self.inner!r})"


def find_leaks(secrets: dict[str, bytes], haystack: str) -> list[str]:
    leaks = []
    for name, secret in secrets.items():
        forms = secret_forms(secret) | {"hex-prefix": secret[:12].hex().encode()}
        for form, needle in forms.items():
            if needle.decode("latin-1") in haystack:
                leaks.append(f"{name} as {form}")
    return leaks


def test_the_scanner_finds_a_leak() -> None:
    """The search can fail: each encoding of a planted secret is found."""
    import base64

    s = bytes(range(32))
    for text in (s.hex(), s.hex().upper(), base64.b64encode(s).decode(), repr(s), f"x{s[:12].hex()}y"):
        assert find_leaks({"planted": s}, f"log line {text} end"), text
    assert not find_leaks({"planted": s}, "nothing here " + bytes(range(1, 33)).hex())


def _texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), getattr(exc, "detail", ""), "".join(traceback.format_exception(exc))]


def test_no_secret_anywhere(tmp_path: Path) -> None:
    capture = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    secrets: dict[str, bytes] = {"psk": PSK}
    qkd_keys: list[bytes] = []
    texts: list[str] = []
    objects: list[Any] = []
    try:
        pki = DemoPKI.create(tmp_path / "pki")
        with SimulatedKMEPair.start(pki, rate_bps=10_000_000) as kmes:
            master_kme = Recording(kmes.key_source("sae-a"), qkd_keys)
            slave_kme = Recording(kmes.key_source("sae-b"), qkd_keys)
            pool = KeyPool(master_kme, ["sae-b"], low_watermark=2, high_watermark=4)
            pool.wait_ready(timeout=10)
            stores = {"client": SQLiteAuthKeyStore(tmp_path / "client.sqlite3"),
                      "server": SQLiteAuthKeyStore(tmp_path / "server.sqlite3")}
            policy = Policy(qkd="required", timeouts=Timeouts(handshake=10, kme=5), key_budget=KeyBudget())
            ini = InitiatorConfig(CLIENT_ID, (RecycledAuthenticator(stores["client"]),
                                              PSKAuthenticator({SERVER_ID: PSK})), policy,
                                  QKDConfig("sae-b", kmes.kme_id_b), peer_identity=SERVER_ID)
            res = ResponderConfig(SERVER_ID, (RecycledAuthenticator(stores["server"]),
                                              PSKAuthenticator({CLIENT_ID: PSK})), policy,
                                  QKDConfig("sae-a", kmes.kme_id_a))
            cc, sc = ClientConfig(ini), ServerConfig(res)
            objects += [kmes, kmes.store, kmes.store.stats(), master_kme.inner, slave_kme.inner, pool, pool.stats(),
                        policy, ini, res, cc, sc, *ini.authenticators, *res.authenticators, *stores.values()]

            # --- three connections: PSK bootstrap, then recycled authentication (rotations) ---------
            async def serve_and_connect() -> None:
                async def handler(reader: Any, writer: Any) -> None:
                    s = writer.session
                    secrets[f"server-exporter-{len(secrets)}"] = s.export_keying_material(b"EXPORTER-test", 32)
                    objects.extend([reader, writer, s, s.info, s.tls, s.summary(), s.as_dict()])
                    writer.write(await reader.read(100))
                    await writer.drain()
                    writer.close()

                server = await hybridkex.start_server(handler, "127.0.0.1", 0, sc, key_source=pool)
                port = int(server.sockets[0].getsockname()[1])
                objects.append(server)
                try:
                    for i in range(3):
                        reader, writer = await hybridkex.open_connection("127.0.0.1", port, cc,
                                                                         key_source=slave_kme)
                        s = writer.session
                        assert s.info.auth_mode == ("psk" if i == 0 else "recycled"), s.info.auth_mode
                        secrets[f"channel-binding-{i}"] = s.channel_binding()
                        secrets[f"client-exporter-{i}"] = s.export_keying_material(b"EXPORTER-test", 32)
                        writer.write(b"hello")
                        assert await reader.read(100) == b"hello"
                        objects.extend([reader, writer, s, s.info, s.tls, s.summary(), s.as_dict()])
                        await writer.aclose()
                    # A client with the wrong PSK and no recycled key: refused, logged.
                    bad = InitiatorConfig(CLIENT_ID, (PSKAuthenticator({SERVER_ID: b"w" * 32}),), policy,
                                          QKDConfig("sae-b", kmes.kme_id_b), peer_identity=SERVER_ID)
                    with pytest.raises(HybridKEXError) as info:
                        await hybridkex.open_connection("127.0.0.1", port, bad, key_source=slave_kme)
                    texts.extend(_texts(info.value))
                finally:
                    server.close()
                    await server.wait_closed()

            asyncio.run(serve_and_connect())

            # --- the sans-IO core over a socket pair: the Session objects and their secrets --------
            plain_ini = InitiatorConfig(CLIENT_ID, (PSKAuthenticator({SERVER_ID: PSK}),), policy,
                                        QKDConfig("sae-b", kmes.kme_id_b), peer_identity=SERVER_ID)
            plain_res = ResponderConfig(SERVER_ID, (PSKAuthenticator({CLIENT_ID: PSK}),), policy,
                                        QKDConfig("sae-a", kmes.kme_id_a))
            a, b = socket.socketpair()
            out: dict[str, Any] = {}
            t = threading.Thread(target=lambda: out.setdefault("res", run_responder(b, plain_res, master_kme)))
            t.start()
            out["ini"] = run_initiator(a, plain_ini, slave_kme)
            t.join(30)
            a.close()
            b.close()
            for side, session in out.items():
                secret = session.secret
                secrets[f"{side}-S"] = bytes(secret._secret)
                secrets[f"{side}-tls-psk"] = secret.tls_psk()
                secrets[f"{side}-next-auth"] = secret.next_auth_key()
                secrets[f"{side}-exporter"] = secret.exporter(b"app", 32)
                objects += [session, secret, session.info, session.info.summary() if hasattr(session.info, "summary")
                            else session.info]

            # --- failures: a replayed key ID at the KME, misuse of the core ---------------------------
            (key,) = master_kme.get_keys("sae-b", 1, 256)
            slave_kme.get_keys_by_id("sae-a", [key.key_id])
            objects.append(key)
            for call in (lambda: slave_kme.get_keys_by_id("sae-a", [key.key_id]),
                         lambda: Responder(plain_res).provide_qkd_keys([key])):
                with pytest.raises(HybridKEXError) as info:
                    call()
                texts.extend(_texts(info.value))
            assert isinstance(info.value, LocalProtocolError)

            for side, store in stores.items():
                peer = SERVER_ID if side == "client" else CLIENT_ID
                me = CLIENT_ID if side == "client" else SERVER_ID
                auth_keys = store.keys(me, peer, include_superseded=True)
                assert auth_keys, f"no recycled key in the {side} store"
                for k in auth_keys:
                    secrets[f"{side}-recycled-{k.key_id.hex()}"] = k.key
                objects += [*auth_keys, *store.summaries()]
            pool.close()
            for c in (master_kme.inner, slave_kme.inner):
                c.close()
            for store in stores.values():
                store.close()

        # --- the CLI ------------------------------------------------------------------------------
        cli: list[str] = []
        py = [sys.executable, "-m", "hybridkex"]
        for args in (["recycle", "--store", str(tmp_path / "server.sqlite3"), "list"],
                     ["recycle", "--store", str(tmp_path / "server.sqlite3"), "list", "--json"],
                     ["recycle", "--store", str(tmp_path / "client.sqlite3"), "audit", "--local", CLIENT_ID,
                      "--peer", SERVER_ID],
                     ["genpsk", str(tmp_path / "new.psk")]):
            proc = subprocess.run(py + args, capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0, (args, proc.stderr)
            cli += [proc.stdout, proc.stderr]
        psk_text = (tmp_path / "new.psk").read_bytes()
        secrets["genpsk"] = bytes.fromhex(psk_text.decode().strip()) if psk_text.strip().isalnum() else psk_text
        # `hybridkex kme` at debug level, serving real requests, then stopped.
        kme_log = tmp_path / "kme.log"
        with open(kme_log, "wb") as log:
            proc = subprocess.Popen([*py, "kme", "--pki", str(tmp_path / "pki"), "--log-level", "debug"],
                                    stdout=subprocess.PIPE, stderr=log)
            try:
                assert proc.stdout is not None
                urls = dict(proc.stdout.readline().decode().split() for _ in range(2))
                ca = ETSI014Client(urls["KME-A"], cert=pki.cert("sae-a"), key=pki.key("sae-a"), ca=pki.ca_cert)
                cb = ETSI014Client(urls["KME-B"], cert=pki.cert("sae-b"), key=pki.key("sae-b"), ca=pki.ca_cert)
                got = ca.get_keys("sae-b", 3, 256)
                cb.get_keys_by_id("sae-a", [k.key_id for k in got])
                with pytest.raises(HybridKEXError) as info:
                    cb.get_keys_by_id("sae-a", [got[0].key_id])
                texts.extend(_texts(info.value))
                qkd_keys.extend(k.key for k in got)
                ca.close()
                cb.close()
            finally:
                proc.terminate()
                cli.append(proc.communicate(timeout=30)[0].decode())
        cli.append(kme_log.read_text())
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)

    for i, k in enumerate(qkd_keys):
        secrets[f"qkd-{i}"] = k
    assert len(qkd_keys) >= 10 and len(capture.lines) > 10, (len(qkd_keys), len(capture.lines))
    reprs = [text for o in objects for text in (repr(o), str(o))]
    haystacks = {"logs": "\n".join(capture.lines), "reprs": "\n".join(reprs), "exceptions": "\n".join(texts),
                 "cli": "\n".join(cli)}
    leaks = {where: find_leaks(secrets, text) for where, text in haystacks.items()}
    print("secrets:", json.dumps({"secrets": len(secrets), "qkd_keys": len(qkd_keys),
                                  "log_lines": len(capture.lines), "objects": len(objects),
                                  "exception_texts": len(texts), "cli_chars": len(haystacks["cli"])}))
    assert not any(leaks.values()), leaks
