"""Recycled authentication with real crypto in memory: the ladder, 1000 handshakes, policies,
attackers who know the bootstrap PSK, replays, lost messages, the wire fields, hygiene."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from recyclehelpers import (
    INI_ID,
    PSK,
    RES_ID,
    ConnectionPair,
    DeterministicRandom,
    Initiator,
    Peers,
    QKDPair,
    Responder,
    clock,
    feed,
    recycled_configs,
)

from hybridkex.exceptions import (
    AuthenticationError,
    ConfigurationError,
    InvalidKeyMaterial,
    PolicyViolation,
    RemoteProtocolError,
    StoreError,
)
from hybridkex.hazmat.encoding import lp_join
from hybridkex.hazmat.kdf import hkdf
from hybridkex.protocol import AuthOffer, InitiatorConfig, PSKAuthenticator, Session
from hybridkex.protocol import _wire as w
from hybridkex.recycle import RecycledAuthenticator, RecycledKey, RecyclePolicy, SQLiteAuthKeyStore

HELLO, RESPONSE, FINISHED_R, FINISHED_I = range(4)


@pytest.fixture
def peers(tmp_path: Path):
    p = Peers.create(tmp_path)
    yield p
    p.close()


def _opaque(exc: BaseException | None) -> AuthenticationError:
    assert isinstance(exc, AuthenticationError), exc
    assert str(exc) == "authentication failed"
    return exc


def _warm_up(peers: Peers, n: int = 3) -> None:
    """Bootstrap, then n-1 recycled handshakes (the bootstrap is retired on both sides)."""
    for i in range(n):
        out = peers.handshake()
        assert out.ok, (out.ini_error, out.res_error)
        assert out.ini_session.info.auth_mode == ("psk" if i == 0 else "recycled")
    assert peers.ini_store.bootstrap_retired(INI_ID, RES_ID) and peers.res_store.bootstrap_retired(RES_ID, INI_ID)


def _rotations(peers: Peers) -> tuple[int, int]:
    return peers.ini_store.summaries()[0].rotations, peers.res_store.summaries()[0].rotations


# --- the ladder ------------------------------------------------------------------------------------


def test_thousand_recycled_handshakes_then_the_psk_is_deleted(peers: Peers) -> None:
    first = peers.handshake()
    assert first.ok and first.ini_session.info.auth_mode == first.res_session.info.auth_mode == "psk"
    assert first.ini_session.info.offered_auth_modes == ("recycled", "psk")
    expected = first.ini_session.next_auth_key_id()
    used: list[bytes] = []
    for n in range(1000):
        out = peers.handshake()
        assert out.ok, (out.ini_error, out.res_error)
        ini, res = out.ini_session.info, out.res_session.info
        assert ini.auth_mode == res.auth_mode == "recycled"
        assert ini.qkd_used and res.qkd_used  # the recycled keys come from QKD-mixed secrets
        # each handshake is authenticated by the key the previous one derived, on both sides
        assert bytes.fromhex(ini.auth_key_id) == bytes.fromhex(res.auth_key_id) == expected
        # retired by the first recycled success: from then on the PSK is not even offered
        assert ini.offered_auth_modes == (("recycled", "psk") if n == 0 else ("recycled",))
        used.append(expected)
        expected = out.ini_session.next_auth_key_id()
        assert expected == out.res_session.next_auth_key_id()
    assert len(set(used)) == 1000  # no key authenticated two handshakes
    for side, store, local, peer in (("initiator", peers.ini_store, INI_ID, RES_ID),
                                     ("responder", peers.res_store, RES_ID, INI_ID)):
        assert len(peers.key_ids(side)) == 2  # the two-key window, nothing accumulates
        assert all(store.is_spent(local, peer, k) for k in used[:-1])
        assert not store.is_spent(local, peer, used[-1])
    # The operator deletes the bootstrap PSK from both configurations: recycling carries on.
    ini_cfg, res_cfg = peers.configs(ini_psk=None, res_psk=None)
    for _ in range(5):
        out = peers.handshake(ini_cfg, res_cfg)
        assert out.ok and out.res_session.info.auth_mode == "recycled"
    # and the old PSK authenticates nobody any more
    psk_only = InitiatorConfig(INI_ID, (PSKAuthenticator({RES_ID: PSK}),), ini_cfg.policy, ini_cfg.qkd,
                               peer_identity=RES_ID)
    _opaque(peers.handshake(psk_only, peers.configs()[1], record=False).res_error)


def test_lost_final_messages_never_lock_out(peers: Peers) -> None:
    _warm_up(peers)
    held = set(peers.key_ids("responder"))
    drop_finished_i = lambda i, who, frame: b"" if i == FINISHED_I else frame  # noqa: E731
    for _ in range(12):
        out = peers.handshake(tamper=drop_finished_i)
        assert out.ini_session is not None and out.res_session is None  # the initiator rotated alone
        assert bytes.fromhex(out.ini_session.info.auth_key_id) in held
    assert set(peers.key_ids("responder")) == held
    ini_keys = peers.ini_store.keys(INI_ID, RES_ID)
    assert len(ini_keys) == 8  # bounded; the key the responder holds is kept (confirmed)
    assert [k.key_id for k in ini_keys if k.confirmed] == [ini_keys[-1].key_id] and ini_keys[-1].key_id in held
    out = peers.handshake()
    assert out.ok and bytes.fromhex(out.res_session.info.auth_key_id) in held


@pytest.mark.parametrize("grace", [60.0, 0.0])
def test_a_handshake_in_flight_survives_a_concurrent_rotation(tmp_path: Path, grace: float) -> None:
    """B builds its Hello with key K; meanwhile A uses K and C uses A's key, superseding K on both
    sides.  Within the grace period B still completes; with grace=0 it fails (and the next succeeds)."""
    peers = Peers.create(tmp_path, grace=grace)
    try:
        _warm_up(peers)
        ini_cfg, res_cfg = peers.configs()
        b_ini = Initiator(ini_cfg, randbytes=DeterministicRandom(500), clock=clock)
        k = peers.key_ids("initiator")[0]
        a, c = peers.handshake(), peers.handshake()
        assert bytes.fromhex(a.res_session.info.auth_key_id) == k and c.ok
        assert peers.res_store.is_spent(RES_ID, INI_ID, k)
        b_res = Responder(res_cfg, randbytes=DeterministicRandom(501), clock=clock)
        out = ConnectionPair(b_ini, b_res, peers.qkd.ini.answer, peers.qkd.res.answer).run()
        if grace:
            assert out.ok and bytes.fromhex(out.res_session.info.auth_key_id) == k
            for session, cfg in ((out.ini_session, ini_cfg), (out.res_session, res_cfg)):
                cfg.authenticators[0].after_handshake(session)  # a sibling of C's key; nothing breaks
        else:
            assert "no key in common" in _opaque(out.res_error).detail
        assert peers.handshake().ok
    finally:
        peers.close()


def test_the_newest_confirmed_key_is_always_offered(tmp_path: Path) -> None:
    """More keys than one Hello lists: the offer keeps the key the responder is known to hold."""
    peers = Peers.create(tmp_path, max_keys=12)
    try:
        peers.policy = "bootstrap-once"
        _warm_up(peers)
        ini_cfg, res_cfg = peers.configs()
        small = RecycledAuthenticator(peers.ini_store, RecyclePolicy(max_offered=3))
        ini_cfg = replace(ini_cfg, authenticators=(small, *ini_cfg.authenticators[1:]))
        for _ in range(9):
            out = peers.handshake(ini_cfg, res_cfg, tamper=lambda i, who, f: b"" if i == FINISHED_I else f)
            assert out.ini_session is not None
        offer = small.offer(INI_ID, RES_ID)
        assert len(offer.key_ids) == 3
        stored = peers.ini_store.keys(INI_ID, RES_ID)
        confirmed = next(k for k in stored if k.confirmed)
        assert confirmed.key_id == offer.key_ids[-1] and confirmed.key_id not in [k.key_id for k in stored[:2]]
        out = peers.handshake(ini_cfg, res_cfg)
        assert out.ok and bytes.fromhex(out.ini_session.info.auth_key_id) == confirmed.key_id
    finally:
        peers.close()


def test_a_peer_without_recycling_keeps_using_its_bootstrap(peers: Peers) -> None:
    """An initiator that does not offer the recycled mode: plain PSK, nothing stored or retired."""
    ini_cfg = recycled_configs(None, peers.res_store)[0]
    for _ in range(3):
        out = peers.handshake(ini_cfg, peers.configs()[1])
        assert out.ok and out.res_session.info.auth_mode == "psk"
    assert peers.key_ids("responder") == [] and peers.res_store.bootstrap_state(RES_ID, INI_ID) == "unknown"


# --- policies --------------------------------------------------------------------------------------


def test_bootstrap_once_refuses_the_psk_after_recycling_and_rebootstrap_restores_it(peers: Peers,
                                                                                   tmp_path: Path) -> None:
    _warm_up(peers)
    # The initiator lost its store (a new machine): it has only the bootstrap PSK to offer.
    fresh = SQLiteAuthKeyStore(tmp_path / "fresh.sqlite3")
    ini_cfg = recycled_configs(fresh, None)[0]
    out = peers.handshake(ini_cfg, peers.configs()[1])
    err = _opaque(out.res_error)
    assert "refused" in err.detail
    _opaque(out.ini_error)  # the peer learns only "authentication failed"
    # The operator re-bootstraps the pair on both sides.
    peers.res_store.rebootstrap(RES_ID, INI_ID)
    out = peers.handshake(ini_cfg, peers.configs()[1])
    assert out.ok and out.res_session.info.auth_mode == "psk"
    recycled = peers.handshake(ini_cfg, peers.configs()[1])
    assert recycled.ok and recycled.res_session.info.auth_mode == "recycled"
    fresh.close()


def test_recycled_with_fallback_accepts_the_bootstrap_later(tmp_path: Path) -> None:
    peers = Peers.create(tmp_path, policy="recycled-with-fallback")
    try:
        _warm_up(peers)
        fresh = SQLiteAuthKeyStore(tmp_path / "fresh.sqlite3")
        ini_cfg = recycled_configs(fresh, None, policy="recycled-with-fallback")[0]
        out = peers.handshake(ini_cfg, peers.configs()[1])
        assert out.ok and out.res_session.info.auth_mode == "psk"  # weaker, by choice
        # a recycled key in common still wins over the bootstrap
        again = peers.handshake()
        assert again.ok and again.res_session.info.auth_mode == "recycled"
        fresh.close()
    finally:
        peers.close()


def _cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybridkex", "recycle", "--store", str(store), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_rebootstrap_policy_needs_an_operator_for_every_bootstrap(tmp_path: Path) -> None:
    peers = Peers.create(tmp_path, policy="rebootstrap")
    try:
        with pytest.raises(PolicyViolation, match="re-bootstrap the pair"):
            Initiator(peers.configs()[0], clock=clock)  # unknown pair: nothing to offer, no QKD key spent
        # an initiator that may bootstrap meets a responder that was not armed
        out = peers.handshake(recycled_configs(peers.ini_store, None)[0], peers.configs()[1])
        assert "refused" in _opaque(out.res_error).detail
        for path, local, peer in ((tmp_path / "initiator.sqlite3", INI_ID, RES_ID),
                                  (tmp_path / "responder.sqlite3", RES_ID, INI_ID)):
            done = _cli(path, "rebootstrap", "--local", local, "--peer", peer)
            assert done.returncode == 0, done.stderr
        assert peers.handshake().res_session.info.auth_mode == "psk"
        assert peers.handshake().res_session.info.auth_mode == "recycled"
        assert peers.res_store.bootstrap_state(RES_ID, INI_ID) == "retired"
        assert peers.handshake().ini_session.info.offered_auth_modes == ("recycled",)
    finally:
        peers.close()


def test_policy_and_configuration_validation(tmp_path: Path) -> None:
    for bad in ({"bootstrap": "sometimes"}, {"max_offered": 0}, {"max_offered": 17}, {"max_offered": True}):
        with pytest.raises(ConfigurationError):
            RecyclePolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RecycledAuthenticator(SQLiteAuthKeyStore(tmp_path / "a.sqlite3"), "never")  # type: ignore[arg-type]
    store = SQLiteAuthKeyStore(tmp_path / "k.sqlite3")
    ini, _ = recycled_configs(store, None)
    with pytest.raises(ConfigurationError, match="must come first"):
        replace(ini, authenticators=tuple(reversed(ini.authenticators)))
    with pytest.raises(ConfigurationError, match="peer_identity"):
        Initiator(replace(ini, peer_identity=None), clock=clock)
    with pytest.raises(ConfigurationError):
        RecycledKey(INI_ID, RES_ID, b"short", bytes(32), 1)
    store.close()


# --- attackers who know the bootstrap PSK ----------------------------------------------------------


class _RecklessKey(RecycledKey):
    """An attacker's bound key: proves with whatever key it has and accepts any proof."""

    def verify(self, ctx, data, proof, certificate) -> None:  # type: ignore[no-untyped-def]
        return None


