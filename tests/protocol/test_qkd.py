"""QKD paths: failing, misbehaving and disagreeing key sources; optional fallback; key budgets."""

from __future__ import annotations

import pytest

from hybridkex.exceptions import (
    AuthenticationError,
    InvalidKeyMaterial,
    KeyMismatchError,
    KeyReuseError,
    KeySourceError,
    KeyUnavailableError,
    KMEError,
    PolicyViolation,
    QKDKeyUnknownError,
)
from hybridkex.io import QKDKeyManager
from hybridkex.policy import KeyBudget
from hybridkex.protocol import QKDKeysByIdRequired, QKDKeysRequired
from hybridkex.qkd import QKDKey

from .helpers import INI_SAE, RES_SAE, QKDPair, configs, run_pair


def failing(exc: Exception):
    def answer(request):
        raise exc

    return answer


def test_required_qkd_and_the_kme_fails(qkd):
    out = run_pair(*configs(), qkd, res_keys=failing(KMEError("Error on server side.", status=503)))
    assert out.ini_session is None and out.res_session is None
    assert isinstance(out.res_error, KeyUnavailableError)
    assert "policy requires them" in str(out.res_error)
    assert isinstance(out.res_error.__cause__, KMEError)
    assert isinstance(out.ini_error, KeyUnavailableError)  # told by the peer's abort, without detail
    assert "Error on server side" not in str(out.ini_error)


def test_optional_qkd_falls_back_to_the_sibling_suite_and_says_so(qkd):
    ini, res = configs(qkd="optional")
    out = run_pair(ini, res, qkd, res_keys=failing(KeyUnavailableError("pool empty")))
    assert out.ok, (out.ini_error, out.res_error)
    a, b = out.ini_session.info, out.res_session.info
    assert a.suite == b.suite == "x25519-mlkem768-hkdfsha256"  # a distinct, domain-separated suite
    assert not a.qkd_used and not b.qkd_used and a.qkd_usage == "none"
    assert [c.name for c in a.components] == ["X25519", "ML-KEM-768"]
    assert b.qkd_note == ("this side's key source was unavailable (pool empty); policy 'optional' ran the "
                          "no-QKD suite x25519-mlkem768-hkdfsha256")
    assert a.qkd_note == "the responder's key source was unavailable and its policy allows running without QKD"
    assert a.offered_suites == ("x25519-mlkem768-qkd-hkdfsha256", "x25519-mlkem768-hkdfsha256")
    assert out.ini_session.tls_psk() == out.res_session.tls_psk()


def test_optional_responder_cannot_fall_back_when_the_initiator_requires_qkd(qkd):
    ini, res = configs(qkd="required", res_qkd="optional")
    out = run_pair(ini, res, qkd, res_keys=failing(KeyUnavailableError("pool empty")))
    assert isinstance(out.res_error, KeyUnavailableError)
    assert "initiator does not accept running without QKD" in str(out.res_error)
    assert isinstance(out.ini_error, KeyUnavailableError)


def test_qkd_required_by_responder_but_initiator_offers_none(qkd):
    ini, res = configs(qkd="disabled", res_qkd="required",
                       res_suites=("x25519-mlkem768-qkd-hkdfsha256",))
    out = run_pair(ini, res, qkd)
    assert isinstance(out.res_error, PolicyViolation) and out.res_error.violations == ("suite",)
    assert isinstance(out.ini_error, PolicyViolation)


def test_initiator_without_qkd_meets_optional_responder(qkd):
    ini, res = configs(qkd="disabled", res_qkd="optional")
    out = run_pair(ini, res, qkd)
    assert out.ok
    assert out.res_session.info.qkd_note == "the initiator's policy disables QKD"
    assert out.ini_session.info.qkd_note == "this side's policy disables QKD"


def test_slave_key_source_does_not_know_the_ids(qkd):
    # The initiator's KME has no such key (e.g. the key was already delivered once).
    out = run_pair(*configs(), qkd, ini_keys=failing(KeyUnavailableError("one or more keys specified are not "
                                                                         "found on KME")))
    assert isinstance(out.ini_error, KeyUnavailableError) and out.ini_session is None
    assert isinstance(out.res_error, KeyUnavailableError) and out.res_session is None


