"""End to end over the REAL secure channel: `hybridkex kme` and `hybridkex tunnel` processes, no test hook.

Every tunnel here runs the hybridkex handshake (ML-KEM-768 + X25519 + a QKD key fetched from a
real simulated KME pair over mutual-TLS HTTPS, QKD required) and then TLS 1.3 with the combined
PSK. The insecure plain test channel is switched off explicitly (SECURE_ENV), so a test passing
here cannot have passed over plaintext.

Covered: a standard HTTP client through the tunnel to a real ``python -m http.server`` process;
500 sequential and 100 concurrent connections with every QKD key ID distinct; SIGTERM drain;
SIGHUP adding a peer; bad peers (wrong PSK, garbage, slowloris, unknown identity) refused while a
good client carries on; a PKI-authenticated (Ed25519 certificate) tunnel pair.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import os
import re
import select
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tunnelhelpers import (
    PY,
    WAIT,
    Conn,
    EchoService,
    TunnelProcess,
    echo_exchange,
    expected_echo,
    refused_or_closed_without_data,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

#: Switches the insecure plain test channel OFF (tunnelhelpers' TunnelProcess defaults to it).
SECURE_ENV = {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "", "HYBRIDKEX_TESTING": ""}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: The load here is not what these tests are about, so the per-peer handshake rate limit is off; the
#: limits have tests of their own (test_tunnel_limits, test_tunnel_rate_limits).
NO_RATE_LIMIT = "[limits]\nhandshake_rate = 0\n"
SERVER_ID = "server.example"


# --- the KME pair and keys (once per module) ----------------------------------------------------------


@dataclass(frozen=True)
class KME:
    pki: Path
    url_a: str  # KME A serves sae-a and sae-c (the clients)
    url_b: str  # KME B serves sae-b (the tunnel servers, ETSI 014 masters)


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KME]:
    pki = tmp_path_factory.mktemp("pki")
    subprocess.run([PY, "-m", "hybridkex", "pki", "init", str(pki)], check=True, capture_output=True, timeout=60)
    # A second client SAE for the second client identity (SIGHUP test).
    subprocess.run([PY, "-m", "hybridkex", "pki", "issue", str(pki), "sae-c"], check=True, capture_output=True,
                   timeout=60)
    log = open(pki / "kme.log", "wb")  # noqa: SIM115 - a file, not a pipe: ~1000 requests must never block it
    proc = subprocess.Popen([PY, "-m", "hybridkex", "kme", "--pki", str(pki), "--port-a", "0", "--port-b", "0",
                             "--sae-a", "sae-a", "--sae-a", "sae-c", "--sae-b", "sae-b", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    urls: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        while len(urls) < 2:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"hybridkex kme exited: {(pki / 'kme.log').read_text()}")
            if m := re.match(r"(KME-[AB]) (https://\S+)", line):
                urls[m.group(1)] = m.group(2)
        yield KME(pki, urls["KME-A"], urls["KME-B"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="module")
def psks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PSK files made by the real CLI (`hybridkex genpsk`: hex, mode 0600)."""
    d = tmp_path_factory.mktemp("psk")
    out = {}
    for name in ("client-a", "client-b", "wrong"):
        out[name] = d / f"{name}.psk"
        subprocess.run([PY, "-m", "hybridkex", "genpsk", str(out[name])], check=True, capture_output=True, timeout=60)
    return out


# --- configurations and processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One ``[[peers]]`` entry: PSK (psk) or certificates (cert, key, ca)."""

    identity: str
    sae_id: str
    psk: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def toml(self) -> list[str]:
        lines = ["[[peers]]", f'identity = "{self.identity}"', f'sae_id = "{self.sae_id}"']
        if self.psk is not None:
            return [*lines, 'mode = "psk"', f'psk_file = "{self.psk}"', ""]
        return [*lines, 'mode = "pki"', f'cert = "{self.cert}"', f'key = "{self.key}"', f'ca = "{self.ca}"', ""]