class _Reckless(RecycledAuthenticator):
    def offer(self, local_identity, peer_identity):  # type: ignore[no-untyped-def]
        held = self.store.keys(local_identity, peer_identity)
        return AuthOffer(self, [(k.key_id, _RecklessKey(local_identity, peer_identity, k.key_id, k.key, k.epoch))
                                for k in held])


def test_psk_attacker_as_initiator_is_refused(peers: Peers, tmp_path: Path) -> None:
    _warm_up(peers)
    before = _rotations(peers)
    res_cfg = peers.configs()[1]
    # 1. PSK only
    attacker = recycled_configs(None, None)[0]
    out = peers.handshake(attacker, res_cfg)
    assert "refused" in _opaque(out.res_error).detail
    # 2. the recycled mode with the real (public) key IDs seen in a Hello, keys it cannot know, and
    #    no scruples: it ignores the responder's proof and sends a Finished anyway
    forged_store = SQLiteAuthKeyStore(tmp_path / "attacker.sqlite3")
    for key_id in reversed(peers.key_ids("initiator")):
        forged_store.rotate(INI_ID, RES_ID, used_key_id=None, new_key_id=key_id, new_key=os.urandom(32))
    attacker = replace(recycled_configs(None, None)[0],
                       authenticators=(_Reckless(forged_store), PSKAuthenticator({RES_ID: PSK})))
    out = peers.handshake(attacker, res_cfg)
    assert out.ini_session is not None and out.res_session is None  # the attacker "completed", alone
    assert "does not verify" in _opaque(out.res_error).detail
    assert _rotations(peers) == before  # nothing was recorded for the attacker
    forged_store.close()
    assert peers.handshake().ok  # the real pair is unaffected


