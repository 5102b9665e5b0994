"""Tunnel building blocks in-process: log redaction, rate limits, relay, seam (metrics: test_tunnel_metrics.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import struct
import warnings
from pathlib import Path

import pytest
from tunnelhelpers import parse_prometheus

from hybridkex.exceptions import (
    AuthenticationError,
    ConfigurationError,
    HandshakeTimeout,
    KeyMismatchError,
    KeyUnavailableError,
    KMEError,
    PolicyViolation,
    RemoteProtocolError,
    TLSError,
)
from hybridkex.tunnel.channel import PlainStream, SecureStream
from hybridkex.tunnel.config import Overrides, TunnelConfig, load_config
from hybridkex.tunnel.limits import HandshakeRateLimiter, LogThrottle, rate_key
from hybridkex.tunnel.logs import REDACTED, ConnectionLog, configure_logging, safe_fields
from hybridkex.tunnel.metrics import TunnelMetrics
from hybridkex.tunnel.relay import relay
from hybridkex.tunnel.runtime import handshake_outcome
from hybridkex.tunnel.server import TunnelServer

SECRET = bytes.fromhex("5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2")


# --- logs -------------------------------------------------------------------------------------------


def test_safe_fields_keep_facts_and_redact_secrets() -> None:
    facts = {
        "suite": "x25519-mlkem768-qkd-hkdfsha256",
        "components": ["x25519", "ml-kem-768", "qkd"],
        "qkd_key_ids": ["0b9a3b5e-1c1e-4c67-9a53-7e1b8c3f1a00"],
        "key_budget": "fresh",
        "auth": "psk",
        "psk": "hex-of-a-psk",
        "tls_psk": SECRET,
        "exporter": SECRET,
        "private_key": "x",
        "nested": {"secret": "x", "ok": 1},
        "object": object(),
    }
    out = safe_fields(facts)
    assert out["suite"] == facts["suite"] and out["components"] == facts["components"]
    assert out["qkd_key_ids"] == facts["qkd_key_ids"] and out["key_budget"] == "fresh"
    for name in ("psk", "tls_psk", "exporter", "private_key"):
        assert out[name] == REDACTED
    assert out["nested"] == {"secret": REDACTED, "ok": 1}
    assert out["object"] == "<object>"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_library_records_and_warnings_use_the_tunnel_format(fmt: str) -> None:
    stream = io.StringIO()
    configure_logging(fmt, "info", stream=stream)
    try:
        logging.getLogger("hybridkex.qkd.pool").warning("key pool: fetch for slave %s failed; retrying", "sae-z")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("asyncio").error("task failed", exc_info=True)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("KME outside the secure site", UserWarning, stacklevel=1)
    finally:
        configure_logging("text", "info")
        logging.captureWarnings(False)  # pytest restores warnings.showwarning after each test
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines  # one line per record, the traceback included
    if fmt == "json":
        docs = [json.loads(line) for line in lines]
        assert [(d["level"], d["event"], d["logger"]) for d in docs] == [
            ("warning", "log", "hybridkex.qkd.pool"), ("error", "log", "asyncio"), ("warning", "log", "py.warnings")]
        assert docs[0]["msg"] == "key pool: fetch for slave sae-z failed; retrying" and "ts" in docs[0]
        assert "RuntimeError: boom" in docs[1]["traceback"]
        assert "KME outside the secure site" in docs[2]["msg"]
    else:
        assert lines[0].split(" ", 3)[1:3] == ["warning", "log"] and "logger=hybridkex.qkd.pool" in lines[0]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_connection_log_lines_never_carry_key_bytes(fmt: str) -> None:
    stream = io.StringIO()
    configure_logging(fmt, "debug", stream=stream)
    try:
        ConnectionLog("c0ffee", "127.0.0.1:5").log(20, "handshake_ok", "handshake complete",
                                                   session={"suite": "s", "key": SECRET, "material": SECRET.hex()})
    finally:
        configure_logging("text", "info")  # back to stderr for anything else in this process
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert SECRET.hex() not in line and repr(SECRET) not in line
    if fmt == "json":
        doc = json.loads(line)
        assert doc["event"] == "handshake_ok" and doc["conn"] == "c0ffee" and doc["peer_addr"] == "127.0.0.1:5"
        assert doc["session"] == {"suite": "s", "key": REDACTED, "material": REDACTED}
    else:
        assert ' info handshake_ok "handshake complete" conn=c0ffee peer_addr=127.0.0.1:5 session=' in line


# --- limits -----------------------------------------------------------------------------------------


def test_token_bucket_per_address() -> None:
    now = [0.0]
    lim = HandshakeRateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [lim.allow("a") for _ in range(4)] == [True, True, True, False]
    assert lim.allow("b")  # another address has its own bucket
    now[0] += 0.5  # one token back at 2/s
    assert lim.allow("a") and not lim.allow("a")
    now[0] += 100
    assert [lim.allow("a") for _ in range(4)] == [True, True, True, False]  # capped at the burst
    lim.configure(0, 3)
    assert all(lim.allow("a") for _ in range(100))  # 0 disables


def test_peek_charge_and_refund() -> None:
    now = [0.0]
    lim = HandshakeRateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    assert lim.peek("p") and lim.peek("p")  # peeking takes nothing
    lim.charge("p")
    lim.charge("p")
    assert not lim.peek("p")
    lim.charge("p")  # concurrent handshakes overshoot: the bucket goes into debt ...
    now[0] += 1.5
    assert not lim.peek("p")  # ... and pays it back at the rate
    now[0] += 0.5
    assert lim.peek("p")
    assert lim.allow("a") and lim.allow("a") and not lim.allow("a")
    lim.refund("a")  # an authenticated handshake gives its address token back
    assert lim.allow("a") and not lim.allow("a")
    lim.refund("never-seen")
    assert len(lim) == 2  # a refund creates no bucket


def test_rate_key_groups_ipv6_by_64() -> None:
    assert rate_key("192.0.2.7") == "192.0.2.7"
    assert rate_key("2001:db8:1:2:aaaa::1") == rate_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert rate_key("2001:db8:1:3::1") != rate_key("2001:db8:1:2::1")
    assert rate_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert rate_key("unknown") == "unknown"


def test_token_bucket_memory_is_bounded() -> None:
    now = [0.0]
    lim = HandshakeRateLimiter(rate=1.0, burst=1, clock=lambda: now[0], max_tracked=100)
    for i in range(1000):
        lim.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(lim) <= 100


def test_log_throttle() -> None:
    now = [0.0]
    t = LogThrottle(1.0, clock=lambda: now[0])
    assert t.check("x") == 0
    assert t.check("x") is None and t.check("x") is None
    now[0] = 1.5
    assert t.check("x") == 2


@pytest.mark.parametrize(("exc", "outcome"), [
    (TimeoutError(), "timeout"),
    (HandshakeTimeout("KME"), "timeout"),
    (AuthenticationError("unknown identity"), "auth_failed"),
    (KeyMismatchError("confirm"), "auth_failed"),
    (RemoteProtocolError("bad"), "protocol_error"),
    (PolicyViolation("no qkd", ("qkd",)), "policy_violation"),
    (KeyUnavailableError("empty"), "key_source_error"),
    (KMEError("503", status=503), "key_source_error"),
    (TLSError("alert"), "tls_error"),
    (ConfigurationError("x"), "failed"),
    (ConnectionResetError(), "io_error"),
    (asyncio.IncompleteReadError(b"", 5), "io_error"),
    (RuntimeError("bug"), "internal_error"),
])
def test_handshake_outcome_labels(exc: BaseException, outcome: str) -> None:
    assert handshake_outcome(exc) == outcome


# --- relay ------------------------------------------------------------------------------------------


def test_relay_reports_a_reset_and_closes_both_sides() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        srv = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        raw_a = socket.create_connection(("127.0.0.1", port))
        raw_b = socket.create_connection(("127.0.0.1", port))
        a, b = await accepted.get(), await accepted.get()
        task = asyncio.create_task(relay(PlainStream(*a), PlainStream(*b), idle_timeout=None))
        raw_a.sendall(b"hello")
        raw_b.setblocking(False)
        got = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(raw_b, 100), 10)
        assert got == b"hello"
        raw_b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw_b.close()  # abortive close: RST
        raw_a.sendall(b"more")
        result = await asyncio.wait_for(task, 10)
        assert result.outcome == "reset" and result.bytes_in >= 5
        raw_a.settimeout(10)
        assert raw_a.recv(10) == b""  # the relay closed the other side too
        raw_a.close()
        srv.close()
        await srv.wait_closed()

    asyncio.run(main())


# --- the seam: a custom factory in the in-process runtime -------------------------------------------


class _SeamFactory:
    """A stand-in factory: accepts identities from the config, fails the way a real one could."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.closed = False

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     peer_addr: str) -> SecureStream:
        line = (await reader.readline()).strip().decode()
        if line == "nokey":
            raise KeyUnavailableError("pool empty")
        if line not in self.config.peer_identities:
            raise AuthenticationError(f"unknown identity {line!r}")
        return PlainStream(reader, writer, {"peer_identity": line, "psk": SECRET})

    async def connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> SecureStream:
        raise NotImplementedError

    async def reconfigure(self, config: TunnelConfig) -> None:
        if "evil" in config.peer_identities:
            raise ConfigurationError("peer evil is not allowed", field="peers")
        self.config = config

    async def aclose(self) -> None:
        self.closed = True


