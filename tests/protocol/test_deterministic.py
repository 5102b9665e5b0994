"""The hazmat hook that derandomises a responder's KEM encapsulation (for known-answer vectors):
narrow, checked, fail-closed, and set by nothing but hybridkex.hazmat.deterministic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem

from hybridkex.exceptions import KeyMismatchError, LocalProtocolError
from hybridkex.hazmat.deterministic import derandomize_encapsulation
from hybridkex.protocol import Initiator, Responder

from .helpers import ConnectionPair, DeterministicRandom, QKDPair, clock, configs


def _pair(encapsulate) -> ConnectionPair:  # type: ignore[no-untyped-def]
    pair = ConnectionPair.create(*configs(), QKDPair.create(), seed=7)
    derandomize_encapsulation(pair.res, encapsulate)
    return pair


def test_a_fixed_encapsulation_makes_the_responder_repeatable() -> None:
    ct_seen: list[bytes] = []

    def encapsulate(kem: str, ek: bytes) -> tuple[bytes, bytes]:
        assert kem == "ML-KEM-768"
        ss, ct = mlkem.MLKEM768PublicKey.from_public_bytes(ek).encapsulate()
        ct_seen.append(ct)
        return ss, ct

    out = _pair(encapsulate).run()
    assert out.ok and len(ct_seen) == 1 and ct_seen[0] in out.frames[1][1]


def test_a_result_of_the_wrong_size_fails_closed() -> None:
    out = _pair(lambda kem, ek: (bytes(32), bytes(10))).run()
    assert isinstance(out.res_error, LocalProtocolError) and out.ini_session is None


def test_a_wrong_ciphertext_fails_key_confirmation() -> None:
    other = mlkem.MLKEM768PrivateKey.generate().public_key()
    out = _pair(lambda kem, ek: other.encapsulate()).run()
    assert isinstance(out.ini_error, KeyMismatchError) and not out.ok


def test_only_before_the_hello_and_only_on_a_responder() -> None:
    ini_cfg, res_cfg = configs()
    with pytest.raises(TypeError):
        derandomize_encapsulation(Initiator(ini_cfg, randbytes=DeterministicRandom(1), clock=clock),  # type: ignore[arg-type]
                                  lambda kem, ek: (b"", b""))
    res = Responder(res_cfg, randbytes=os.urandom, clock=clock)
    res.receive_data(Initiator(ini_cfg, randbytes=DeterministicRandom(1), clock=clock).data_to_send())
    res.next_event()
    with pytest.raises(LocalProtocolError, match="before the Hello"):
        derandomize_encapsulation(res, lambda kem, ek: (b"", b""))


def test_nothing_else_in_the_library_sets_the_hook() -> None:
    package = Path(__file__).resolve().parents[2] / "hybridkex"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if "_encapsulate_with" in p.read_text(encoding="utf-8")
                   or "derandomize_encapsulation" in p.read_text(encoding="utf-8"))
    assert users == ["hazmat/deterministic.py", "protocol/_responder.py"]
