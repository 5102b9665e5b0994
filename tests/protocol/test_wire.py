"""The wire format: strict framing, bounds before allocation, typed errors only."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridkex.exceptions import (
    AuthenticationError,
    HandshakeTimeout,
    KeyUnavailableError,
    LocalProtocolError,
    PolicyViolation,
    QKDKeyUnknownError,
    RateLimited,
    RemoteProtocolError,
    VersionError,
)
from hybridkex.protocol import AbortCode, Initiator, Responder, State
from hybridkex.protocol import _wire as w

from .helpers import QKDPair, clock, configs, run_pair

HEADER = struct.Struct(">2sBBI")


def _frame(ftype: int, body: bytes, *, version: int = 1, magic: bytes = b"HK", length: int | None = None) -> bytes:
    return HEADER.pack(magic, version, ftype, len(body) if length is None else length) + body


@pytest.fixture(scope="module")
def reference():
    """The frames of one real PSK handshake and one PKI handshake."""
    q = QKDPair.create()
    psk = run_pair(*configs(), q)
    pki = run_pair(*configs(auth="pki-hybrid"), q)
    assert psk.ok and pki.ok
    return {"psk": [f for _, f in psk.frames], "pki": [f for _, f in pki.frames]}


def test_unknown_version_is_a_version_error():
    res = Responder(configs()[1])
    res.receive_data(_frame(1, b"", version=2))
    with pytest.raises(VersionError):
        res.next_event()
    assert res.state is State.FAILED
    abort = res.data_to_send()
    assert abort == _frame(0x7F, bytes([AbortCode.UNSUPPORTED_VERSION]))


@pytest.mark.parametrize(("frame", "match"), [
    (_frame(1, b"", magic=b"\x16\x03"), "not speaking the hybridkex handshake"),
    (_frame(0x09, b""), "unknown frame type"),
    (_frame(1, b"", length=64 * 1024 + 1), "exceeds the maximum"),
    (_frame(0x7F, b"", length=2), "exceeds the maximum"),
    (_frame(4, b"x"), "unexpected FINISHED"),
])
def test_bad_headers_fail_before_the_body_arrives(frame, match):
    res = Responder(configs()[1])
    res.receive_data(frame[:8])  # only the header: the check must not wait for the body
    with pytest.raises(RemoteProtocolError, match=match):
        res.next_event()
    assert res.data_to_send()[3] == 0x7F


def test_after_failure_every_call_is_a_local_error():
    res = Responder(configs()[1])
    res.receive_data(b"XXXXXXXX")
    with pytest.raises(RemoteProtocolError):
        res.next_event()
    for call in (res.next_event, lambda: res.receive_data(b"x"), lambda: res.provide_qkd_keys([])):
        with pytest.raises(LocalProtocolError):
            call()


def test_buffer_is_bounded():
    res = Responder(configs()[1])
    with pytest.raises(RemoteProtocolError, match="more than"):
        res.receive_data(b"\x00" * (300 * 1024))


def test_eof_mid_message():
    res = Responder(configs()[1])
    res.receive_data(b"HK\x01\x01\x00\x00\x01\x00" + b"\x00" * 10)
    res.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed the connection"):
        res.next_event()


def test_bytes_wanted_tracks_the_frame_being_read():
    ini = Initiator(configs()[0], clock=clock)
    assert ini.bytes_wanted() == 8
    ini.receive_data(b"HK\x01")
    assert ini.bytes_wanted() == 5
    ini.receive_data(b"\x02\x00\x00\x01\x00")
    assert ini.bytes_wanted() == 256


@pytest.mark.parametrize(("code", "exc"), [
    (AbortCode.GENERIC, RemoteProtocolError),
    (AbortCode.DECODE_ERROR, RemoteProtocolError),
    (AbortCode.UNEXPECTED_MESSAGE, RemoteProtocolError),
    (AbortCode.UNSUPPORTED_VERSION, VersionError),
    (AbortCode.AUTHENTICATION_FAILED, AuthenticationError),
    (AbortCode.POLICY, PolicyViolation),
    (AbortCode.QKD_UNAVAILABLE, KeyUnavailableError),
    (AbortCode.TIMEOUT, HandshakeTimeout),
    (AbortCode.QKD_KEY_UNKNOWN, QKDKeyUnknownError),
    (AbortCode.RATE_LIMITED, RateLimited),
    (10, RemoteProtocolError),  # a code this version does not know counts as generic
    (200, RemoteProtocolError),
])
def test_peer_abort_becomes_a_typed_error_without_an_answer(code, exc):
    ini = Initiator(configs()[0], clock=clock)
    ini.data_to_send()
    ini.receive_data(_frame(0x7F, bytes([code])))
    with pytest.raises(exc) as err:
        ini.next_event()
    assert "aborted" in str(err.value) or str(err.value) == "authentication failed"
    assert ini.data_to_send() == b""  # no abort in reply to an abort
    assert ini.state is State.FAILED


def _decoders():
    return [
        ("hello", w.HelloMsg.decode),
        ("response", w.ResponseMsg.decode),
        ("certificate", w.CertificateMsg.decode),
        ("finished", lambda b: w.FinishedMsg.decode(b, 32)),
        ("abort", w.decode_abort),
    ]


def test_roundtrip(reference):
    for frames in reference.values():
        for frame in frames:
            body = frame[8:]
            t = frame[3]
            if t == 1:
                assert w.HelloMsg.decode(body).encode() == body
            elif t == 2:
                assert w.ResponseMsg.decode(body).encode() == body
            elif t == 3:
                assert w.CertificateMsg.decode(body).encode() == body
            elif t == 4:
                assert w.FinishedMsg.decode(body, 32).encode() == body


def test_every_truncation_and_extension_of_every_body_is_a_decode_error(reference):
    decoders = {1: w.HelloMsg.decode, 2: w.ResponseMsg.decode, 3: w.CertificateMsg.decode,
                4: lambda b: w.FinishedMsg.decode(b, 32)}
    for frames in reference.values():
        for frame in frames:
            body, decode = frame[8:], decoders[frame[3]]
            cuts = range(len(body)) if len(body) < 2000 else range(0, len(body), 7)
            for cut in cuts:
                with pytest.raises(RemoteProtocolError):
                    decode(body[:cut])
            with pytest.raises(RemoteProtocolError):
                decode(body + b"\x00")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), which=st.sampled_from(range(5)))
def test_random_bytes_only_ever_raise_remote_protocol_errors(data, which):
    _, decode = _decoders()[which]
    with contextlib.suppress(RemoteProtocolError):
        decode(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255),
       which=st.sampled_from([0, 1]))
def test_mutated_real_bodies_decode_or_raise_remote_protocol_errors(reference, position, value, which):
    frame = reference["psk"][which]
    body = bytearray(frame[8:])
    body[position % len(body)] = value
    decode = w.HelloMsg.decode if which == 0 else w.ResponseMsg.decode
    with contextlib.suppress(RemoteProtocolError):
        decode(bytes(body))


def test_field_bounds():
    ok = w.HelloMsg.decode(w.HelloMsg(
        (1,), "a", bytes(32), bytes(32), (w.KeyShare(1, b"k"),), (1,),
        w.HelloQKD(w.QKDMaster.NONE, "", "", 0, w.QKDNote.NONE)).encode())
    assert ok.identity == "a"
    bad = {
        "no suites": w.HelloMsg((), "a", bytes(32), bytes(32), (w.KeyShare(1, b"k"),), (1,), ok.qkd),
        "duplicate suite": w.HelloMsg((1, 1), "a", bytes(32), bytes(32), (w.KeyShare(1, b"k"),), (1,), ok.qkd),
        "empty identity": w.HelloMsg((1,), "", bytes(32), bytes(32), (w.KeyShare(1, b"k"),), (1,), ok.qkd),
        "duplicate share": w.HelloMsg((1,), "a", bytes(32), bytes(32), (w.KeyShare(1, b"k"),) * 2, (1,), ok.qkd),
        "qkd ids without master": w.HelloMsg((1,), "a", bytes(32), bytes(32), (w.KeyShare(1, b"k"),), (1,),
                                             w.HelloQKD(w.QKDMaster.NONE, "sae", "", 0, w.QKDNote.NONE)),
        "responder master without usages": w.HelloMsg(
            (1,), "a", bytes(32), bytes(32), (w.KeyShare(1, b"k"),), (1,),
            w.HelloQKD(w.QKDMaster.RESPONDER, "sae", "kme", 0, w.QKDNote.NONE)),
    }
    for what, msg in bad.items():
        with pytest.raises(RemoteProtocolError):
            w.HelloMsg.decode(msg.encode())
        assert what
    invalid_utf8 = bytearray(ok.encode())
    invalid_utf8[5] = 0xFF  # the identity's one byte (after count, suite code and length)
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        w.HelloMsg.decode(bytes(invalid_utf8))
    not_uuid = w.ResponseMsg(1, 1, "b", bytes(32), bytes(32), b"c",
                             w.ResponseQKD(w.QKDUsage.FRESH, w.QKDNote.NONE, "s", "k", ("x" * 36,)))
    with pytest.raises(RemoteProtocolError, match="UUID"):
        w.ResponseMsg.decode(not_uuid.encode())


def test_wrong_size_ml_kem_share_is_refused_even_if_not_chosen():
    """An offered ML-KEM-1024 share of the wrong size is refused although ML-KEM-768 would be chosen."""
    from hybridkex.protocol import _wire as wire

    ini = Initiator(configs()[0], clock=clock)
    hello = wire.HelloMsg.decode(ini.data_to_send()[8:])
    forged = wire.HelloMsg((*hello.suites, 0x0002), hello.identity, hello.nonce, hello.x25519,
                           (*hello.key_shares, wire.KeyShare(0x0002, b"\x00" * 100)), hello.auth_modes, hello.qkd)
    res = Responder(configs()[1], clock=clock)
    res.receive_data(wire.encode_frame(wire.FrameType.HELLO, forged.encode()))
    with pytest.raises(RemoteProtocolError, match="ML-KEM-1024 key share of 100 bytes"):
        res.next_event()


def test_qkd_master_zero_semantics_as_the_spec_states():
    """docs/spec.md 6.2: master 0 is valid without QKD suites, a decode error with a known QKD suite;
    master != 0 with only no-QKD suites is accepted (the QKD fields go unused)."""
    import dataclasses

    from .helpers import DeterministicRandom

    ini_cfg, res_cfg = configs(qkd="optional", res_qkd="optional")
    hello = w.HelloMsg.decode(Initiator(ini_cfg, randbytes=DeterministicRandom(3), clock=clock).data_to_send()[8:])
    assert hello.qkd.master is w.QKDMaster.RESPONDER and len(hello.suites) == 2
    no_qkd = 0x0003  # x25519-mlkem768-hkdfsha256
    cases = {
        "master 1, no QKD suite": (dataclasses.replace(hello, suites=(no_qkd,)), None),
        "master 0, no QKD suite": (dataclasses.replace(hello, suites=(no_qkd,),
                                                       qkd=w.HelloQKD(w.QKDMaster.NONE, "", "", 0,
                                                                      w.QKDNote.DISABLED_BY_POLICY)), None),
        "master 0, QKD suite": (dataclasses.replace(hello, qkd=w.HelloQKD(w.QKDMaster.NONE, "", "", 0,
                                                                          w.QKDNote.NONE)), RemoteProtocolError),
    }
    for name, (msg, error) in cases.items():
        res = Responder(res_cfg, randbytes=DeterministicRandom(4), clock=clock)
        res.receive_data(w.encode_frame(w.FrameType.HELLO, msg.encode()))
        if error is None:
            res.next_event()
            assert res.state is State.WAIT_FINISHED, name  # answered without QKD
        else:
            with pytest.raises(error, match="without QKD parameters"):
                res.next_event()
    bad_master = bytearray(w.encode_frame(w.FrameType.HELLO, hello.encode()))
    index = 8 + hello.encode().index(b"\x01" + b"\x00" + bytes([len(hello.qkd.sae_id)]) + hello.qkd.sae_id.encode())
    bad_master[index] = 3  # neither none, responder nor initiator
    with pytest.raises(RemoteProtocolError, match="qkd master"):
        w.HelloMsg.decode(bytes(bad_master[8:]))