def test_slave_fetch_happens_only_after_the_responder_is_authenticated(qkd):
    calls = []

    def ini_keys(request):
        calls.append(request)
        return qkd.ini.answer(request)

    ini, res = configs(auth="psk")
    from hybridkex.protocol import PSKAuthenticator, ResponderConfig

    wrong = ResponderConfig(res.identity, (PSKAuthenticator({ini.identity: b"x" * 32}),), res.policy, res.qkd)
    out = run_pair(ini, wrong, qkd, ini_keys=ini_keys)
    assert isinstance(out.ini_error, AuthenticationError)
    assert calls == []  # no KME request was spent on an unauthenticated key ID


@pytest.mark.parametrize("side", ["responder", "initiator"])
def test_wrong_length_keys(side, qkd):
    def short(manager):
        def answer(request):
            return [QKDKey(k.key_id, k.key[:16]) for k in manager.answer(request)]
        return answer

    kwargs = {"res_keys": short(qkd.res)} if side == "responder" else {"ini_keys": short(qkd.ini)}
    out = run_pair(*configs(), qkd, **kwargs)
    mine, theirs = (out.res_error, out.ini_error) if side == "responder" else (out.ini_error, out.res_error)
    assert isinstance(mine, InvalidKeyMaterial)
    assert isinstance(theirs, KeyUnavailableError)  # the peer hears "QKD unavailable"
    assert out.ini_session is None and out.res_session is None


def test_keys_for_other_ids_are_refused(qkd):
    def other_ids(request):
        keys = qkd.ini.answer(request)
        return [QKDKey("00000000-0000-4000-8000-000000000000", keys[0].key)]

    out = run_pair(*configs(), qkd, ini_keys=other_ids)
    assert isinstance(out.ini_error, KeySourceError) and "other key IDs" in str(out.ini_error)


def test_wrong_number_of_keys_is_refused(qkd):
    out = run_pair(*configs(), qkd, res_keys=lambda r: qkd.res.answer(r) * 2)
    assert isinstance(out.res_error, KeySourceError)


@pytest.mark.parametrize("master", ["responder", "initiator"])
def test_different_key_bytes_fail_key_confirmation(master, qkd):
    """The KMEs deliver different bytes under the same key IDs: key confirmation catches it, no
    side ends up with a key the other does not have."""
    def flipped(manager):
        def answer(request):
            return [QKDKey(k.key_id, bytes(b ^ 1 for b in k.key)) for k in manager.answer(request)]
        return answer

    out = run_pair(*configs(master=master), qkd, ini_keys=flipped(qkd.ini))
    assert out.ini_session is None and out.res_session is None
    assert isinstance(out.ini_error, KeyMismatchError)
    assert "QKD keys delivered to the two sides" in str(out.ini_error)
    assert isinstance(out.res_error, AuthenticationError)  # the peer only learns "authentication failed"
    assert str(out.res_error) == "authentication failed"


def test_qkd_role_mismatch_is_a_policy_violation(qkd):
    ini, _ = configs(master="initiator")
    _, res = configs(master="responder")
    out = run_pair(ini, res, qkd)
    assert isinstance(out.res_error, PolicyViolation) and "role mismatch" in str(out.res_error)
    assert isinstance(out.ini_error, PolicyViolation)


def test_pinned_sae_id(qkd):
    from dataclasses import replace

    ini, res = configs()
    pinned = replace(res, peer_sae_ids={ini.identity: "sae-somebody-else"})
    out = run_pair(ini, pinned, qkd)
    assert isinstance(out.res_error, PolicyViolation) and "claims SAE" in str(out.res_error)
    assert qkd.res.kme_takes == 0  # refused before any key was taken
    ok = run_pair(ini, replace(res, peer_sae_ids={ini.identity: INI_SAE}), qkd)
    assert ok.ok


def test_initiator_master_fallback_when_optional(qkd):
    ini, res = configs(master="initiator", qkd="optional")
    out = run_pair(ini, res, qkd, ini_keys=failing(KMEError("Unauthorized.", status=401)))
    assert out.ok
    assert out.ini_session.info.suite == "x25519-mlkem768-hkdfsha256"
    assert out.ini_session.info.offered_suites == ("x25519-mlkem768-hkdfsha256",)
    assert "Unauthorized." in out.ini_session.info.qkd_note
    assert out.res_session.info.qkd_note == ("the initiator's key source was unavailable and its policy "
                                             "allows running without QKD")


