"""The initiator: opens the handshake with a Hello; the QKD slave unless configured as master."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from ..combiner import PartyView, QKDBinding, combine, encode_party
from ..exceptions import (
    AuthenticationError,
    KeyMismatchError,
    KeyUnavailableError,
    LocalProtocolError,
    PolicyViolation,
    RemoteProtocolError,
)
from ..hazmat import labels
from ..hazmat.kem import MLKEM, KEMPrivateKey
from ..policy import QKDMode
from ..qkd.base import QKDKey
from ..suites import Suite, suite_by_code
from . import _wire as w
from ._base import (
    _X25519,
    Connection,
    Role,
    _accepted_bits,
    _note_text,
    _peer_values,
    _pq_kem,
    _usage_code,
    _usage_name,
)
from ._config import InitiatorConfig
from ._state import INITIATOR, Input, State
from .auth import AuthContext, AuthMode, AuthOffer
from .events import HandshakeComplete, QKDKeysByIdRequired, QKDKeysRequired

__all__ = ["Initiator"]


class Initiator(Connection):
    """The side that opens the handshake.

    Construct it, send ``data_to_send()`` (the Hello, unless the first event is a
    :class:`QKDKeysRequired` because this side is the QKD master), then loop on ``next_event()``.

    Args:
        config: identity, authenticators, policy and QKD place.
        randbytes: source of random bytes (default ``os.urandom``).
        clock: seconds since the epoch (default ``time.time``), for certificate validity.

    Raises:
        PolicyViolation: no authentication mode can be offered to the expected responder (e.g. no
            recycled key and a retired bootstrap); nothing is sent and no QKD key is taken.
        StoreError: a recycled-key store could not be read.
    """

    _role: Role = "initiator"
    _table = INITIATOR

    def __init__(self, config: InitiatorConfig, *, randbytes: Callable[[int], bytes] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if not isinstance(config, InitiatorConfig):
            raise TypeError("Initiator needs an InitiatorConfig")
        super().__init__(config, State.START, randbytes, clock)
        self._cfg = config
        self._offered: tuple[Suite, ...] = config.policy.allowed_suites
        self._hello: w.HelloMsg | None = None
        self._x_priv: KEMPrivateKey | None = None
        self._pq_privs: dict[str, KEMPrivateKey] = {}
        self._master_keys: list[QKDKey] = []
        self._own_note = w.QKDNote.NONE if config.policy.uses_qkd else w.QKDNote.DISABLED_BY_POLICY
        self._own_note_text: str | None = None
        self._response: w.ResponseMsg | None = None
        self._binding: QKDBinding | None = None
        self._th_responder = b""
        self._confirm_responder = b""
        self._ss_x = self._ss_pq = b""  # X25519 and ML-KEM shared secrets, from the Response to combine()
        # Decided before any QKD key is taken: a side with nothing to offer fails without spending one.
        self._offers = self._make_offers()
        qkd = config.qkd
        qkd_suites = [s for s in self._offered if s.qkd]
        if qkd is not None and qkd.master == "initiator" and qkd_suites:
            bits = qkd_suites[0].qkd_key_bits
            assert qkd.peer_sae_id is not None
            self._request = QKDKeysRequired(qkd.peer_sae_id, bits // qkd.key_size_bits, qkd.key_size_bits,
                                            config.policy.key_budget.mode)
            self._move(Input.BEGIN, State.WAIT_MASTER_KEYS)
        else:
            self._send_hello()
            self._move(Input.BEGIN, State.WAIT_RESPONSE)

    def _offered_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._offered)

    def _make_offers(self) -> tuple[AuthOffer, ...]:
        """Ask each authenticator what it offers this peer (every one may veto a mode, e.g. a retired
        bootstrap); a keyed mode with no key only says "I recycle" and cannot be chosen alone."""
        cfg = self._cfg
        peer = cfg.peer_identity
        offers: list[AuthOffer] = []
        for a in cfg.authenticators:
            if not all(g.permits(a.mode, cfg.identity, peer) for g in cfg.authenticators):
                continue
            offer = a.offer(cfg.identity, peer)
            if offer is None:
                continue
            if offer.mode is not a.mode:
                raise LocalProtocolError(f"authenticator {a!r} offered mode {offer.mode.label}, not its own")
            offers.append(offer)
        if not any(o.usable for o in offers):
            hint = ("; recycled authentication holds no key for this peer and the bootstrap credential is "
                    "retired or refused by policy: re-bootstrap the pair on both sides (hybridkex recycle "
                    "rebootstrap)" if any(a.mode is AuthMode.RECYCLED for a in cfg.authenticators) else "")
            raise PolicyViolation(f"no authentication mode can be offered to {peer!r}{hint}", ("auth_mode",))
        return tuple(offers)

    def _drop_private_keys(self) -> None:
        self._x_priv = None
        self._pq_privs = {}
        self._master_keys = []
        self._ss_x = self._ss_pq = b""  # the decapsulated secrets, held only until combine()

    def _send_hello(self) -> None:
        cfg = self._cfg
        qkd = cfg.qkd
        rand = self._randbytes
        nonce = rand(w.NONCE_LEN)
        self._x_priv = _X25519.from_private_bytes(rand(32))
        shares: list[w.KeyShare] = []
        for s in self._offered:
            if s.pq_kem in self._pq_privs:
                continue
            kem = _pq_kem(s)
            # Derive ML-KEM keys from injected randomness (FIPS 203 seed d || z); others from the backend.
            priv = kem.from_seed(rand(64)) if isinstance(kem, MLKEM) else kem.generate()
            self._pq_privs[s.pq_kem] = priv
            shares.append(w.KeyShare(w.KEM_CODES[s.pq_kem], priv.public_bytes()))
        if any(s.qkd for s in self._offered):
            assert qkd is not None
            if qkd.master == "responder":
                hq = w.HelloQKD(w.QKDMaster.RESPONDER, qkd.sae_id, qkd.kme_id,
                                _accepted_bits(cfg.policy.key_budget.accepted_usages), w.QKDNote.NONE)
            else:
                assert qkd.peer_sae_id is not None
                hq = w.HelloQKD(w.QKDMaster.INITIATOR, qkd.sae_id, qkd.kme_id, 0, w.QKDNote.NONE,
                                qkd.peer_sae_id, _usage_code(cfg.policy.key_budget.mode),
                                tuple(k.key_id for k in self._master_keys))
        else:
            hq = w.HelloQKD(w.QKDMaster.NONE, "", "", 0, self._own_note)
        self._hello = w.HelloMsg(
            suites=tuple(s.code for s in self._offered),
            identity=cfg.identity,
            nonce=nonce,
            x25519=self._x_priv.public_bytes(),
            key_shares=tuple(shares),
            auth_modes=tuple(o.mode for o in self._offers),
            qkd=hq,
            recycled_key_ids=next((o.key_ids for o in self._offers if o.mode is AuthMode.RECYCLED), ()),
        )
        self._send(w.FrameType.HELLO, self._hello.encode())

    # QKD answers -----------------------------------------------------------------------------------

    def _on_keys(self, request: QKDKeysRequired | QKDKeysByIdRequired, keys: list[QKDKey]) -> None:
        if isinstance(request, QKDKeysRequired):  # we are master; keys for the Hello
            self._master_keys = keys
            self._send_hello()
            self._move(Input.QKD_KEYS, State.WAIT_RESPONSE)
        else:  # we are slave; the responder is authenticated already
            self._finish(b"".join(k.key for k in keys))

    def _on_unavailable(self, request: QKDKeysRequired | QKDKeysByIdRequired, reason: str) -> None:
        policy = self._cfg.policy
        if isinstance(request, QKDKeysRequired) and policy.qkd is QKDMode.OPTIONAL:
            self._offered = tuple(s for s in self._offered if not s.qkd)
            self._own_note = w.QKDNote.KEY_SOURCE_UNAVAILABLE
            self._own_note_text = (f"this side's key source was unavailable ({reason}); policy 'optional' "
                                   "offered only suites without QKD")
            self._send_hello()
            self._move(Input.QKD_UNAVAILABLE, State.WAIT_RESPONSE)
            return
        if isinstance(request, QKDKeysByIdRequired):
            raise KeyUnavailableError(f"QKD keys {', '.join(request.key_ids)} are unavailable ({reason}); the "
                                      "responder already committed to them, so this handshake cannot go on")
        raise KeyUnavailableError(f"QKD keys are unavailable ({reason}) and the policy requires them")

    # frames ------------------------------------------------------------------------------------------

    def _on_frame(self, inp: Input, body: bytes, th_before: bytes) -> None:
        if inp is Input.RECV_RESPONSE:
            self._on_response(body)
        elif inp is Input.RECV_CERTIFICATE:
            self._peer_certificate = w.CertificateMsg.decode(body)
            self._move(inp, State.WAIT_FINISHED)
        elif inp is Input.RECV_FINISHED:
            self._on_finished(body, th_before)

    def _on_response(self, body: bytes) -> None:
        msg = w.ResponseMsg.decode(body)
        hello = self._hello
        assert hello is not None and self._x_priv is not None
        suite = suite_by_code(msg.suite)
        if suite is None or suite not in self._offered:
            raise RemoteProtocolError(f"the responder chose suite 0x{msg.suite:04x}, which was not offered")
        if msg.auth_mode not in hello.auth_modes:
            raise RemoteProtocolError(f"the responder chose authentication mode {msg.auth_mode}, which was not offered")
        offer = next(o for o in self._offers if o.mode == msg.auth_mode)
        auth = offer.choose(msg.recycled_key_id)
        if auth is None:
            raise RemoteProtocolError("the responder named a recycled authentication key that was not offered"
                                      if msg.recycled_key_id is not None else
                                      "the responder named no recycled authentication key")
        self._suite, self._authenticator, self._response = suite, auth, msg
        expected = self._cfg.peer_identity
        if expected is not None and msg.identity != expected:
            raise AuthenticationError(f"identity mismatch: expected responder {expected!r}, it says {msg.identity!r}")
        auth.check_peer(msg.identity)
        kem = _pq_kem(suite)
        if len(msg.kem_ciphertext) != kem.ciphertext_size:
            raise RemoteProtocolError(f"{kem.name} ciphertext of {len(msg.kem_ciphertext)} bytes, "
                                      f"expected {kem.ciphertext_size}")
        q = msg.qkd
        if suite.qkd:
            if q.usage is w.QKDUsage.NONE:
                raise RemoteProtocolError("a QKD suite was chosen without QKD key information")
            if hello.qkd.master is w.QKDMaster.RESPONDER:
                if not q.key_ids:
                    raise RemoteProtocolError("the responder is QKD master but sent no key IDs")
                if _usage_name(q.usage) not in self._cfg.policy.key_budget.accepted_usages:
                    raise PolicyViolation(f"the responder used QKD key budget {_usage_name(q.usage)!r}, which this "
                                          "side's policy does not accept", ("key_budget",))
                self._binding = QKDBinding(key_ids=q.key_ids, master_sae_id=q.sae_id, slave_sae_id=hello.qkd.sae_id,
                                           master_kme_id=q.kme_id, slave_kme_id=hello.qkd.kme_id)
            else:
                if q.key_ids or q.usage is not hello.qkd.usage:
                    raise RemoteProtocolError("the responder changed the QKD keys this side (master) chose")
                self._binding = QKDBinding(key_ids=hello.qkd.key_ids, master_sae_id=hello.qkd.sae_id,
                                           slave_sae_id=q.sae_id, master_kme_id=hello.qkd.kme_id, slave_kme_id=q.kme_id)
        elif q.usage is not w.QKDUsage.NONE:
            raise RemoteProtocolError("QKD key information sent for a suite without QKD")
        x_priv = self._x_priv
        pq_priv = self._pq_privs[suite.pq_kem]
        self._ss_x = _peer_values(lambda: x_priv.decapsulate(msg.x25519), "X25519 public key")
        self._ss_pq = _peer_values(lambda: pq_priv.decapsulate(msg.kem_ciphertext), f"{kem.name} ciphertext")
        self._move(Input.RECV_RESPONSE, State.WAIT_CERTIFICATE if auth.sends_certificate else State.WAIT_FINISHED)

    def _on_finished(self, body: bytes, th_before: bytes) -> None:
        assert self._suite is not None and self._authenticator is not None and self._response is not None
        fin = w.FinishedMsg.decode(body, self._suite.hash_len)
        ctx = AuthContext(self._suite, "responder", self._response.identity, self._cfg.identity, self._now())
        # Authenticate the responder before spending a KME request on the key IDs it sent.
        self._authenticator.verify(ctx, th_before + fin.confirm, fin.proof, self._peer_certificate)
        self._th_responder, self._confirm_responder = th_before, fin.confirm
        hello = self._hello
        assert hello is not None
        if self._suite.qkd and hello.qkd.master is w.QKDMaster.RESPONDER:
            assert self._binding is not None
            self._request = QKDKeysByIdRequired(self._binding.master_sae_id, self._binding.key_ids,
                                                _usage_name(self._response.qkd.usage))
            self._move(Input.RECV_FINISHED, State.WAIT_SLAVE_KEYS)
            return
        self._finish(b"".join(k.key for k in self._master_keys) if self._suite.qkd else b"")

    def _finish(self, qkd_key: bytes) -> None:
        suite, msg, hello, auth = self._suite, self._response, self._hello, self._authenticator
        assert suite is not None and msg is not None and hello is not None and auth is not None
        ek = self._pq_privs[suite.pq_kem].public_bytes()
        ma = encode_party(suite, PartyView("initiator", hello.identity.encode(), hello.nonce, hello.x25519, ek),
                          self._binding)
        mb = encode_party(suite, PartyView("responder", msg.identity.encode(), msg.nonce, msg.x25519,
                                           msg.kem_ciphertext), self._binding)
        self._secret = combine(suite, qkd_key=qkd_key, x25519_secret=self._ss_x, pq_secret=self._ss_pq, ma=ma, mb=mb)
        self._ss_x = self._ss_pq = b""  # only the combined secret lives on
        expected = self._confirm(labels.CONFIRM_RESPONDER, self._th_responder)
        if not hmac.compare_digest(expected, self._confirm_responder):
            raise KeyMismatchError(
                "key confirmation failed: the authenticated responder derived a different key (the QKD keys "
                "delivered to the two sides for the same key IDs differ)" if suite.qkd else
                "key confirmation failed: the authenticated responder derived a different key")
        cert = auth.certificate() if auth.sends_certificate else None
        if cert is not None:
            self._send(w.FrameType.CERTIFICATE, cert.encode())
        th = self._th()
        confirm = self._confirm(labels.CONFIRM_INITIATOR, th)
        ctx = AuthContext(suite, "initiator", self._cfg.identity, msg.identity, self._now())
        self._send(w.FrameType.FINISHED, w.FinishedMsg(confirm, auth.prove(ctx, th + confirm)).encode())
        note = self._own_note_text
        if note is None:
            if self._own_note is w.QKDNote.DISABLED_BY_POLICY:
                note = "this side's policy disables QKD"
            elif msg.qkd.note is not w.QKDNote.NONE:
                note = _note_text(msg.qkd.note, "responder")
            else:
                note = "the responder chose a suite without QKD"
        usage = msg.qkd.usage if hello.qkd.master is w.QKDMaster.RESPONDER else hello.qkd.usage
        session = self._session(peer_identity=msg.identity, binding=self._binding, usage=usage, note=note,
                                offered_modes=hello.auth_modes)
        self._move(Input.QKD_KEYS if self._state is State.WAIT_SLAVE_KEYS else Input.RECV_FINISHED, State.COMPLETE)
        self._events.append(HandshakeComplete(session))