def test_psk_attacker_as_responder_is_refused(peers: Peers, tmp_path: Path) -> None:
    _warm_up(peers)
    before = _rotations(peers)
    ini_cfg = peers.configs()[0]
    # 1. PSK only: the initiator does not even offer it any more
    out = peers.handshake(ini_cfg, recycled_configs(None, None)[1])
    assert isinstance(out.res_error, PolicyViolation) and out.ini_session is None
    # 2. a man in the middle rewrites the Hello to offer the PSK mode: the initiator sees its own Hello
    def offer_psk(i: int, who: str, frame: bytes) -> bytes:
        if i != HELLO:
            return frame
        hello = w.HelloMsg.decode(frame[w.HEADER_LEN:])
        return w.encode_frame(w.FrameType.HELLO, replace(hello, auth_modes=(1,), recycled_key_ids=()).encode())
    out = peers.handshake(ini_cfg, recycled_configs(None, None)[1], tamper=offer_psk)
    assert isinstance(out.ini_error, RemoteProtocolError) and out.ini_session is None
    assert "mode 1, which was not offered" in str(out.ini_error)
    # 3. the recycled mode naming an offered key ID, with a key the attacker cannot know
    forged_store = SQLiteAuthKeyStore(tmp_path / "attacker.sqlite3")
    for key_id in reversed(peers.key_ids("responder")):
        forged_store.rotate(RES_ID, INI_ID, used_key_id=None, new_key_id=key_id, new_key=os.urandom(32))
    out = peers.handshake(ini_cfg, recycled_configs(None, forged_store)[1])
    assert "does not verify" in _opaque(out.ini_error).detail and out.ini_session is None
    assert _rotations(peers)[0] == before[0]
    forged_store.close()
    assert peers.handshake().ok


