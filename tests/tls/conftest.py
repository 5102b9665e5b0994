"""Fixtures for the TLS adapter tests."""

from __future__ import annotations

import datetime
import os
import shutil
from typing import Any

import pytest

PY313 = "/root/.pyenv/versions/3.13.0/bin/python3.13"


@pytest.fixture
def psk() -> bytes:
    return os.urandom(32)


@pytest.fixture
def identity() -> bytes:
    return b"client-" + os.urandom(4).hex().encode()


@pytest.fixture(scope="session")
def openssl_cli() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("the openssl command-line tool is not installed")
    return path


@pytest.fixture(scope="session")
def python313() -> str:
    path = PY313 if os.path.exists(PY313) else shutil.which("python3.13")
    if path is None:
        pytest.skip(f"python3.13 not found ({PY313}): the stdlib ssl PSK API needs Python >= 3.13")
    return path


@pytest.fixture(scope="session")
def ed25519_cert() -> tuple[Any, Any]:
    """A self-signed Ed25519 certificate and key (cryptography objects) for certificate-path peers."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hybridkex-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    return cert, key