def secure_toml(*, listen: str, target: str, identity: str, peers: list[Peer], kme_url: str, sae: str, pki: Path,
                extra: str = "") -> str:
    lines = [f'listen = "{listen}"', f'target = "{target}"', f'identity = "{identity}"', ""]
    for p in peers:
        lines += p.toml()
    lines += ["[policy]", 'qkd = "required"', "",
              "[kme]", f'url = "{kme_url}"', f'sae_id = "{sae}"', f'cert = "{pki / (sae + ".crt")}"',
              f'key = "{pki / (sae + ".key")}"', f'ca = "{pki / "ca.crt"}"', "",
              "[logging]", 'format = "json"', ""]
    return "\n".join(lines) + extra + "\n"


class SecureTunnels:
    """Starts real tunnel processes over the secure channel and stops them all at teardown."""

    def __init__(self, directory: Path, kme: KME) -> None:
        self.dir = directory
        self.kme = kme
        self.procs: list[TunnelProcess] = []

    def _start(self, role: str, name: str, text: str) -> TunnelProcess:
        path = self.dir / f"{name}.toml"
        path.write_text(text)
        proc = TunnelProcess(role, path, env=SECURE_ENV)
        self.procs.append(proc)
        return proc.started()

    def server_toml(self, target_port: int, peers: list[Peer], extra: str = "") -> str:
        return secure_toml(listen="127.0.0.1:0", target=f"127.0.0.1:{target_port}", identity=SERVER_ID, peers=peers,
                           kme_url=self.kme.url_b, sae="sae-b", pki=self.kme.pki, extra=NO_RATE_LIMIT + extra)

    def server(self, target_port: int, peers: list[Peer], extra: str = "", name: str = "server") -> TunnelProcess:
        return self._start("server", name, self.server_toml(target_port, peers, extra))

    def client(self, server: TunnelProcess, identity: str, *, psk: Path | None = None, sae: str = "sae-a",
               name: str | None = None, **pki: Path) -> TunnelProcess:
        peer = Peer(SERVER_ID, "sae-b", psk=psk, **pki)
        text = secure_toml(listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}", identity=identity,
                           peers=[peer], kme_url=self.kme.url_a, sae=sae, pki=self.kme.pki)
        return self._start("client", name or f"client-{identity}", text)

    def stop_all(self) -> None:
        stop_all(self.procs)


@pytest.fixture
def tunnels(tmp_path: Path, kme: KME) -> Iterator[SecureTunnels]:
    t = SecureTunnels(tmp_path, kme)
    yield t
    t.stop_all()


def key_ids(records: list[dict[str, Any]]) -> list[str]:
    """The QKD key IDs of every handshake_ok record, in order (each record must name at least one)."""
    out: list[str] = []
    for r in records:
        ids = r["session"]["qkd_key_ids"]
        assert ids and all(UUID.fullmatch(i) for i in ids), r
        out += ids
    return out


def assert_hybrid(rec: dict[str, Any], peer: str, auth: str = "psk") -> None:
    """A handshake_ok record: ML-KEM + X25519 + fresh QKD, authenticated ``peer``, PQ TLS group."""
    s = rec["session"]
    assert s["peer_identity"] == peer and s["auth"] == auth, s
    assert s["suite"] == "x25519-mlkem768-qkd-hkdfsha256", s
    assert set(s["components"]) == {"QKD:256", "X25519:256", "ML-KEM-768:256"}, s
    assert s["qkd"] == "fresh" and s["tls_group"] == "X25519MLKEM768" and s["reconnect"] is False, s
    assert s["steady"] is None or s["steady"]["qkd"] == "fresh", s


# --- a standard HTTP client through the tunnel to a real http.server process --------------------------