# --- replay and transcript binding -----------------------------------------------------------------


def test_replayed_recycled_transcripts_are_rejected(peers: Peers) -> None:
    _warm_up(peers)
    recorded = peers.handshake()
    assert recorded.ok
    frames = [f for _, f in recorded.frames]
    ini_cfg, res_cfg = peers.configs()
    before = _rotations(peers)
    # Replay Hello + the initiator's Finished to the responder at once: its key is still held, but the
    # responder's fresh nonce and ephemeral keys change the transcript, so the old Finished fails.
    res = Responder(res_cfg, randbytes=DeterministicRandom(99), clock=clock)
    sent, result = feed(res, frames[HELLO], peers.qkd)
    assert result is None and len(sent) == 2  # it answered
    _, result = feed(res, frames[FINISHED_I], peers.qkd)
    assert "does not verify" in _opaque(result).detail
    # Replay the responder's Response + Finished to a new initiator: its Hello differs, the MAC fails.
    ini = Initiator(ini_cfg, randbytes=DeterministicRandom(98), clock=clock)
    ini.data_to_send()
    _, result = feed(ini, frames[RESPONSE] + frames[FINISHED_R], peers.qkd)
    assert isinstance(result, AuthenticationError | RemoteProtocolError)
    assert _rotations(peers) == before
    # Once the pair moved on, the recorded Hello names only spent keys.  Within the grace period
    # (for handshakes in flight) the responder still answers, and the replayed Finished fails as above;
    # after it the replay is refused at the Hello, before any QKD key is spent.
    peers.handshake()
    peers.handshake()
    used = bytes.fromhex(recorded.ini_session.info.auth_key_id)
    assert peers.res_store.is_spent(RES_ID, INI_ID, used)
    res = Responder(res_cfg, randbytes=DeterministicRandom(97), clock=clock)
    feed(res, frames[HELLO], peers.qkd)
    _, result = feed(res, frames[FINISHED_I], peers.qkd)
    assert "does not verify" in _opaque(result).detail
    peers.clock.skew = 61.0
    takes = peers.qkd.res.kme_takes
    res = Responder(res_cfg, randbytes=DeterministicRandom(96), clock=clock)
    sent, result = feed(res, frames[HELLO], peers.qkd)
    assert "no key in common" in _opaque(result).detail
    assert [w.parse_header(f[: w.HEADER_LEN])[0] for f in sent] == [w.FrameType.ABORT]
    assert peers.qkd.res.kme_takes == takes
    assert _rotations(peers) == (before[0] + 2, before[1] + 2)


