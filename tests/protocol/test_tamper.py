"""An active attacker on the wire: every single-byte change, truncation or extension of every
message is rejected, no key comes out, and replayed or reflected messages are refused."""

from __future__ import annotations

import random
import struct

import pytest

from hybridkex.exceptions import (
    AuthenticationError,
    HybridKEXError,
    KeyMismatchError,
    PolicyViolation,
    RemoteProtocolError,
)
from hybridkex.protocol import HandshakeComplete, Initiator, Responder
from hybridkex.protocol._wire import FrameType

from .helpers import ConnectionPair, DeterministicRandom, QKDPair, clock, configs, run_pair

#: What an attacker's modification may cause: a decode error, an authentication failure, or (for
#: a changed offer) no acceptable parameters.  Never a KeyMismatchError: the proof covers the
#: key-confirmation value, so tampering can never pass for a QKD key mismatch.
REJECTIONS = (RemoteProtocolError, AuthenticationError, PolicyViolation)


def _check_rejected(out, index: int, what: str, *, later_bytes: bool = False) -> None:
    sender, _ = out.frames[index]
    receiver_session = out.res_session if sender == "initiator" else out.ini_session
    assert receiver_session is None, f"{what}: the receiver completed with a tampered message"
    errors = [e for e in (out.ini_error, out.res_error) if e is not None]
    assert errors, f"{what}: nobody noticed"
    for e in errors:
        assert isinstance(e, REJECTIONS), f"{what}: unexpected {type(e).__name__}: {e}"
        assert not isinstance(e, KeyMismatchError)
    # Garbage *after* a frame is a later message on the stream: like a tampered last flight, the
    # receiver rejects it but its peer may already have finished (as in TLS).
    final_flight = (sender == "initiator" and index > 0) or later_bytes
    if not final_flight:  # before the initiator's last flight nobody may finish
        assert out.ini_session is None and out.res_session is None, what


def _reference(auth: str, qkd: QKDPair):
    out = run_pair(*configs(auth=auth), qkd)
    assert out.ok
    return out.frames


def _mutate(index: int, position: int, xor: int):
    def tamper(i: int, sender: str, frame: bytes) -> bytes:
        if i != index:
            return frame
        b = bytearray(frame)
        b[position] ^= xor
        return bytes(b)

    return tamper


def test_every_byte_of_every_message_psk(qkd):
    """Each byte position of each message, with a sampled replacement value."""
    cfgs = configs(auth="psk")
    frames = _reference("psk", qkd)
    rng = random.Random(2024)
    for index, (_, frame) in enumerate(frames):
        for position in range(len(frame)):
            out = run_pair(*cfgs, qkd, tamper=_mutate(index, position, rng.randrange(1, 256)))
            _check_rejected(out, index, f"frame {index} byte {position}")


@pytest.mark.parametrize("auth", ["pki-ed25519", "pki-hybrid"])
def test_sampled_bytes_of_certificate_messages(auth, qkd):
    """Certificate-mode messages are large; sample positions (all header bytes and both ends)."""
    cfgs = configs(auth=auth)
    frames = _reference(auth, qkd)
    rng = random.Random(7)
    for index, (_, frame) in enumerate(frames):
        if frame[3] not in (FrameType.CERTIFICATE, FrameType.FINISHED):
            continue
        sampled = rng.sample(range(len(frame)), min(len(frame), 120))
        positions = set(range(12)) | {len(frame) - 1, len(frame) - 2} | set(sampled)
        for position in sorted(positions):
            out = run_pair(*cfgs, qkd, tamper=_mutate(index, position, rng.randrange(1, 256)))
            _check_rejected(out, index, f"{auth} frame {index} byte {position}")


def _fix_length(frame: bytes, body: bytes) -> bytes:
    return frame[:4] + struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("auth", ["psk", "pki-ed25519"])
