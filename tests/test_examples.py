"""Every example runs as written (a real process) and says what it claims."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_combine_keys_example() -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / "combine_keys.py")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "both sides derived the same 32-byte TLS PSK" in proc.stdout
    assert "<redacted>" in proc.stdout