def test_the_key_lists_and_the_choice_are_authenticated(peers: Peers) -> None:
    _warm_up(peers)
    # Two keys are held: drop the newest from the Hello in transit; the responder picks the older one.
    out = peers.handshake(tamper=lambda i, who, f: f)
    assert out.ok
    lost = peers.handshake(tamper=lambda i, who, f: b"" if i == FINISHED_I else f)  # initiator holds 3 now
    assert lost.ini_session is not None

    def drop_newest(i: int, who: str, frame: bytes) -> bytes:
        if i != HELLO:
            return frame
        hello = w.HelloMsg.decode(frame[w.HEADER_LEN:])
        assert len(hello.recycled_key_ids) >= 2
        return w.encode_frame(w.FrameType.HELLO, replace(hello, recycled_key_ids=hello.recycled_key_ids[1:]).encode())
    out = peers.handshake(tamper=drop_newest)
    assert "does not verify" in _opaque(out.ini_error).detail  # the responder's MAC covers the altered Hello

    def rename_key(i: int, who: str, frame: bytes) -> bytes:
        if i != RESPONSE:
            return frame
        msg = w.ResponseMsg.decode(frame[w.HEADER_LEN:])
        return w.encode_frame(w.FrameType.RESPONSE, replace(msg, recycled_key_id=bytes(16)).encode())
    out = peers.handshake(tamper=rename_key)
    assert isinstance(out.ini_error, RemoteProtocolError) and "not offered" in str(out.ini_error)
    assert peers.handshake().ok