@pytest.fixture
def http_service(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    root = tmp_path / "site"
    root.mkdir()
    proc = subprocess.Popen([PY, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)", or "" if it died
        m = re.search(r"port (\d+)", line)
        assert m, f"http.server did not start: {line!r}"
        yield int(m.group(1)), root
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_http_client_through_the_tunnel_to_a_real_http_server(tunnels: SecureTunnels, psks: dict[str, Path],
                                                              http_service: tuple[int, Path]) -> None:
    port, root = http_service
    data = os.urandom(1024 * 1024)
    (root / "big.bin").write_bytes(data)
    server = tunnels.server(port, [Peer("client-a", "sae-a", psk=psks["client-a"])])
    client = tunnels.client(server, "client-a", psk=psks["client-a"])

    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=WAIT)
    try:
        conn.request("GET", "/big.bin")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and resp.getheader("Content-Length") == str(len(data))
        assert resp.getheader("Server", "").startswith("SimpleHTTP/")  # the real service answered
        assert body == data
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=WAIT)
    try:
        conn.request("GET", "/no-such-file")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
    finally:
        conn.close()

    wait_until(lambda: len(server.events("connection_closed")) == 2, "both connections logged as closed")
    ok = server.events("handshake_ok")
    assert len(ok) == 2
    for rec in ok:
        assert_hybrid(rec, "client-a")
    assert len(set(key_ids(ok))) == 2
    # The relay counted the whole file (plus HTTP headers) flowing back to the client.
    assert max(r["bytes_out"] for r in server.events("connection_closed")) > len(data)
    # Each end names the authenticated peer on connection_closed, as docs/tunnel.md says.
    assert [r.get("peer_identity") for r in server.events("connection_closed")] == ["client-a"] * 2
    wait_until(lambda: len(client.events("connection_closed")) == 2, "the client logged both closes")
    assert [r.get("peer_identity") for r in client.events("connection_closed")] == [SERVER_ID] * 2
    assert not server.events("handshake_failed") and not client.events("handshake_failed")


# --- load: 500 sequential and 100 concurrent connections ----------------------------------------------


@pytest.mark.exclusive  # timing-sensitive under load: runs alone (tests/conftest.py)
def test_1000_connections_one_full_handshake_then_the_steady_state_each_with_its_own_qkd_key(
        tunnels: SecureTunnels, psks: dict[str, Path], echo: EchoService) -> None:
    """900 sequential and 100 concurrent connections through the tunnel pair (real processes, the
    simulated KMEs over mutual TLS): one full handshake, then 999 steady-state connections, 1000
    distinct QKD key IDs, each used once and by both ends, 0 failures."""
    server = tunnels.server(echo.port, [Peer("client-a", "sae-a", psk=psks["client-a"])])
    client = tunnels.client(server, "client-a", psk=psks["client-a"])

    failures: list[str] = []
    for i in range(900):
        payload = b"sequential %d " % i + os.urandom(64)
        got = echo_exchange(client.port, payload)
        if got != expected_echo(payload):
            failures.append(f"sequential {i}: {len(got)} bytes back")
    assert failures == []

    start = threading.Barrier(100, timeout=WAIT)

    def one(i: int) -> bool:
        payload = b"concurrent %d " % i + os.urandom(64)
        start.wait()  # all 100 connect at once
        return echo_exchange(client.port, payload) == expected_echo(payload)

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(100)))
    assert results.count(True) == 100

    wait_until(lambda: len(server.events("handshake_ok")) == 1000 and len(client.events("handshake_ok")) == 1000,
               "1000 handshakes logged on both ends")
    ok = server.events("handshake_ok")
    for rec in ok:
        assert_hybrid(rec, "client-a")
    steady = [r["session"]["steady"] for r in ok]
    assert steady[0] is None and all(s is not None and s["qkd"] == "fresh" for s in steady[1:])
    assert sum(s["prefetched"] for s in steady[1:]) >= 900  # announced ahead, fetched before use
    ids = key_ids(ok)
    assert len(ids) == 1000 and len(set(ids)) == 1000, "a QKD key ID was used twice"
    assert set(key_ids(client.events("handshake_ok"))) == set(ids)  # both ends mixed in the same keys
    assert not server.events("handshake_failed") and not client.events("handshake_failed")
    assert not server.events("connection_refused") and not client.events("connection_refused")


# --- signals on the secure tunnel server --------------------------------------------------------------


