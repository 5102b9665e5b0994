"""The tunnel over the real channel: hybrid handshake (ML-KEM + X25519 + QKD from a real simulated
KME pair over mutual-TLS HTTPS) then TLS 1.3 with the combined PSK; real processes end to end."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tunnelhelpers import PY, EchoService, TunnelProcess, echo_exchange, expected_echo, refused_or_closed_without_data

SECURE_ENV = {"HYBRIDKEX_TUNNEL_INSECURE_PLAIN_CHANNEL": "", "HYBRIDKEX_TESTING": ""}


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    pki = tmp_path_factory.mktemp("pki")
    subprocess.run([PY, "-m", "hybridkex", "pki", "init", str(pki)], check=True, capture_output=True, timeout=60)
    # stderr goes to a file: an unread pipe could fill up and block the KME.
    log = open(pki / "kme.log", "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([PY, "-m", "hybridkex", "kme", "--pki", str(pki), "--port-a", "0", "--port-b", "0"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    urls = {}
    try:
        assert proc.stdout is not None
        while len(urls) < 2:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"hybridkex kme exited: {(pki / 'kme.log').read_text()}")
            m = re.match(r"(KME-[AB]) (https://\S+)", line)
            if m:
                urls[m.group(1)] = m.group(2)
        yield pki, urls["KME-A"], urls["KME-B"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _psk(directory: Path, name: str) -> Path:
    path = directory / f"{name}.psk"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "hybridkex", "genpsk", str(path)], check=True, capture_output=True,
                       timeout=30)
    return path


def _config(path: Path, *, listen: str, target: str, identity: str, peer: str, peer_sae: str, psk: Path,
            kme_url: str, sae: str, pki: Path, qkd: str = "required") -> Path:
    path.write_text("\n".join([
        f'listen = "{listen}"', f'target = "{target}"', f'identity = "{identity}"', "",
        "[[peers]]", f'identity = "{peer}"', 'mode = "psk"', f'psk_file = "{psk}"', f'sae_id = "{peer_sae}"', "",
        "[policy]", f'qkd = "{qkd}"', "",
        "[kme]", f'url = "{kme_url}"', f'sae_id = "{sae}"', f'cert = "{pki / (sae + ".crt")}"',
        f'key = "{pki / (sae + ".key")}"', f'ca = "{pki / "ca.crt"}"', "",
        "[logging]", 'format = "json"', "",
    ]))
    return path


@pytest.fixture
def secure_pair(tmp_path: Path, kme: tuple[Path, str, str]) -> Iterator[tuple[EchoService, TunnelProcess,
                                                                               TunnelProcess, Path]]:
    pki, url_a, url_b = kme
    echo = EchoService()
    psk = _psk(tmp_path, "client-a")
    server_cfg = _config(tmp_path / "server.toml", listen="127.0.0.1:0", target=f"127.0.0.1:{echo.port}",
                         identity="server.example", peer="client-a", peer_sae="sae-a", psk=psk, kme_url=url_b,
                         sae="sae-b", pki=pki)
    server = TunnelProcess("server", server_cfg, env=SECURE_ENV).started()
    client_cfg = _config(tmp_path / "client.toml", listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}",
                         identity="client-a", peer="server.example", peer_sae="sae-b", psk=psk, kme_url=url_a,
                         sae="sae-a", pki=pki)
    client = TunnelProcess("client", client_cfg, env=SECURE_ENV).started()
    try:
        yield echo, server, client, tmp_path
    finally:
        client.stop()
        server.stop()
        echo.close()


def test_data_through_the_hybrid_tunnel_with_qkd(secure_pair: tuple[EchoService, TunnelProcess, TunnelProcess,
                                                                       Path]) -> None:
    _echo, server, client, _ = secure_pair
    seen_ids: set[str] = set()
    for size in (1, 1000, 300_000):
        payload = os.urandom(size)
        assert echo_exchange(client.port, payload) == expected_echo(payload)
    ok = [r for r in server.records() if r.get("event") == "handshake_ok"]
    assert len(ok) == 3
    for rec in ok:
        text = repr(rec)
        assert "ML-KEM-768" in text and "X25519" in text and "QKD" in text.upper()
        assert "X25519MLKEM768" in text  # TLS's own key exchange was post-quantum too
        ids = [i for i in re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)]
        assert ids, rec
        assert not (set(ids) & seen_ids), "a QKD key ID was used twice"
        seen_ids.update(ids)


def test_wrong_psk_is_refused_and_others_keep_working(secure_pair: tuple[EchoService, TunnelProcess,
                                                                          TunnelProcess, Path],
                                                       kme: tuple[Path, str, str]) -> None:
    _echo, server, client, tmp = secure_pair
    pki, url_a, _ = kme
    bad_psk = tmp / "bad.psk"
    bad_psk.write_text(secrets.token_hex(32))
    bad_psk.chmod(0o600)
    bad_cfg = _config(tmp / "bad.toml", listen="127.0.0.1:0", target=f"127.0.0.1:{server.port}",
                      identity="client-a", peer="server.example", peer_sae="sae-b", psk=bad_psk, kme_url=url_a,
                      sae="sae-a", pki=pki)
    bad = TunnelProcess("client", bad_cfg, env=SECURE_ENV).started()
    try:
        assert refused_or_closed_without_data(bad.port)
        bad.wait_for(lambda r: r.get("event") == "handshake_failed", "a failed handshake")
        payload = os.urandom(5000)
        assert echo_exchange(client.port, payload) == expected_echo(payload)
    finally:
        bad.stop()
    server_log = server.log_path.read_text()
    assert "authentication failed" in server_log or "AuthenticationError" in server_log


def test_embedded_kme_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    psk = _psk(tmp_path, "p")
    cfg = tmp_path / "c.toml"
    cfg.write_text("\n".join([
        'listen = "127.0.0.1:0"', 'target = "127.0.0.1:9"', 'identity = "client-a"', "",
        "[[peers]]", 'identity = "server.example"', 'mode = "psk"', f'psk_file = "{psk}"', 'sae_id = "sae-b"', "",
        "[kme]", "embedded = true", ""]))
    proc = subprocess.run([PY, "-m", "hybridkex", "tunnel", "client", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **SECURE_ENV}, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "kme.embedded" in lines[0] and "hybridkex kme" in lines[0], proc.stderr
