"""The connect/serve API is exported lazily: ``import hybridkex`` stays free of cryptography and
pyOpenSSL, and touching an API name without them says what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import hybridkex
import hybridkex.api

ROOT = Path(__file__).resolve().parent.parent.parent
PY313 = "/root/.pyenv/versions/3.13.0/bin/python3.13"


def test_lazy_names_resolve_to_the_api() -> None:
    for name in hybridkex.api.__all__:
        assert getattr(hybridkex, name) is getattr(hybridkex.api, name)
        assert name in dir(hybridkex)
    with pytest.raises(AttributeError):
        hybridkex.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_import_stays_light() -> None:
    code = ("import sys, hybridkex; heavy = [m for m in ('OpenSSL', 'cryptography', 'hybridkex.api') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not os.path.exists(PY313), reason="python3.13 (without cryptography) not available")
def test_without_cryptography_the_error_says_what_to_install() -> None:
    code = ("import hybridkex\n"
            "try:\n    hybridkex.connect\nexcept hybridkex.UnsupportedAlgorithm as e:\n    print('ok', e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = subprocess.run([PY313, "-c", "import cryptography"], capture_output=True, timeout=60, env=env,
                           check=False)
    if probe.returncode == 0:
        pytest.skip("that interpreter has cryptography installed")
    out = subprocess.run([PY313, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and "pip install" in out.stdout
