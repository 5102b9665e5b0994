"""The private-binding shim: its import-time check, and that nothing else touches private bindings."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib

from hybridkex.exceptions import UnsupportedAlgorithm
from hybridkex.tls import _shim

ROOT = Path(__file__).resolve().parents[2]


class _Hiding:
    """The real binding namespace with some names removed or overridden."""

    def __init__(self, real: Any, hide: tuple[str, ...] = (), override: dict[str, Any] | None = None) -> None:
        self._real, self._hide, self._override = real, hide, override or {}

    def __getattr__(self, name: str) -> Any:
        if name in self._hide:
            raise AttributeError(name)
        if name in self._override:
            return self._override[name]
        return getattr(self._real, name)


def test_real_bindings_pass() -> None:
    _shim.check_bindings(lib, SSL)
    assert "pyOpenSSL" in _shim.versions() and "OpenSSL" in _shim.versions()


@pytest.mark.parametrize("name", _shim.REQUIRED_FUNCTIONS)
def test_each_missing_function_is_reported(name: str) -> None:
    with pytest.raises(UnsupportedAlgorithm) as e:
        _shim.check_bindings(_Hiding(lib, hide=(name,)), SSL)
    message = str(e.value)
    assert name in message
    assert _shim.SUPPORTED_RANGES in message and "pyOpenSSL >= 26.2, < 27" in message
    assert "cryptography >= 49, < 51" in message


def test_disabled_feature_flag_is_reported() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="Cryptography_HAS_PSK_TLSv1_3"):
        _shim.check_bindings(_Hiding(lib, override={"Cryptography_HAS_PSK_TLSv1_3": 0}), SSL)


def test_missing_pyopenssl_internals_are_reported() -> None:
    no_group = types.SimpleNamespace(
        Connection=type(
            "Connection", (), {"export_keying_material": None, "_reverse_mapping": SSL.Connection._reverse_mapping}
        ),
        Context=SSL.Context,
        TLS_METHOD=SSL.TLS_METHOD,
    )
    with pytest.raises(UnsupportedAlgorithm, match=r"Connection\.get_group_name"):
        _shim.check_bindings(lib, no_group)

    class NoMapping(SSL.Connection):
        _reverse_mapping = None  # type: ignore[assignment]

    no_mapping = types.SimpleNamespace(Connection=NoMapping, Context=SSL.Context, TLS_METHOD=SSL.TLS_METHOD)
    with pytest.raises(UnsupportedAlgorithm, match="_reverse_mapping"):
        _shim.check_bindings(lib, no_mapping)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def test_import_fails_clearly_when_a_binding_is_gone() -> None:
    """The check really runs at import: drop a binding from the real lib, then import the adapter."""
    code = """
import OpenSSL._util as u
class Lib:
    def __getattr__(self, name):
        if name == "SSL_CTX_set_psk_find_session_callback":
            raise AttributeError(name)
        return getattr(real, name)
real = u.lib
u.lib = Lib()
from hybridkex.exceptions import UnsupportedAlgorithm
import hybridkex.tls as tls
try:
    tls.server_context
except UnsupportedAlgorithm as e:
    print("UNSUPPORTED:", e)
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "UNSUPPORTED:" in proc.stdout and "SSL_CTX_set_psk_find_session_callback" in proc.stdout
    assert "pyOpenSSL >= 26.2, < 27" in proc.stdout


def test_without_pyopenssl_the_stdlib_adapter_still_imports() -> None:
    code = """
import sys
sys.modules["OpenSSL"] = None  # as if pyOpenSSL were not installed
from hybridkex.exceptions import UnsupportedAlgorithm
import hybridkex.tls as tls
from hybridkex.tls import stdlib, TLSInfo, PQ_GROUP
print("STDLIB OK", stdlib.__name__, TLSInfo.__name__, PQ_GROUP)
try:
    tls.client_context
except UnsupportedAlgorithm as e:
    print("UNSUPPORTED:", e)
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "STDLIB OK hybridkex.tls.stdlib TLSInfo X25519MLKEM768" in proc.stdout
    assert "UNSUPPORTED:" in proc.stdout and "pip install" in proc.stdout


# Private names that only make sense as pyOpenSSL/cryptography bindings anywhere in the package...
_PRIVATE = re.compile(
    r"OpenSSL\._util|from OpenSSL import _util|_reverse_mapping|Cryptography_|\bSSL_(CTX|SESSION|CIPHER)_"
)
# ...and pyOpenSSL object internals, checked in modules that use pyOpenSSL.
_INTERNALS = re.compile(r"\._context\b|\._ssl\b")


def test_private_bindings_are_confined_to_the_shim() -> None:
    offenders = []
    for path in sorted((ROOT / "hybridkex").rglob("*.py")):
        if path.name == "_shim.py" and path.parent.name == "tls":
            continue
        text = path.read_text(encoding="utf-8")
        uses_pyopenssl = re.search(r"^\s*(from|import) OpenSSL\b", text, re.MULTILINE) is not None
        for n, line in enumerate(text.splitlines(), 1):
            if _PRIVATE.search(line) or (uses_pyopenssl and _INTERNALS.search(line)):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "private bindings outside hybridkex/tls/_shim.py:\n" + "\n".join(offenders)
    shim = (ROOT / "hybridkex/tls/_shim.py").read_text(encoding="utf-8")
    assert _PRIVATE.search(shim) and _INTERNALS.search(shim)  # the patterns do find what they look for
