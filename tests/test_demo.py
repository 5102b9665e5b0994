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