def test_recycled_proof_matches_the_specification(peers: Peers) -> None:
    """Recompute the responder's proof from docs/spec.md section 11 (labels, key ID as context)."""
    _warm_up(peers)
    key = peers.res_store.keys(RES_ID, INI_ID)[0]
    out = peers.handshake()
    assert bytes.fromhex(out.res_session.info.auth_key_id) == key.key_id
    frames = [f for _, f in out.frames]
    import hashlib
    import hmac
    th_r = hashlib.sha256(frames[HELLO] + frames[RESPONSE]).digest()
    fin = w.FinishedMsg.decode(frames[FINISHED_R][w.HEADER_LEN:], 32)
    suite = b"x25519-mlkem768-qkd-hkdfsha256"
    mac_key = hkdf("sha256", salt=b"hybridkex/v1 recycled authentication", ikm=key.key,
                   info=lp_join(b"hybridkex/v1", suite, b"recycled auth responder", key.key_id), length=32)
    assert hmac.compare_digest(fin.proof, hmac.digest(mac_key, th_r + fin.confirm, "sha256"))
    hello = w.HelloMsg.decode(frames[HELLO][w.HEADER_LEN:])
    assert hello.auth_modes == (5,) and key.key_id in hello.recycled_key_ids
    assert w.ResponseMsg.decode(frames[RESPONSE][w.HEADER_LEN:]).recycled_key_id == key.key_id


def test_wire_fields_are_strict() -> None:
    qkd = w.HelloQKD(w.QKDMaster.NONE, "", "", 0, w.QKDNote.NONE)

    def hello(modes: tuple[int, ...], ids: tuple[bytes, ...]) -> w.HelloMsg:
        return w.HelloMsg((1,), "a", bytes(32), bytes(32), (w.KeyShare(1, b"k"),), modes, qkd, ids)

    plain = hello((1,), ())
    assert w.HelloMsg.decode(plain.encode()) == plain
    assert w.HelloMsg.decode(hello((5, 1), ()).encode()).recycled_key_ids == ()
    ids = tuple(bytes([i]) * 16 for i in range(16))
    assert w.HelloMsg.decode(hello((5,), ids).encode()).recycled_key_ids == ids
    with pytest.raises(ValueError):
        hello((1,), ids[:1]).encode()  # key IDs without the mode
    body = bytearray(hello((5,), ids[:2]).encode())
    body[-33] = 17  # the count says more IDs than follow
    with pytest.raises(RemoteProtocolError):
        w.HelloMsg.decode(bytes(body))
    dup = hello((5,), ids[:1]).encode()[:-17] + b"\x02" + ids[0] * 2
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        w.HelloMsg.decode(dup)
    too_many = hello((5,), ()).encode()[:-1] + b"\x11" + b"".join(bytes([i]) * 16 for i in range(17))
    with pytest.raises(RemoteProtocolError, match="at most 16"):
        w.HelloMsg.decode(too_many)
    rq = w.ResponseQKD(w.QKDUsage.NONE, w.QKDNote.NONE, "", "", ())
    resp = w.ResponseMsg(1, 5, "b", bytes(32), bytes(32), b"c", rq, ids[3])
    assert w.ResponseMsg.decode(resp.encode()) == resp
    with pytest.raises(RemoteProtocolError):
        w.ResponseMsg.decode(resp.encode()[:-17] + b"\x02" + ids[3] + ids[4])
    with pytest.raises(RemoteProtocolError):
        w.ResponseMsg.decode(replace(resp, auth_mode=1, recycled_key_id=None).encode() + b"\x00")