def test_truncation_and_extension(auth, qkd):
    cfgs = configs(auth=auth)
    frames = _reference(auth, qkd)
    for index, (_, frame) in enumerate(frames):
        body = frame[8:]
        variants = {
            "drop last byte (length fixed up)": _fix_length(frame, body[:-1]),
            "drop first byte (length fixed up)": _fix_length(frame, body[1:]),
            "half the body (length fixed up)": _fix_length(frame, body[: len(body) // 2]),
            "empty body": _fix_length(frame, b""),
            "one byte appended (length fixed up)": _fix_length(frame, body + b"\x00"),
            "one byte prepended (length fixed up)": _fix_length(frame, b"\x00" + body),
            "a second copy appended": _fix_length(frame, body + body),
            "garbage after the frame": frame + b"\x00\x01\x02\x03\x04\x05\x06\x07\x08",
        }
        for what, replacement in variants.items():
            out = run_pair(*cfgs, qkd, tamper=lambda i, s, f, r=replacement, k=index: r if i == k else f)
            _check_rejected(out, index, f"frame {index}: {what}", later_bytes=what.startswith("garbage"))
        for cut in (1, 7, 8, len(frame) // 2, len(frame) - 1):  # raw truncation, then the peer hangs up
            out = run_pair(*cfgs, qkd, tamper=lambda i, s, f, c=cut, k=index: f[:c] if i == k else f,
                           close_after=index)
            _check_rejected(out, index, f"frame {index}: cut at {cut} then EOF")
            errors = [e for e in (out.ini_error, out.res_error) if e is not None]
            assert any(isinstance(e, RemoteProtocolError) for e in errors)


def test_replayed_hello_yields_no_key(qkd):
    """A recorded Hello replayed to a fresh responder: it answers, but the recorded initiator
    Finished does not verify, so the responder never completes."""
    cfgs = configs()
    out = run_pair(*cfgs, qkd)
    assert out.ok
    hello = out.frames[0][1]
    final = out.frames[-1][1]
    res = Responder(cfgs[1], clock=clock)
    res.receive_data(hello)
    res.provide_qkd_keys(qkd.res.answer(res.next_event()))
    res.next_event()
    assert res.data_to_send()  # it answered with a fresh nonce, ML-KEM ciphertext and QKD key
    res.receive_data(final)
    with pytest.raises(AuthenticationError) as err:
        res.next_event()
    assert str(err.value) == "authentication failed"
    assert res.data_to_send()[3] == FrameType.ABORT


def test_replayed_response_to_a_new_initiator_is_rejected(qkd):
    cfgs = configs()
    out = run_pair(*cfgs, qkd)
    flight = b"".join(f for s, f in out.frames if s == "responder")
    ini = Initiator(cfgs[0], clock=clock)  # a new Hello: new nonce and keys
    ini.data_to_send()
    ini.receive_data(flight)
    with pytest.raises(AuthenticationError):
        ini.next_event()


def test_reflected_messages_are_rejected(qkd):
    cfgs = configs()
    # The initiator's own Hello sent back to it.
    ini = Initiator(cfgs[0], clock=clock)
    hello = ini.data_to_send()
    ini.receive_data(hello)
    with pytest.raises(RemoteProtocolError, match="unexpected HELLO"):
        ini.next_event()
    # The responder's own Finished sent back to it as if it were the initiator's.
    pair = ConnectionPair.create(*cfgs, qkd)
    res = pair.res
    res.receive_data(pair.ini.data_to_send())
    res.provide_qkd_keys(qkd.res.answer(res.next_event()))
    res.next_event()
    flight = res.data_to_send()
    finished = flight[flight.rindex(b"HK\x01\x04"):]
    res.receive_data(finished)
    with pytest.raises(AuthenticationError):
        res.next_event()
    # The responder's whole flight reflected to a fresh responder.
    other = Responder(cfgs[1], clock=clock)
    other.receive_data(flight)
    with pytest.raises(RemoteProtocolError, match="unexpected RESPONSE"):
        other.next_event()


def test_finished_from_another_session_is_rejected(qkd):
    """Two concurrent sessions: swapping their initiator Finished messages fails both."""
    cfgs = configs()
    a = ConnectionPair.create(*cfgs, qkd, seed=1).run()
    b_pair = ConnectionPair.create(*cfgs, qkd, seed=2)
    b_fin = a.frames[-1][1]
    out = b_pair.run(tamper=lambda i, s, f: b_fin if i == 3 else f)
    assert out.res_session is None and isinstance(out.res_error, AuthenticationError)


def test_no_key_material_in_any_error(qkd):
    """Error messages (and .detail) never contain key bytes."""
    cfgs = configs()
    out = run_pair(*cfgs, qkd, tamper=_mutate(3, 20, 0x55))
    ref = run_pair(*cfgs, qkd)
    assert out.res_error is not None
    text = str(out.res_error) + getattr(out.res_error, "detail", "")
    assert ref.ini_session.tls_psk().hex() not in text
    for e in (out.ini_error, out.res_error):
        assert e is None or isinstance(e, HybridKEXError)


def test_deterministic_initiator_reproduces_its_flight(qkd):
    """With injected randomness, the initiator's messages are a pure function of its inputs."""
    cfg = configs()[0]
    a = Initiator(cfg, randbytes=DeterministicRandom(9), clock=clock).data_to_send()
    b = Initiator(cfg, randbytes=DeterministicRandom(9), clock=clock).data_to_send()
    c = Initiator(cfg, randbytes=DeterministicRandom(10), clock=clock).data_to_send()
    assert a == b != c
    assert isinstance(HandshakeComplete, type)