def test_sigterm_drains_an_in_flight_transfer_refuses_new_connections_and_exits_0(
        tunnels: SecureTunnels, psks: dict[str, Path], echo: EchoService) -> None:
    server = tunnels.server(echo.port, [Peer("client-a", "sae-a", psk=psks["client-a"])],
                            extra="[timeouts]\ndrain = 30\n")
    client = tunnels.client(server, "client-a", psk=psks["client-a"])
    chunks = [os.urandom(1024 * 1024) for _ in range(8)]
    with Conn(client.port) as c:
        c.send(b"E" + chunks[0])
        c.wait_received(len(chunks[0]))  # the transfer is under way through both tunnel ends
        server.send_signal(signal.SIGTERM)
        server.wait_event("draining", open_connections=1)
        with pytest.raises(ConnectionRefusedError):  # the listener is closed
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        assert refused_or_closed_without_data(client.port)  # through the tunnel client: closed unserved
        assert server.proc.poll() is None  # still draining: our transfer is not finished
        for chunk in chunks[1:]:
            c.send(chunk)
        c.shutdown_write()
        data = c.wait_eof()
    payload = b"".join(chunks)
    assert data == expected_echo(payload)
    assert server.wait_exit() == 0
    closed = [r for r in server.events("connection_closed") if r["outcome"] == "closed"]
    assert [r["bytes_in"] for r in closed] == [len(payload) + 1]
    assert server.events("stopped")[0]["forced"] == 0
    assert len(server.events("handshake_ok")) == 1  # the refused attempt never reached a handshake


def test_sighup_adds_a_peer_with_its_own_psk_without_dropping_open_connections(
        tunnels: SecureTunnels, psks: dict[str, Path], echo: EchoService) -> None:
    peer_a = Peer("client-a", "sae-a", psk=psks["client-a"])
    peer_b = Peer("client-b", "sae-c", psk=psks["client-b"])  # its own key and its own SAE
    server = tunnels.server(echo.port, [peer_a])
    client_a = tunnels.client(server, "client-a", psk=psks["client-a"])
    client_b = tunnels.client(server, "client-b", psk=psks["client-b"], sae="sae-c")

    long_lived = Conn(client_a.port)
    sent = bytearray(b"before the reload ")
    long_lived.send(b"E" + bytes(sent))
    long_lived.wait_received(len(sent))

    # client-b is not a peer yet: refused, and the server says why.
    assert refused_or_closed_without_data(client_b.port)
    failed = server.wait_event("handshake_failed")
    assert failed["outcome"] == "auth_failed" and "client-b" in failed["reason"], failed

    server.config.write_text(tunnels.server_toml(echo.port, [peer_a, peer_b]))
    mark = len(server.records())
    server.send_signal(signal.SIGHUP)
    rec = server.wait_event("config_reloaded", start=mark)
    assert rec["added"] == ["client-b"] and rec["removed"] == []

    payload = os.urandom(20_000)
    assert echo_exchange(client_b.port, payload) == expected_echo(payload)
    ok_b = [r for r in server.events("handshake_ok") if r["session"]["peer_identity"] == "client-b"]
    assert len(ok_b) == 1
    assert_hybrid(ok_b[0], "client-b")

    part = b"after the reload"  # the connection opened before the reload still works
    long_lived.send(part)
    sent += part
    long_lived.wait_received(len(sent))
    long_lived.shutdown_write()
    assert long_lived.wait_eof() == expected_echo(bytes(sent))
    long_lived.close()
    assert echo_exchange(client_a.port, b"a again") == expected_echo(b"a again")
    assert len(set(key_ids(server.events("handshake_ok")))) == 3
    assert server.proc.poll() is None


# --- bad peers are refused while a good client carries on ---------------------------------------------


class Slowloris(threading.Thread):
    """Sends a plausible hybridkex Hello one byte per second until the server hangs up (bounded)."""

    # A valid frame header (magic "HK", version 1, type Hello, 1000-byte body), then body bytes.
    DATA = b"HK" + struct.pack(">BBI", 1, 1, 1000) + bytes(1000)

    def __init__(self, port: int, max_seconds: int = 40) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addr = "{}:{}".format(*self.sock.getsockname()[:2])
        self.max_seconds = max_seconds
        self.sent = 0
        self.received = b""
        self.hung_up = threading.Event()

    def run(self) -> None:
        try:
            for i in range(self.max_seconds):
                self.sock.sendall(self.DATA[i:i + 1])
                self.sent += 1
                readable, _, _ = select.select([self.sock], [], [], 1.0)
                if readable:
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        break
                    self.received += chunk
        except OSError:
            pass  # reset by the server: hung up too
        else:
            if self.sent == self.max_seconds:
                return  # never hung up: hung_up stays unset
        finally:
            self.sock.close()
        self.hung_up.set()


