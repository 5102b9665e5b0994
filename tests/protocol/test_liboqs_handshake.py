"""Full handshakes for every suite `hybridkex suites` lists as available, liboqs ones included, and
the wire format's bounds for large keys checked when a handshake object is built, not mid-handshake."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from oqshelpers import HOW_TO_GET_LIBOQS, needs_liboqs

from hybridkex.exceptions import ConfigurationError, UnsupportedAlgorithm
from hybridkex.protocol import Initiator, Responder, suite_kem
from hybridkex.suites import SUITES, Suite

from .helpers import configs, run_pair


def _available(suite: Suite) -> bool:
    try:
        suite_kem(suite)
    except UnsupportedAlgorithm:
        return False
    return True


def test_the_cli_lists_as_available_exactly_what_runs_here() -> None:
    proc = subprocess.run([sys.executable, "-m", "hybridkex", "suites", "--json"], capture_output=True, text=True,
                          timeout=60, check=True)
    listed = {row["name"]: row["available"] for row in json.loads(proc.stdout)}
    assert listed == {s.name: _available(s) for s in SUITES.values()}


@pytest.mark.parametrize("suite", list(SUITES.values()), ids=lambda s: s.name)
def test_full_handshake_for_every_available_suite(suite: Suite, qkd) -> None:
    if not _available(suite):
        pytest.skip(HOW_TO_GET_LIBOQS)
    ini, res = configs(suites=(suite.name,), qkd="required" if suite.qkd else "disabled")
    out = run_pair(ini, res, qkd if suite.qkd else None)
    assert out.ok, (out.ini_error, out.res_error)
    a, b = out.ini_session, out.res_session
    assert a.info.suite == b.info.suite == suite.name
    assert a.tls_psk() == b.tls_psk() and len(a.tls_psk()) == suite.hash_len
    assert a.secret.equals(b.secret)
    pq = next(c for c in a.info.components if c.name == suite.pq_kem)
    assert pq.secret_bytes == suite.pq_secret_bytes == suite_kem(suite).shared_secret_size


@needs_liboqs
def test_every_liboqs_suite_offered_at_once_fits_one_hello(qkd) -> None:
    """Four KEMs, FrodoKEM-976's 15.6 KB key among them: one Hello, and the responder's choice wins."""
    liboqs = [s.name for s in SUITES.values() if s.backend == "liboqs" and s.qkd]
    offered = ("x25519-frodokem976aes-qkd-hkdfsha384", "x25519-frodokem640aes-qkd-hkdfsha256",
               "x25519-hqc3-qkd-hkdfsha384", "x25519-mlkem768-qkd-hkdfsha256")
    assert set(offered) - {"x25519-mlkem768-qkd-hkdfsha256"} <= set(liboqs)
    ini, res = configs(suites=offered, res_suites=("x25519-frodokem976aes-qkd-hkdfsha384",))
    out = run_pair(ini, res, qkd)
    assert out.ok, (out.ini_error, out.res_error)
    assert out.ini_session.info.suite == "x25519-frodokem976aes-qkd-hkdfsha384"


def _mceliece_suite(name: str = "Classic-McEliece-348864") -> Suite:
    # Hand-built: no suite in the table uses Classic McEliece, because it cannot pass the wire format.
    return dataclasses.replace(SUITES["x25519-hqc1-qkd-hkdfsha256"], name=f"x25519-{name.lower()}-qkd-test",
                               code=0x7F01, pq_kem=name)


@needs_liboqs
@pytest.mark.parametrize(("kem", "size"), [("Classic-McEliece-348864", 261120), ("Classic-McEliece-460896", 524160)])
def test_mceliece_keys_are_refused_when_the_handshake_is_built(kem: str, size: int) -> None:
    """Too large for a key share: refused on both sides when the handshake object is built, naming the size."""
    ini, res = configs(suites=(_mceliece_suite(kem),))  # type: ignore[arg-type]
    for build, cfg in ((Initiator, ini), (Responder, res)):
        with pytest.raises(ConfigurationError, match=rf"{kem} public key is {size} bytes, larger than the 16384"):
            build(cfg)


@needs_liboqs
def test_a_suite_whose_secret_size_does_not_match_its_kem_is_refused() -> None:
    wrong = dataclasses.replace(SUITES["x25519-frodokem640aes-qkd-hkdfsha256"], name="x", code=0x7F02,
                                pq_secret_bytes=32)
    with pytest.raises(ConfigurationError, match="16-byte shared secrets, the suite declares 32"):
        suite_kem(wrong)


@needs_liboqs
def test_at_most_four_kems_in_one_hello() -> None:
    five = ("x25519-mlkem768-qkd-hkdfsha256", "x25519-mlkem1024-qkd-hkdfsha384", "x25519-frodokem640aes-qkd-hkdfsha256",
            "x25519-hqc1-qkd-hkdfsha256", "x25519-hqc3-qkd-hkdfsha384")
    ini, res = configs(suites=five)
    with pytest.raises(ConfigurationError, match="5 post-quantum KEMs"):
        Initiator(ini)
    Responder(res)  # a responder may allow any number: it only answers with one
    ini, _ = configs(suites=five[:4])
    Initiator(ini)