def test_initiator_master_required_fails_before_hello(qkd):
    ini, res = configs(master="initiator")
    out = run_pair(ini, res, qkd, ini_keys=failing(KMEError("Unauthorized.", status=401)))
    assert isinstance(out.ini_error, KeyUnavailableError)
    assert out.frames == [("initiator", out.frames[0][1])] and out.frames[0][1][3] == 0x7F  # only an abort


# --- key budget ------------------------------------------------------------------------------------


def test_epoch_budget_takes_one_key_for_many_handshakes():
    budget = KeyBudget(mode="epoch", epoch_max_handshakes=3, epoch_max_age=None)
    q = QKDPair.create(budget)
    stock = q.link.stock()
    sessions = [run_pair(*configs(budget=budget), q, seed=i) for i in range(5)]
    assert all(s.ok for s in sessions)
    infos = [s.ini_session.info for s in sessions]
    assert all(i.qkd_usage == "epoch" for i in infos)
    assert len({i.qkd_key_ids for i in infos[:3]}) == 1 and infos[3].qkd_key_ids != infos[0].qkd_key_ids
    assert stock - q.link.stock() == 2  # 5 handshakes, epochs of 3: two QKD keys
    assert q.ini.kme_fetches == 2  # each key ID fetched from the KME once
    psks = {s.ini_session.tls_psk() for s in sessions}
    assert len(psks) == 5  # never two handshakes with one PSK
    assert all(s.ini_session.tls_psk() == s.res_session.tls_psk() for s in sessions)


def test_epoch_expires_by_age():
    now = [0.0]
    budget = KeyBudget(mode="epoch", epoch_max_handshakes=None, epoch_max_age=60.0)
    q = QKDPair.create(budget, clock=lambda: now[0])
    a = run_pair(*configs(budget=budget), q, seed=1)
    now[0] = 59.0
    b = run_pair(*configs(budget=budget), q, seed=2)
    now[0] = 61.0
    c = run_pair(*configs(budget=budget), q, seed=3)
    ids = [o.ini_session.info.qkd_key_ids for o in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]


def test_epoch_master_serves_fresh_only_peers_fresh_keys():
    budget = KeyBudget(mode="epoch")
    q = QKDPair.create(budget, ini_budget=KeyBudget())
    outs = [run_pair(*configs(budget=budget, ini_budget=KeyBudget()), q, seed=i) for i in range(3)]
    assert all(o.ok for o in outs)
    assert {o.res_session.info.qkd_usage for o in outs} == {"fresh"}
    assert len({o.res_session.info.qkd_key_ids for o in outs}) == 3


def test_slave_enforces_its_own_epoch_limit():
    """A master that keeps an epoch key longer than the slave allows is refused by the slave."""
    q = QKDPair.create(KeyBudget(mode="epoch", epoch_max_handshakes=10),
                       ini_budget=KeyBudget(mode="epoch", epoch_max_handshakes=2))
    cfgs = configs(budget=KeyBudget(mode="epoch", epoch_max_handshakes=10),
                   ini_budget=KeyBudget(mode="epoch", epoch_max_handshakes=2))
    assert run_pair(*cfgs, q, seed=1).ok and run_pair(*cfgs, q, seed=2).ok
    third = run_pair(*cfgs, q, seed=3)
    assert isinstance(third.ini_error, KeyUnavailableError)
    assert isinstance(third.ini_error.__cause__, KeyReuseError)


def test_key_manager_refuses_reuse_of_fresh_ids(qkd):
    first = run_pair(*configs(), qkd)
    key_ids = first.ini_session.info.qkd_key_ids
    with pytest.raises(KeyReuseError):  # refused locally, before asking the KME again
        qkd.ini.fetch(QKDKeysByIdRequired(RES_SAE, key_ids, "fresh"))
    assert qkd.ini.kme_fetches == 1


def test_key_manager_detects_a_source_that_repeats_ids(qkd):
    class Repeating:
        sae_id, kme_id = RES_SAE, "kme-server"

        def __init__(self):
            self.key = QKDKey("11111111-1111-4111-8111-111111111111", bytes(32))

        def get_keys(self, slave, number=1, size_bits=256):
            return [self.key]

        def get_keys_by_id(self, master, ids):
            raise AssertionError

        def status(self, slave):
            raise AssertionError

    m = QKDKeyManager(Repeating())
    request = QKDKeysRequired(INI_SAE, 1, 256, "fresh")
    m.take(request)
    with pytest.raises(KeyReuseError):
        m.take(request)


