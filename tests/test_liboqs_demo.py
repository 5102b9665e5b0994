"""`hybridkex demo --suite <liboqs suite>` end to end, as a user runs it (a subprocess; real KMEs over
HTTPS, the tunnel, sockets), with the real liboqs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from oqshelpers import needs_liboqs

from hybridkex.suites import SUITES

LIBOQS_SUITES = [s for s in SUITES.values() if s.backend == "liboqs"]


@needs_liboqs
@pytest.mark.parametrize("suite", LIBOQS_SUITES, ids=lambda s: s.name)
def test_demo_with_a_liboqs_suite(suite, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "demo", "--suite", suite.name, "--connections", "2"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
                          check=False)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out = proc.stdout
    assert out.startswith("hybridkex demo:"), out  # nothing of liboqs-python's on stdout
    assert f"suite            {suite.name}" in out
    assert f"component        {suite.pq_kem:16} {suite.pq_secret_bytes * 8}-bit secret" in out
    assert "2 x 65536 bytes echoed intact" in out and "1 steady-state connection(s)" in out
    assert f"  - {suite.pq_kem} (post-quantum" in out and suite.tls_cipher in out
    assert proc.stderr == ""
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