def send_garbage(port: int, data: bytes) -> tuple[str, bytes]:
    """Send ``data`` straight to the tunnel server; return our address and whatever came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        addr = "{}:{}".format(*s.getsockname()[:2])
        with contextlib.suppress(OSError):
            s.sendall(data)
        back = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                back += chunk
        return addr, back


def test_bad_peers_are_refused_while_a_good_client_carries_on(tunnels: SecureTunnels, psks: dict[str, Path],
                                                              echo: EchoService) -> None:
    server = tunnels.server(echo.port, [Peer("client-a", "sae-a", psk=psks["client-a"])],
                            extra="[timeouts]\nhandshake = 5\n")
    good = tunnels.client(server, "client-a", psk=psks["client-a"])
    wrong_psk = tunnels.client(server, "client-a", psk=psks["wrong"], name="client-wrong-psk")
    # Holds client-a's real key but claims to be someone the server does not know.
    mallory = tunnels.client(server, "mallory", psk=psks["client-a"])

    long_lived = Conn(good.port)
    sent = bytearray(b"opened before the attack ")
    long_lived.send(b"E" + bytes(sent))
    long_lived.wait_received(len(sent))

    slow = Slowloris(server.port)
    slow.start()
    good_payloads = []
    # While the slowloris is connected, a good client gets through.
    payload = os.urandom(30_000)
    assert echo_exchange(good.port, payload) == expected_echo(payload)
    good_payloads.append(payload)
    assert not slow.hung_up.is_set(), "the slowloris was cut before the good exchange: nothing was shown"

    garbage = [
        send_garbage(server.port, b"\x00\xff garbage " + os.urandom(2000)),  # not a hybridkex frame at all
        send_garbage(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),  # plain HTTP on the secure port
        send_garbage(server.port, b"HK" + struct.pack(">BBI", 1, 1, 0xFFFFFFFF)),  # a Hello of 4 GiB
    ]
    for _, back in garbage:
        assert back == b"" or back.startswith(b"HK"), back  # at most a hybridkex Abort, nothing of the service

    assert refused_or_closed_without_data(wrong_psk.port)
    assert refused_or_closed_without_data(mallory.port)
    for i in range(3):
        payload = os.urandom(10_000 * (i + 1))
        assert echo_exchange(good.port, payload) == expected_echo(payload)
        good_payloads.append(payload)
    part = b"and still open after it"
    long_lived.send(part)
    sent += part
    long_lived.wait_received(len(sent))

    assert slow.hung_up.wait(WAIT), "the server never hung up on the slowloris"
    slow.join(WAIT)
    assert slow.received == b"" or slow.received.startswith(b"HK"), slow.received  # at most a hybridkex Abort

    long_lived.shutdown_write()
    assert long_lived.wait_eof() == expected_echo(bytes(sent))
    long_lived.close()

    # Every bad peer is refused with a handshake_failed record saying why.
    wait_until(lambda: len(server.events("handshake_failed")) == 6, "six handshake_failed records")
    failed = {r["peer_addr"]: r for r in server.events("handshake_failed")}
    assert failed[slow.addr]["outcome"] == "timeout", failed[slow.addr]
    for addr, _ in garbage:
        assert failed[addr]["outcome"] == "protocol_error", failed[addr]
    by_tunnel = [r for a, r in failed.items() if a != slow.addr and a not in {g[0] for g in garbage}]
    assert len(by_tunnel) == 2 and all(r["outcome"] == "auth_failed" for r in by_tunnel), by_tunnel
    assert sum("mallory" in r["reason"] for r in by_tunnel) == 1, by_tunnel
    for proc in (wrong_psk, mallory):
        assert proc.events("handshake_failed") and not proc.events("handshake_ok")
    # ... while every good connection completed with its own QKD key.
    ok = server.events("handshake_ok")
    assert len(ok) == 1 + len(good_payloads)
    for rec in ok:
        assert_hybrid(rec, "client-a")
    assert len(set(key_ids(ok))) == len(ok)
    assert server.proc.poll() is None


# --- a PKI-authenticated tunnel pair (Ed25519 certificates) -------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ed25519.Ed25519PrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class EdPKI:
    """An Ed25519 CA that issues leaf certificates as hybridkex's verify_chain expects them."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.key = ed25519.Ed25519PrivateKey.generate()
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, None))
        self.ca_path = _write_cert(directory / f"{name}.crt", self.cert)

    def issue(self, identity: str, usage: x509.ObjectIdentifier, file_stem: str) -> dict[str, Path]:
        key = ed25519.Ed25519PrivateKey.generate()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(_name(identity)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, None))
        return {"cert": _write_cert(self.dir / f"{file_stem}.crt", cert),
                "key": _write_key(self.dir / f"{file_stem}.key", key)}