def test_runtime_with_a_custom_factory(tmp_path: Path) -> None:
    psk = tmp_path / "k.psk"
    psk.write_bytes(os.urandom(32))
    psk.chmod(0o600)

    def conf(*peers: str) -> Path:
        path = tmp_path / "t.toml"
        text = ('listen = "127.0.0.1:0"\ntarget = "127.0.0.1:1"\nidentity = "s"\n'
                '[policy]\nqkd = "disabled"\n[logging]\nformat = "json"\n')
        for p in peers:
            text += f'[[peers]]\nidentity = "{p}"\nmode = "psk"\npsk_file = "{psk}"\n'
        path.write_text(text)
        return path

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    factories: list[_SeamFactory] = []

    async def provider(config: TunnelConfig, metrics: TunnelMetrics) -> _SeamFactory:
        factories.append(_SeamFactory(config))
        return factories[-1]

    async def main() -> None:
        path = conf("alice")
        runtime = TunnelServer(load_config("server", path), provider,
                               loader=lambda: load_config("server", path, Overrides()))
        await runtime.start()
        port = runtime.address.port

        async def attempt(line: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(line + b"\n")
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return data

        assert await attempt(b"mallory") == b""
        assert await attempt(b"nokey") == b""
        assert await attempt(b"alice") == b""  # authenticated, but the target (port 1) is unreachable
        conf("alice", "evil")
        assert not await runtime.reload()  # the factory refused it: the old configuration stays
        assert runtime.config.peer_identities == {"alice"}
        conf("alice", "bob")
        assert await runtime.reload()
        assert factories[0].config.peer_identities == {"alice", "bob"}
        runtime.request_stop()
        await runtime.shutdown()
        assert factories[0].closed
        samples = parse_prometheus(runtime.metrics.render())
        for outcome, n in (("auth_failed", 1), ("key_source_error", 1), ("ok", 1)):
            assert samples[("hybridkex_tunnel_handshakes_total", (("outcome", outcome),))] == n
        assert samples[("hybridkex_tunnel_closed_connections_total", (("outcome", "target_unreachable"),))] == 1
        assert samples[("hybridkex_tunnel_config_reloads_total", (("outcome", "error"),))] == 1
        assert samples[("hybridkex_tunnel_config_reloads_total", (("outcome", "ok"),))] == 1

    try:
        asyncio.run(main())
    finally:
        configure_logging("text", "info")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = [r["event"] for r in records]
    assert events.count("handshake_failed") == 2 and "target_unreachable" in events
    failed = [r for r in records if r["event"] == "handshake_failed"]
    assert failed[0]["reason"] == "authentication failed: unknown identity 'mallory'"
    assert failed[1]["reason"] == "KeyUnavailableError: pool empty" and failed[1]["outcome"] == "key_source_error"
    ok = next(r for r in records if r["event"] == "handshake_ok")
    assert ok["session"] == {"peer_identity": "alice", "psk": REDACTED}
    reload_error = next(r for r in records if r["event"] == "config_reload_failed")
    assert reload_error["msg"] == ("configuration reload failed, keeping the running configuration: "
                                   "ConfigurationError: peers: peer evil is not allowed")
    assert next(r for r in records if r["event"] == "config_reloaded")["added"] == ["bob"]
    assert SECRET.hex() not in stream.getvalue()
