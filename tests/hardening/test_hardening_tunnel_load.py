"""The tunnel (hybridkex/tunnel, real secure channel) under 1,000 connections on loopback.

Real processes: `hybridkex kme` (the simulated KME pair over mutual-TLS HTTPS), a tunnel server in
front of an echo service and a tunnel client, both over the secure channel (the insecure test
channel is switched off).  1,000 connections from 32 concurrent client threads, each a full hybrid
handshake (QKD required: a fresh key from the KME per connection) and TLS 1.3, each echoing data.
Checked: zero failed connections, one distinct QKD key ID per connection in the server's
handshake_ok log records, the tunnel processes' open file descriptors back to their idle count
and their RSS growth bounded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from qkdhelpers import KMEProcess
from tunnelhelpers import EchoService, TunnelProcess, echo_exchange, expected_echo, stop_all, write_psk

from hybridkex.qkd.pki import DemoPKI

SECURE_ENV = {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "", "HYBRIDKEX_TESTING": ""}
CONNECTIONS = int(os.environ.get("HYBRIDKEX_TUNNEL_LOAD", "1000"))
THREADS = 32
RESULTS: dict[str, Any] = {}


def _toml(*, listen: str, target: str, identity: str, peer: str, peer_sae: str, psk: Path, kme_url: str, sae: str,
          pki: DemoPKI, extra: str = "") -> str:
    return "\n".join([
        f'listen = "{listen}"', f'target = "{target}"', f'identity = "{identity}"', "",
        "[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', f'sae_id = "{peer_sae}"', "",
        "[policy]", 'qkd = "required"', "",
        "[kme]", f'url = "{kme_url}"', f'sae_id = "{sae}"', f'cert = "{pki.cert(sae)}"', f'key = "{pki.key(sae)}"',
        f'ca = "{pki.ca_cert}"', "",
        "[logging]", 'format = "json"', "", extra, ""])


def _fds_excluding(pid: int, ports: set[int]) -> tuple[int, int]:
    """(open fds that are not connections to ``ports``, connections to ``ports``) of process ``pid``."""
    remote: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            for line in list(fh)[1:]:
                cols = line.split()
                remote[cols[9]] = int(cols[2].rsplit(":", 1)[1], 16)
    to_ports = other = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inode = target[8:-1] if target.startswith("socket:[") else None
        if inode is not None and remote.get(inode) in ports:
            to_ports += 1
        else:
            other += 1
    return other, to_ports


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DemoPKI, KMEProcess]]:
    d = tmp_path_factory.mktemp("tunnel-load")
    pki = DemoPKI.create(d / "pki")
    proc = KMEProcess(pki, "--log-level", "warning", "--rate", "100000000", log_path=d / "kme.log")
    yield pki, proc
    proc.stop()


def _settle(pid: int, idle: int, kme_ports: set[int]) -> tuple[int, int]:
    """Open fds other than KME keep-alive connections (bounded wait for closes), and those."""
    for _ in range(100):
        other, kme_conns = _fds_excluding(pid, kme_ports)
        if other <= idle:
            break
        time.sleep(0.05)
    return other, kme_conns


def test_tunnel_1000_connections(kme: tuple[DemoPKI, KMEProcess], tmp_path: Path) -> None:
    pki, kmes = kme
    psk = write_psk(tmp_path, "client-a")
    echo = EchoService()
    procs: list[TunnelProcess] = []
    try:
        (tmp_path / "server.toml").write_text(_toml(
            listen="127.0.0.1:0", target=f"127.0.0.1:{echo.port}", identity="server.example", peer="client-a",
            peer_sae="sae-a", psk=psk, kme_url=kmes.url_b, sae="sae-b", pki=pki,
            extra="[limits]\nhandshake_rate = 0\n"))
        server = TunnelProcess("server", tmp_path / "server.toml", env=SECURE_ENV)
        procs.append(server)
        server.started()
        (tmp_path / "client.toml").write_text(_toml(
            listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}", identity="client-a", peer="server.example",
            peer_sae="sae-b", psk=psk, kme_url=kmes.url_a, sae="sae-a", pki=pki))
        client = TunnelProcess("client", tmp_path / "client.toml", env=SECURE_ENV)
        procs.append(client)
        client.started()

        def one(i: int) -> bool:
            payload = os.urandom(200 + i % 300)
            return echo_exchange(client.port, payload) == expected_echo(payload)

        assert all(one(i) for i in range(10)), "warm-up failed"
        time.sleep(0.5)
        kme_ports = {int(u.rsplit(":", 1)[1]) for u in (kmes.url_a, kmes.url_b)}
        idle = {p.role: _fds_excluding(p.proc.pid, kme_ports)[0] for p in procs}
        rss0 = {p.role: _rss(p.proc.pid) for p in procs}
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(one, range(CONNECTIONS)))
        settled = {p.role: _settle(p.proc.pid, idle[p.role], kme_ports) for p in procs}
        after = {role: v[0] for role, v in settled.items()}
        kme_conns = {role: v[1] for role, v in settled.items()}
        rss1 = {p.role: _rss(p.proc.pid) for p in procs}
        deadline = time.monotonic() + 30
        while len(server.events("handshake_ok")) < CONNECTIONS + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        ok_records = server.events("handshake_ok")
        ids = [k for r in ok_records for k in r["session"]["qkd_key_ids"]]
    finally:
        stop_all(procs)
        echo.close()
    failures = results.count(False)
    growth = {role: round((rss1[role] - rss0[role]) / 2**20, 1) for role in rss0}
    RESULTS["tunnel"] = {"connections": CONNECTIONS, "failures": failures, "fds_idle": idle, "fds_after": after,
                         "kme_keepalive_connections": kme_conns, "rss_growth_mib": growth,
                         "handshake_ok": len(ok_records)}
    print("tunnel load:", RESULTS["tunnel"])
    assert failures == 0
    assert len(ok_records) == CONNECTIONS + 10
    assert len(ids) == len(set(ids)) == CONNECTIONS + 10, "QKD key IDs not one per connection"
    for role, n in idle.items():
        # Besides the KME client's keep-alive pool (at most 32 connections, aiohttp's limit, or 8 for
        # the blocking client), every descriptor the load opened is closed again.
        assert after[role] <= n, f"{role} leaked file descriptors: {n} -> {after[role]}"
        assert kme_conns[role] <= 32, kme_conns
        assert growth[role] < 96, f"{role} RSS grew by {growth[role]} MiB"