def test_pki_authenticated_tunnel_pair(tunnels: SecureTunnels, echo: EchoService, tmp_path: Path) -> None:
    ca = EdPKI(tmp_path, "tunnel-ca")
    server_cred = ca.issue(SERVER_ID, ExtendedKeyUsageOID.SERVER_AUTH, "server")
    client_cred = ca.issue("client-a", ExtendedKeyUsageOID.CLIENT_AUTH, "client-a")
    server = tunnels.server(echo.port, [Peer("client-a", "sae-a", ca=ca.ca_path, **server_cred)])
    client = tunnels.client(server, "client-a", ca=ca.ca_path, **client_cred)

    for size in (1, 100_000):
        payload = os.urandom(size)
        assert echo_exchange(client.port, payload) == expected_echo(payload)

    # Refused: a certificate for client-a from another CA, and one from the right CA that may only act
    # as a server (extendedKeyUsage serverAuth, no clientAuth).
    rogue_ca = EdPKI(tmp_path, "rogue-ca")
    rogue = tunnels.client(server, "client-a", ca=ca.ca_path, name="client-rogue",
                           **rogue_ca.issue("client-a", ExtendedKeyUsageOID.CLIENT_AUTH, "rogue"))
    wrong_role = tunnels.client(server, "client-a", ca=ca.ca_path, name="client-wrong-role",
                                **ca.issue("client-a", ExtendedKeyUsageOID.SERVER_AUTH, "wrong-role"))
    assert refused_or_closed_without_data(rogue.port)
    assert refused_or_closed_without_data(wrong_role.port)
    payload = os.urandom(5000)
    assert echo_exchange(client.port, payload) == expected_echo(payload)

    ok = server.events("handshake_ok")
    assert len(ok) == 3
    for rec in ok:
        assert_hybrid(rec, "client-a", auth="pki-ed25519")
    assert len(set(key_ids(ok))) == 3
    for rec in client.events("handshake_ok"):
        assert_hybrid(rec, SERVER_ID, auth="pki-ed25519")  # the client verified the server's certificate too
    wait_until(lambda: len(server.events("handshake_failed")) == 2, "two refused certificates")
    failed = server.events("handshake_failed")
    assert all(r["outcome"] == "auth_failed" for r in failed), failed
    reasons = [r["reason"] for r in failed]
    assert sum("does not lead to a configured trust anchor (untrusted)" in r for r in reasons) == 1, reasons
    assert sum("not allowed to act as initiator (extended key usage)" in r for r in reasons) == 1, reasons
    assert not rogue.events("handshake_ok") and not wrong_role.events("handshake_ok")


def test_a_client_whose_certificate_is_refused_is_told_authentication_failed(
        tunnels: SecureTunnels, echo: EchoService, tmp_path: Path) -> None:
    ca = EdPKI(tmp_path, "tunnel-ca")
    server = tunnels.server(echo.port, [Peer("client-a", "sae-a", ca=ca.ca_path,
                                             **ca.issue(SERVER_ID, ExtendedKeyUsageOID.SERVER_AUTH, "server"))])
    rogue_ca = EdPKI(tmp_path, "rogue-ca")  # the client trusts the real CA but holds a rogue certificate
    rogue = tunnels.client(server, "client-a", ca=ca.ca_path, name="client-rogue",
                           **rogue_ca.issue("client-a", ExtendedKeyUsageOID.CLIENT_AUTH, "rogue"))
    assert refused_or_closed_without_data(rogue.port)
    assert server.wait_event("handshake_failed")["outcome"] == "auth_failed"
    rec = rogue.wait_event("handshake_failed")
    assert rec["outcome"] == "auth_failed", rec
