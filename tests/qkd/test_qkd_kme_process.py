"""``hybridkex kme`` and ``hybridkex pki`` as a user runs them: real processes, real restarts."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from qkdhelpers import KMEProcess, free_port, sae_args

from hybridkex.qkd import ETSI014Client, KMEKeyNotFoundError
from hybridkex.qkd.pki import DemoPKI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridkex", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def client(pki: DemoPKI, url: str, name: str) -> ETSI014Client:
    return ETSI014Client(url, **sae_args(pki, name), retries=0)


def test_kme_persists_undelivered_keys_across_crash_and_restart(pki: DemoPKI, tmp_path: Path) -> None:
    db = tmp_path / "kme.sqlite"
    log = tmp_path / "kme.log"
    first = KMEProcess(pki, "--db", str(db), log_path=log)
    try:
        assert first.url_a.startswith("https://127.0.0.1:") and first.url_b.startswith("https://127.0.0.1:")
        with client(pki, first.url_a, "sae-a") as master, client(pki, first.url_b, "sae-b") as slave:
            keys = master.get_keys("sae-b", 6)
            early = slave.get_keys_by_id("sae-a", [k.key_id for k in keys[:2]])
            assert early == keys[:2]
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash, not a clean shutdown
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600

    second = KMEProcess(pki, "--db", str(db), log_path=log)
    try:
        with client(pki, second.url_b, "sae-b") as slave:
            # Undelivered keys survived the crash, with the same bytes.
            assert slave.get_keys_by_id("sae-a", [k.key_id for k in keys[2:4]]) == keys[2:4]
        for k in keys[:4]:  # delivered before or after the restart: never again
            with client(pki, second.url_b, "sae-b") as fresh, pytest.raises(KMEKeyNotFoundError):
                fresh.get_keys_by_id("sae-a", [k.key_id])
    finally:
        assert second.stop(signal.SIGTERM) == 0  # clean shutdown

    third = KMEProcess(pki, "--db", str(db), log_path=log)
    try:
        with client(pki, third.url_b, "sae-b") as slave:
            assert slave.get_keys_by_id("sae-a", [k.key_id for k in keys[4:]]) == keys[4:]
        with client(pki, third.url_b, "sae-b") as fresh, pytest.raises(KMEKeyNotFoundError):
            fresh.get_keys_by_id("sae-a", [keys[2].key_id])
    finally:
        third.stop()
    assert "key_IDs=" in log.read_text()
    for k in keys:  # the log names key IDs, never key material
        assert k.key.hex() not in log.read_text()


def test_kme_without_db_forgets_keys_on_restart(pki: DemoPKI, tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    first = KMEProcess(pki, "--port-a", str(port_a), "--port-b", str(port_b), log_path=tmp_path / "log")
    try:
        assert first.url_a == f"https://127.0.0.1:{port_a}" and first.url_b == f"https://127.0.0.1:{port_b}"
        with client(pki, first.url_a, "sae-a") as master:
            (key,) = master.get_keys("sae-b")
    finally:
        first.stop()
    second = KMEProcess(pki, log_path=tmp_path / "log")
    try:
        with client(pki, second.url_b, "sae-b") as slave, pytest.raises(KMEKeyNotFoundError):
            slave.get_keys_by_id("sae-a", [key.key_id])
    finally:
        second.stop()


def test_clients_carry_on_across_a_kme_restart(pki: DemoPKI, tmp_path: Path,
                                               make_client: Callable[..., Any]) -> None:
    """A keep-alive connection that died with the old KME process is replaced, not reported.

    Before, the next request failed with "TLS failure (EOF ...); does the KME trust this SAE's
    certificate?" (blocking client) or a broken pipe (asyncio client).
    """
    port_a, port_b = free_port(), free_port()
    ports = ("--port-a", str(port_a), "--port-b", str(port_b))
    kme = KMEProcess(pki, *ports, log_path=tmp_path / "log")
    try:
        c = make_client(kme.url_a, **sae_args(pki, "sae-a"), retries=0)  # no retries: not the retry loop
        seen = {k.key_id for k in c.get_keys("sae-b", 2)}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            kme.stop(sig)
            kme = KMEProcess(pki, *ports, log_path=tmp_path / "log")
            keys = c.get_keys("sae-b", 2)
            assert len(keys) == 2 and not seen & {k.key_id for k in keys}
            seen |= {k.key_id for k in keys}
    finally:
        kme.stop()


def test_kme_busy_port_is_a_one_line_error(pki: DemoPKI) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = cli("kme", "--pki", str(pki.directory), "--port-a", str(busy.getsockname()[1]), "--log-level", "error")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "cannot listen" in proc.stderr and "--port" not in proc.stdout


def test_kme_missing_pki_is_a_one_line_error(tmp_path: Path) -> None:
    proc = cli("kme", "--pki", str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("hybridkex: error:") and proc.stderr.count("\n") == 1
    assert "hybridkex pki init" in proc.stderr


def test_pki_init_creates_the_documented_files(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    proc = cli("pki", "init", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert "hybridkex kme --pki" in proc.stdout
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    for name in ("kme-a", "kme-b", "sae-a", "sae-b", "peer-a", "peer-b"):
        cert = x509.load_pem_x509_certificate((directory / f"{name}.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert stat.S_IMODE(os.stat(directory / f"{name}.key").st_mode) == 0o600
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
        if name.startswith(("kme", "peer")):
            assert ExtendedKeyUsageOID.SERVER_AUTH in eku and "127.0.0.1" in ips
        else:
            assert ExtendedKeyUsageOID.SERVER_AUTH not in eku and not ips
    # Running it again must not silently replace the CA.
    again = cli("pki", "init", str(directory))
    assert again.returncode == 2 and "--force" in again.stderr and again.stderr.count("\n") == 1
    assert cli("pki", "init", str(directory), "--force").returncode == 0


def test_pki_issue_adds_a_certificate(tmp_path: Path) -> None:
    pki = DemoPKI.create(tmp_path / "pki", peers=())
    proc = cli("pki", "issue", str(pki.directory), "sae-x", "--kind", "sae")
    assert proc.returncode == 0, proc.stderr
    assert "sae-x" in pki.names()
    bad = cli("pki", "issue", str(pki.directory), "../evil")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