# --- hygiene ---------------------------------------------------------------------------------------


def test_key_material_never_appears_in_logs_reprs_or_errors(peers: Peers, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: set[bytes] = set()
    texts: list[str] = []
    sessions: list[Session] = []
    secrets.add(PSK)
    for _ in range(4):
        out = peers.handshake()
        assert out.ok
        sessions += [out.ini_session, out.res_session]
        secrets.update((out.ini_session.next_auth_key(), out.ini_session.tls_psk()))
        for store, local, peer in ((peers.ini_store, INI_ID, RES_ID), (peers.res_store, RES_ID, INI_ID)):
            keys = store.keys(local, peer)
            secrets.update(k.key for k in keys)
            texts += [repr(keys), repr(store.summaries()), repr(store.audit_log(local, peer)), repr(store)]
    assert any("stored next key" in r.getMessage() for r in caplog.records)  # rotations are logged...
    ini_cfg, res_cfg = peers.configs()
    auth = ini_cfg.authenticators[0]
    assert isinstance(auth, RecycledAuthenticator)
    offer = auth.offer(INI_ID, RES_ID)
    bound = offer.choose(offer.key_ids[0])
    texts += [repr(auth), repr(offer), repr(bound), repr(ini_cfg), repr(res_cfg), str(bound)]
    for s in sessions:
        texts += [repr(s), str(s.info.as_dict()), s.info.summary()]
    with pytest.raises(TypeError):
        __import__("pickle").dumps(bound)
    # errors: a wrong recycled key, a store that cannot be opened, a colliding key ID
    wrong = SQLiteAuthKeyStore(tmp_path / "wrong.sqlite3")
    for key_id in reversed(peers.key_ids("responder")):
        wrong.rotate(RES_ID, INI_ID, used_key_id=None, new_key_id=key_id, new_key=os.urandom(32))
    out = peers.handshake(ini_cfg, recycled_configs(None, wrong)[1])
    errors: list[BaseException] = [out.ini_error, out.res_error]
    with pytest.raises(StoreError) as store_err:
        SQLiteAuthKeyStore(tmp_path)  # a directory
    errors.append(store_err.value)
    with pytest.raises(InvalidKeyMaterial) as collide:
        k = peers.ini_store.keys(INI_ID, RES_ID)[0]
        peers.ini_store.rotate(INI_ID, RES_ID, used_key_id=None, new_key_id=k.key_id, new_key=k.key)
    errors.append(collide.value)
    for e in errors:
        assert e is not None
        texts += [str(e), repr(e), getattr(e, "detail", "")]
    texts += [r.getMessage() for r in caplog.records]
    texts += [_cli(tmp_path / "initiator.sqlite3", "list").stdout,
              _cli(tmp_path / "responder.sqlite3", "audit", "--local", RES_ID, "--peer", INI_ID).stdout]
    blob = "\n".join(texts)
    assert "redacted" in blob and len(secrets) >= 8
    for key in secrets:
        assert key.hex() not in blob and key.hex().upper() not in blob and repr(key)[2:-1] not in blob
    wrong.close()


def test_the_sync_driver_records_rotations(tmp_path: Path) -> None:
    """run_initiator / run_responder rotate both stores after a loopback handshake."""
    from recyclehelpers import loopback_pair

    qkd = QKDPair.create()
    ini_store, res_store = SQLiteAuthKeyStore(tmp_path / "i.sqlite3"), SQLiteAuthKeyStore(tmp_path / "r.sqlite3")
    ini_cfg, res_cfg = recycled_configs(ini_store, res_store)
    modes = []
    for _ in range(3):
        ini, res = loopback_pair(ini_cfg, res_cfg, qkd)
        assert isinstance(ini, Session) and isinstance(res, Session), (ini, res)
        modes.append(res.info.auth_mode)
        assert ini.next_auth_key_id() in [k.key_id for k in res_store.keys(RES_ID, INI_ID)]
    assert modes == ["psk", "recycled", "recycled"]
    assert ini_store.summaries()[0].rotations == res_store.summaries()[0].rotations == 3
    ini_store.close()
    res_store.close()


def test_a_broken_store_fails_closed(peers: Peers, tmp_path: Path) -> None:
    _warm_up(peers)
    takes = peers.qkd.res.kme_takes
    broken = SQLiteAuthKeyStore(tmp_path / "broken.sqlite3")
    broken.close()  # every later read or write fails
    out = peers.handshake(peers.configs()[0], recycled_configs(None, broken)[1])
    assert isinstance(out.res_error, StoreError) and out.ini_session is None and out.res_session is None
    assert peers.qkd.res.kme_takes == takes  # refused on the Hello, before any QKD key
    with pytest.raises(StoreError):
        Initiator(recycled_configs(broken, None)[0], clock=clock)
    assert peers.handshake().ok


@pytest.mark.parametrize("write_behind", [True, False])
def test_a_failed_rotation_keeps_the_pair_on_its_keys(tmp_path: Path, write_behind: bool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """If recording the rotation fails, the store rolls back and the pair goes on with its keys.
    Write-behind: the handshake has succeeded already; the failure is logged in one line and raised
    by flush().  Without write-behind (the blocking driver): the caller gets the error, not a session."""
    from recyclehelpers import loopback_pair

    def refuse(stage: str) -> None:
        if stage == "before-commit":
            raise StoreError("disk full (simulated)")

    qkd = QKDPair.create()
    path = tmp_path / "i.sqlite3"
    res_store = SQLiteAuthKeyStore(tmp_path / "r.sqlite3")
    good = SQLiteAuthKeyStore(path)
    ini_cfg, res_cfg = recycled_configs(good, res_store)
    loopback_pair(ini_cfg, res_cfg, qkd)
    before = good.keys(INI_ID, RES_ID)
    failing = SQLiteAuthKeyStore(path, crash_hook=refuse, write_behind=write_behind)
    with caplog.at_level(logging.ERROR, logger="hybridkex.recycle"):
        ini, res = loopback_pair(recycled_configs(failing, res_store)[0], res_cfg, qkd)
        if write_behind:
            assert isinstance(ini, Session) and isinstance(res, Session)
            with pytest.raises(StoreError, match="disk full"):
                failing.flush()
            failing.flush()  # reported once
            [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert "1 of 1 rotations not recorded" in line and "keep their current keys" in line
        else:
            assert isinstance(ini, StoreError) and isinstance(res, Session)
    assert good.keys(INI_ID, RES_ID) == failing.keys(INI_ID, RES_ID) == before  # rolled back
    ini, res = loopback_pair(ini_cfg, res_cfg, qkd)
    assert isinstance(ini, Session) and isinstance(res, Session) and res.info.auth_mode == "recycled"
    for s in (good, failing, res_store):
        s.close()


def test_a_pki_bootstrap_is_retired_like_a_psk(peers: Peers) -> None:
    """Certificates bootstrap the pair; afterwards no Certificate is sent and certificates are refused."""
    from protocol.helpers import authenticators

    ini_cfg, res_cfg = peers.configs(ini_psk=None, res_psk=None)
    ini_cfg = replace(ini_cfg, authenticators=(*ini_cfg.authenticators, *authenticators("pki-ed25519", "initiator")))
    res_cfg = replace(res_cfg, authenticators=(*res_cfg.authenticators, *authenticators("pki-ed25519", "responder")))
    first = peers.handshake(ini_cfg, res_cfg)
    assert first.ok and first.res_session.info.auth_mode == "pki-ed25519"
    assert w.FrameType.CERTIFICATE in [w.parse_header(f[: w.HEADER_LEN])[0] for _, f in first.frames]
    second = peers.handshake(ini_cfg, res_cfg)
    assert second.ok and second.res_session.info.auth_mode == "recycled" and len(second.frames) == 4
    # a holder of a valid certificate (say, a compromised CA) no longer gets in
    pki_only = replace(ini_cfg, authenticators=ini_cfg.authenticators[1:])
    out = peers.handshake(pki_only, res_cfg)
    assert "refused" in _opaque(out.res_error).detail
