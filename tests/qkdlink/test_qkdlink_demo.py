"""`hybridkex demo --link bb84`: the demo's QKD keys come from the simulated BB84 link between the KMEs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_over_the_link(tmp_path: Path) -> None:
    # A short link with blocks of 10^7 pulses: about 2 kbit of key per block in well under a second.
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "demo", "--connections", "2", "--link", "bb84",
                           "--distance-km", "1", "--pulses-per-block", "1e7", "--link-seed", "4"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "fed by a 1 km decoy BB84 link" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("QKD link"))
    m = re.search(r"(\d+) block\(s\) ok, (\d+) aborted, QBER (\d+\.\d+)%", line)
    assert m is not None, line
    assert int(m[1]) >= 1 and int(m[2]) == 0 and 2.0 < float(m[3]) < 5.0
    assert "0 alarm(s)" in line and "authentication used" in line
    assert "2 x 65536 bytes echoed intact" in out and "2 across 2 connections, 2 distinct" in out
    assert list(tmp_path.iterdir()) == []