def test_fresh_manager_refuses_epoch_requests():
    m = QKDPair.create().ini
    with pytest.raises(PolicyViolation):
        m.fetch(QKDKeysByIdRequired(RES_SAE, ("11111111-1111-4111-8111-111111111111",), "epoch"))
    with pytest.raises(PolicyViolation):
        m.take(QKDKeysRequired(RES_SAE, 1, 256, "epoch"))


def test_epoch_budget_with_the_initiator_as_master():
    budget = KeyBudget(mode="epoch", epoch_max_handshakes=5)
    q = QKDPair.create(budget)
    outs = [run_pair(*configs(budget=budget, master="initiator"), q, seed=i) for i in range(3)]
    assert all(o.ok for o in outs)
    assert len({o.res_session.info.qkd_key_ids for o in outs}) == 1
    assert {o.res_session.info.qkd_usage for o in outs} == {"epoch"}
    assert q.ini.kme_takes == 1 and q.res.kme_fetches == 1
    assert len({o.ini_session.tls_psk() for o in outs}) == 3


def test_answering_with_garbage_fails_closed(qkd):
    from hybridkex.protocol import Responder

    res = Responder(configs()[1])
    from hybridkex.protocol import Initiator

    res.receive_data(Initiator(configs()[0]).data_to_send())
    res.next_event()
    with pytest.raises(KeySourceError, match="not a list of QKDKey"):
        res.provide_qkd_keys(None)  # type: ignore[arg-type]
    assert res.data_to_send() == b"HK\x01\x7f\x00\x00\x00\x01\x06"  # Abort(QKD unavailable)
    assert "FAILED" in repr(res)


# -- a key the slave's KME does not know (a KME restart): Abort QKD_KEY_UNKNOWN ----------------------


def _forgotten(qkd, manager):
    """A slave's key source after the KMEs forgot every undelivered key (a restart without --db)."""
    def answer(request):
        qkd.link.forget_pending()
        return manager.answer(request)

    return answer


@pytest.mark.parametrize("policy", ["required", "optional"])
def test_an_unknown_key_id_is_reported_to_the_master_in_the_abort(qkd, policy):
    ini, res = configs(qkd=policy)
    out = run_pair(ini, res, qkd, ini_keys=_forgotten(qkd, qkd.ini), res_keys=qkd.res.answer)
    # The slave (initiator) cannot fall back: the master has spent the key.  Its error names the keys.
    assert isinstance(out.ini_error, QKDKeyUnknownError) and not out.ini_error.reported_by_peer
    key_ids = out.ini_error.key_ids
    assert len(key_ids) == 1 and key_ids[0] in str(out.ini_error)
    abort = [frame for sender, frame in out.frames if sender == "initiator"][-1]
    assert abort == b"HK\x01\x7f\x00\x00\x00\x01\x08"  # Abort(QKD key unknown)
    # The master learns it from the Abort (typed, so it can drop its stale keys), nothing more.
    assert isinstance(out.res_error, QKDKeyUnknownError) and out.res_error.reported_by_peer
    assert out.res_error.key_ids == () and key_ids[0] not in str(out.res_error)


def test_an_unknown_key_id_at_a_slave_responder_is_reported_too(qkd):
    ini, res = configs(master="initiator")
    out = run_pair(ini, res, qkd, ini_keys=qkd.ini.answer, res_keys=_forgotten(qkd, qkd.res))
    assert isinstance(out.res_error, QKDKeyUnknownError) and not out.res_error.reported_by_peer
    assert isinstance(out.ini_error, QKDKeyUnknownError) and out.ini_error.reported_by_peer


def test_other_slave_failures_keep_the_qkd_unavailable_code(qkd):
    out = run_pair(*configs(), qkd, ini_keys=failing(KMEError("Error on server side.", status=503)),
                   res_keys=qkd.res.answer)
    assert isinstance(out.ini_error, KeyUnavailableError) and not isinstance(out.ini_error, QKDKeyUnknownError)
    assert [f for s, f in out.frames if s == "initiator"][-1] == b"HK\x01\x7f\x00\x00\x00\x01\x06"
    assert not isinstance(out.res_error, QKDKeyUnknownError)
