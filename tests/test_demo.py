"""`hybridkex demo` as a newcomer runs it: real KMEs over HTTPS, real tunnel, real sockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp)}


def test_demo_runs_explains_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "demo", "--connections", "3"], capture_output=True,
                          text=True, timeout=120, env=_env(tmp_path), check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needed in ("x25519-mlkem768-qkd-hkdfsha256", "ML-KEM-768", "X25519", "QKD", "CatKDF", "psk",
                   "X25519MLKEM768", "TLS_AES_128_GCM_SHA256", "3 x 65536 bytes echoed intact",
                   "3 across 3 connections, 3 distinct", "must break ALL of", "Time per stage"):
        assert needed in out, needed
    assert re.search(rf"QKD key IDs\s+{UUID}", out)
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
    assert proc.stderr == ""


def test_demo_sha384_suite(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "demo", "--suite", "x25519-mlkem1024-qkd-hkdfsha384",
                           "--connections", "1"], capture_output=True, text=True, timeout=120, env=_env(tmp_path),
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ML-KEM-1024" in proc.stdout and "TLS_AES_256_GCM_SHA384" in proc.stdout


def test_demo_is_safe_to_interrupt(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hybridkex", "demo", "--connections", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob("hybridkex-demo-*/client.psk")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the demo never got going"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), err
    if proc.returncode == 130:
        assert err.strip() == "hybridkex: error: interrupted"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "interrupted demo left files behind"


# The simulated KME pair stands in for QKD hardware, the one thing tests may fake: here its link
# delivers the slave a different key than the master's, as a faulty QKD link would. Every
# handshake then fails key confirmation; nothing else is altered.
_FAULTY_QKD_LINK = """
import dataclasses, sys
from hybridkex.cli import main
from hybridkex.qkd.kme.store import KeyStore

real_dec_keys = KeyStore.dec_keys

def flipped(self, *args, **kwargs):
    return [dataclasses.replace(k, key=bytes(b ^ 0x01 for b in k.key)) for k in real_dec_keys(self, *args, **kwargs)]

KeyStore.dec_keys = flipped
sys.exit(main(sys.argv[1:]))
"""


def test_demo_reports_a_failed_handshake_as_failed_not_corrupted(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _FAULTY_QKD_LINK, "demo", "--connections", "2", "--verbose"],
                          capture_output=True, text=True, timeout=120, env=_env(tmp_path), check=False)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, (out, err)
    assert "CORRUPTED" not in out and "bytes echoed" not in out
    for absent in ("What was established", "must break ALL of", "Authentication was checked", "peer   "):
        assert absent not in out, absent
    assert re.search(r"connection 1 +FAILED: handshake failed \(.*KeyMismatchError: key confirmation failed", out), out
    assert re.search(r"connection 2 +FAILED: handshake failed", out), out
    # One clear line on stderr (after the tunnels' log lines, which --verbose sends there too).
    last = err.strip().splitlines()[-1]
    assert last.startswith("hybridkex demo: 2 of 2 connection(s) failed: handshake failed (") and "KeyMismatch" in last
    # The tunnels log why each handshake failed: the error class and its one-line message.
    logged = [line for line in err.splitlines() if "handshake failed" in line and "log:" in line]
    assert len(logged) == 4, logged  # both sides, both connections
    assert all(re.search(r"handshake failed: (KeyMismatchError|AuthenticationError): .+; connection closed", line)
               for line in logged), logged
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
