"""Full handshakes in memory: every suite available without liboqs, every authentication mode."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from hybridkex.protocol import HandshakeComplete, Initiator, Responder, State
from hybridkex.protocol._wire import FrameType
from hybridkex.suites import SUITES

from .helpers import INI_ID, INI_SAE, RES_ID, RES_SAE, ConnectionPair, configs, run_pair

AVAILABLE = [s for s in SUITES.values() if s.backend == "cryptography"]
AUTH_MODES = ["psk", "pki-ed25519", "pki-mldsa65", "pki-hybrid"]


def _check_agree(out):  # both sides hold the same keys and the same public facts
    assert out.ok, (out.ini_error, out.res_error)
    a, b = out.ini_session, out.res_session
    assert a.tls_psk() == b.tls_psk()
    assert a.tls_identity() == b.tls_identity()
    assert a.next_auth_key() == b.next_auth_key()
    assert a.exporter(b"app", 48, b"ctx") == b.exporter(b"app", 48, b"ctx")
    assert a.secret.equals(b.secret)
    assert a.info.transcript_hash == b.info.transcript_hash
    # All labelled outputs differ from each other.
    assert len({a.tls_psk()[:16], a.tls_identity(), a.next_auth_key()[:16], a.exporter(b"app", 16)}) == 4
    return a.info, b.info


@pytest.mark.parametrize("suite", AVAILABLE, ids=lambda s: s.name)
def test_every_suite(suite, qkd):
    ini, res = configs(suites=(suite.name,), qkd="required" if suite.qkd else "disabled")
    out = run_pair(ini, res, qkd if suite.qkd else None)
    ia, ra = _check_agree(out)
    assert ia.suite == ra.suite == suite.name
    assert len(out.ini_session.tls_psk()) == suite.hash_len
    names = [c.name for c in ia.components]
    assert set(names) == ({"QKD"} if suite.qkd else set()) | {"X25519", suite.pq_kem}
    # Components are listed in combiner order (etsi: QKD first; sp800-56c: ML-KEM first).
    assert names[0] == ("QKD" if suite.qkd and suite.ordering == "etsi" else
                        suite.pq_kem if suite.ordering == "sp800-56c" else "X25519")
    assert ia.qkd_used is ra.qkd_used is suite.qkd
    if suite.qkd:
        assert ia.qkd_usage == "fresh" and len(ia.qkd_key_ids) == 1
        assert ia.qkd_note is None
    else:
        assert ia.qkd_usage == "none" and ia.qkd_key_ids == ()
        assert ia.qkd_note == "this side's policy disables QKD"


@pytest.mark.parametrize("auth", AUTH_MODES)
def test_every_auth_mode(auth, qkd):
    ini, res = configs(auth=auth)
    out = run_pair(ini, res, qkd)
    ia, ra = _check_agree(out)
    assert ia.auth_mode == ra.auth_mode == auth
    assert (ia.role, ra.role) == ("initiator", "responder")
    assert (ia.local_identity, ia.peer_identity) == (INI_ID, RES_ID)
    assert (ra.local_identity, ra.peer_identity) == (RES_ID, INI_ID)
    # The responder is ETSI master by default and took the key for the initiator's SAE.
    assert (ia.master_sae_id, ia.slave_sae_id) == (RES_SAE, INI_SAE)
    assert (ia.master_kme_id, ia.slave_kme_id) == ("kme-server", "kme-client")
    assert ia.qkd_key_ids == ra.qkd_key_ids
    sent = [f for _, f in out.frames]
    assert ia.transcript_hash == hashlib.sha256(b"".join(sent)).hexdigest()
    types = [f[3] for f in sent]
    if auth == "psk":
        assert types == [FrameType.HELLO, FrameType.RESPONSE, FrameType.FINISHED, FrameType.FINISHED]
    else:
        assert types == [FrameType.HELLO, FrameType.RESPONSE, FrameType.CERTIFICATE, FrameType.FINISHED,
                         FrameType.CERTIFICATE, FrameType.FINISHED]


def test_initiator_as_etsi_master(qkd):
    ini, res = configs(master="initiator")
    out = run_pair(ini, res, qkd)
    ia, ra = _check_agree(out)
    assert (ia.master_sae_id, ia.slave_sae_id) == (INI_SAE, RES_SAE)
    assert (ra.master_kme_id, ra.slave_kme_id) == ("kme-client", "kme-server")
    assert qkd.ini.kme_takes == 1 and qkd.res.kme_fetches == 1
    assert qkd.res.kme_takes == 0 and qkd.ini.kme_fetches == 0


def test_qkd_key_made_of_several_kme_keys(qkd):
    """A KME limited to 128-bit keys: the 256-bit QKD component is two keys, both IDs bound."""
    ini, res = configs(key_size_bits=128)
    ia, ra = _check_agree(run_pair(ini, res, qkd))
    assert len(ia.qkd_key_ids) == 2 and ia.qkd_key_ids == ra.qkd_key_ids


def test_every_handshake_gives_new_keys(qkd):
    ini, res = configs()
    psks = {run_pair(ini, res, qkd, seed=i).ini_session.tls_psk() for i in range(3)}
    assert len(psks) == 3


def test_session_repr_and_info_hold_no_secret(qkd):
    ini, res = configs(auth="psk")
    out = run_pair(ini, res, qkd)
    s = out.ini_session
    secrets = [s.tls_psk(), s.next_auth_key(), s.tls_identity(), bytes(s.secret._secret)]
    text = repr(s) + str(s.info.as_dict()) + s.info.summary() + repr(out.res_session)
    for secret in secrets:
        assert secret.hex() not in text and repr(secret) not in text
    assert "redacted" in repr(s)
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_erase_drops_the_secret(qkd):
    from hybridkex.exceptions import AlreadyFinalized

    out = run_pair(*configs(), qkd)
    out.ini_session.erase()
    with pytest.raises(AlreadyFinalized):
        out.ini_session.tls_psk()
    assert out.res_session.tls_psk()  # the peer's copy is independent


def test_state_progression_and_events(qkd):
    ini_cfg, res_cfg = configs()
    ini, res = Initiator(ini_cfg), Responder(res_cfg)
    assert ini.state is State.WAIT_RESPONSE and res.state is State.WAIT_HELLO
    res.receive_data(ini.data_to_send())
    request = res.next_event()
    assert res.state is State.WAIT_MASTER_KEYS
    assert (request.slave_sae_id, request.number, request.size_bits, request.usage) == (INI_SAE, 1, 256, "fresh")
    from hybridkex.protocol import NEED_DATA, PAUSED

    assert res.next_event() is PAUSED  # each request is handed out once
    res.provide_qkd_keys(qkd.res.answer(request))
    assert res.next_event() is NEED_DATA and res.state is State.WAIT_FINISHED
    ini.receive_data(res.data_to_send())
    fetch = ini.next_event()
    assert ini.state is State.WAIT_SLAVE_KEYS and fetch.master_sae_id == RES_SAE
    ini.provide_qkd_keys(qkd.ini.answer(fetch))
    done = ini.next_event()
    assert isinstance(done, HandshakeComplete) and ini.state is State.COMPLETE
    res.receive_data(ini.data_to_send())
    assert isinstance(res.next_event(), HandshakeComplete)
    assert res.data_to_send() == b""  # the responder sends nothing after its Finished


def test_trailing_bytes_after_handshake_are_kept(qkd):
    """Bytes after the last handshake frame (e.g. a TLS ClientHello) stay for the next layer."""
    pair = ConnectionPair.create(*configs(), qkd)
    ini, res = pair.ini, pair.res
    res.receive_data(ini.data_to_send())
    res.provide_qkd_keys(qkd.res.answer(res.next_event()))
    res.next_event()
    ini.receive_data(res.data_to_send())
    ini.provide_qkd_keys(qkd.ini.answer(ini.next_event()))
    ini.next_event()
    res.receive_data(ini.data_to_send() + b"\x16\x03\x01next-layer")
    assert res.bytes_wanted() == 0  # the Finished is complete; nothing more is wanted
    assert isinstance(res.next_event(), HandshakeComplete)
    assert res.trailing_data == b"\x16\x03\x01next-layer"
    assert res.bytes_wanted() == 0


def test_offered_suites_are_reported(qkd):
    ini, res = configs(suites=("x25519-mlkem768-qkd-hkdfsha256", "x25519-mlkem1024-qkd-hkdfsha384"),
                       res_suites=("x25519-mlkem1024-qkd-hkdfsha384",))
    ia, ra = _check_agree(run_pair(ini, res, qkd))
    assert ia.suite == "x25519-mlkem1024-qkd-hkdfsha384"  # the responder's preference among the offer
    assert ia.offered_suites == ra.offered_suites == ("x25519-mlkem768-qkd-hkdfsha256",
                                                      "x25519-mlkem1024-qkd-hkdfsha384")


def _initiator_holds_no_secret(ini: Initiator) -> None:
    assert ini._ss_x == ini._ss_pq == b""
    assert ini._x_priv is None and ini._pq_privs == {} and ini._master_keys == []
    assert ini._secret is None


def test_the_initiator_drops_its_shared_secrets_after_success_and_after_failure(qkd):
    ini_cfg, res_cfg = configs()
    pair = ConnectionPair.create(ini_cfg, res_cfg, qkd)
    assert pair.ini._ss_x == pair.ini._ss_pq == b""  # declared from the start
    assert pair.run().ok
    _initiator_holds_no_secret(pair.ini)

    def flip_responder_finished(index: int, sender: str, frame: bytes) -> bytes:
        if sender == "responder" and frame[3] == FrameType.FINISHED:
            return frame[:-1] + bytes([frame[-1] ^ 1])
        return frame

    failing = ConnectionPair.create(*configs(), qkd)
    out = failing.run(tamper=flip_responder_finished)
    assert out.ini_error is not None  # it decapsulated both secrets, then the Finished failed
    assert failing.ini.state is State.FAILED
    _initiator_holds_no_secret(failing.ini)
