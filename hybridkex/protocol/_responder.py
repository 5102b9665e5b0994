"""The responder: answers a Hello, chooses suite and authentication, the QKD master by default."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from ..combiner import PartyView, QKDBinding, combine, encode_party
from ..exceptions import (
    AuthenticationError,
    InvalidKeyMaterial,
    KeyMismatchError,
    KeyUnavailableError,
    LocalProtocolError,
    PolicyViolation,
    RemoteProtocolError,
)
from ..hazmat import labels
from ..hazmat.kem import KEM
from ..policy import QKDMode
from ..qkd.base import QKDKey
from ..suites import Suite, suite_by_code
from . import _wire as w
from ._base import (
    _X25519,
    Connection,
    Role,
    _accepted_names,
    _mode_names,
    _note_text,
    _peer_values,
    _pq_kem,
    _share_size,
    _usage_code,
    _usage_name,
)
from ._config import ResponderConfig
from ._state import RESPONDER, Input, State
from .auth import AuthContext, Authenticator, AuthMode
from .events import HandshakeComplete, QKDKeysByIdRequired, QKDKeysRequired

__all__ = ["Responder"]


class Responder(Connection):
    """The side that answers a Hello.

    Construct it, feed it the peer's bytes, loop on ``next_event()``, answering QKD requests and
    sending ``data_to_send()`` after every call, until :class:`HandshakeComplete`.
    """

    _role: Role = "responder"
    _table = RESPONDER

    def __init__(self, config: ResponderConfig, *, randbytes: Callable[[int], bytes] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if not isinstance(config, ResponderConfig):
            raise TypeError("Responder needs a ResponderConfig")
        super().__init__(config, State.WAIT_HELLO, randbytes, clock)
        self._cfg = config
        self._hello: w.HelloMsg | None = None
        self._share = b""
        self._candidates: list[Suite] = []
        self._note = w.QKDNote.NONE
        self._note_text: str | None = None
        self._binding: QKDBinding | None = None
        self._usage = w.QKDUsage.NONE
        # Hazmat, for known-answer vectors only: set by hybridkex.hazmat.deterministic, never by a
        # driver. None means the KEM's own randomised encapsulation.
        self._encapsulate_with: Callable[[str, bytes], tuple[bytes, bytes]] | None = None

    def _offered_names(self) -> tuple[str, ...]:
        assert self._hello is not None
        return tuple(s.name if (s := suite_by_code(c)) else f"0x{c:04x}" for c in self._hello.suites)

    def _on_frame(self, inp: Input, body: bytes, th_before: bytes) -> None:
        if inp is Input.RECV_HELLO:
            self._on_hello(body)
        elif inp is Input.RECV_CERTIFICATE:
            self._peer_certificate = w.CertificateMsg.decode(body)
            self._move(inp, State.WAIT_FINISHED)
        elif inp is Input.RECV_FINISHED:
            self._on_finished(body, th_before)

    def _on_hello(self, body: bytes) -> None:
        hello = w.HelloMsg.decode(body)
        self._hello = hello
        cfg = self._cfg
        policy = cfg.policy
        auth = self._select_authenticator(hello)
        self._authenticator = auth
        auth.check_peer(hello.identity)  # unknown peers are refused before any QKD key is spent
        if cfg.admit is not None:
            cfg.admit(hello.identity)  # e.g. a per-peer rate limit: refused before any key is spent
        shares = {s.kem_code: s.public_key for s in hello.key_shares}
        for code, share in shares.items():
            size = _share_size(code)
            if size is not None and len(share) != size:
                raise RemoteProtocolError(f"{w.KEM_BY_CODE[code]} key share of {len(share)} bytes, expected {size}")
        offered = {suite_by_code(c) for c in hello.suites} - {None}
        for s in offered:
            assert s is not None
            if w.KEM_CODES.get(s.pq_kem) not in shares:
                raise RemoteProtocolError(f"no key share for offered suite {s.name}")
        if any(s is not None and s.qkd for s in offered) and hello.qkd.master is w.QKDMaster.NONE:
            raise RemoteProtocolError("QKD suites offered without QKD parameters")
        candidates = [s for s in policy.allowed_suites if s.code in hello.suites]
        qkd_ok = policy.uses_qkd and cfg.qkd is not None
        if not qkd_ok:
            candidates = [s for s in candidates if not s.qkd]
        elif any(s.qkd for s in candidates):
            self._check_qkd_hello(hello)
        if not candidates:
            raise PolicyViolation("no suite acceptable to both sides (this side requires QKD)"
                                  if policy.qkd is QKDMode.REQUIRED and any(not s.qkd for s in offered if s)
                                  else "no suite acceptable to both sides", ("suite",))
        self._candidates = candidates
        suite = candidates[0]
        self._suite = suite
        kem = _pq_kem(suite)
        share = shares[w.KEM_CODES[suite.pq_kem]]
        if len(share) != kem.public_key_size:
            raise RemoteProtocolError(f"{kem.name} key share of {len(share)} bytes, expected {kem.public_key_size}")
        self._share = share
        if not suite.qkd:
            if not qkd_ok:
                self._note = w.QKDNote.DISABLED_BY_POLICY
                self._note_text = "this side's policy disables QKD"
            elif any(s.qkd for s in candidates):
                self._note_text = "this side's suite preference put a suite without QKD first"
            else:
                self._note_text = _note_text(hello.qkd.note, "initiator")
            self._send_flight(b"")
            return
        qkd = cfg.qkd
        assert qkd is not None
        if hello.qkd.master is w.QKDMaster.RESPONDER:
            accepted = _accepted_names(hello.qkd.accepted_usages)
            mode = policy.key_budget.mode
            usage = mode if mode in accepted else "fresh"
            if usage not in accepted:
                raise PolicyViolation("the initiator accepts no QKD key budget this side offers", ("key_budget",))
            self._usage = _usage_code(usage)
            self._request = QKDKeysRequired(hello.qkd.sae_id, suite.qkd_key_bits // qkd.key_size_bits,
                                            qkd.key_size_bits, usage)
            self._move(Input.RECV_HELLO, State.WAIT_MASTER_KEYS)
        else:
            self._usage = hello.qkd.usage
            self._request = QKDKeysByIdRequired(hello.qkd.sae_id, hello.qkd.key_ids, _usage_name(hello.qkd.usage))
            self._move(Input.RECV_HELLO, State.WAIT_SLAVE_KEYS)

    def _select_authenticator(self, hello: w.HelloMsg) -> Authenticator:
        """The first of this side's modes that the Hello offers, this side permits for the peer and
        that can serve it (a recycled key in common).  Before any QKD key is spent."""
        cfg = self._cfg
        common = [a for a in cfg.authenticators if a.mode in hello.auth_modes]
        if not common:
            raise PolicyViolation("no authentication mode acceptable to both sides (offered: "
                                  f"{', '.join(_mode_names(hello.auth_modes))})", ("auth_mode",))
        reasons: list[str] = []
        for a in common:
            if not all(g.permits(a.mode, cfg.identity, hello.identity) for g in cfg.authenticators):
                reasons.append(f"{a.mode.label} is refused for this peer by policy")
                continue
            chosen = a.accept(cfg.identity, hello.identity,
                              hello.recycled_key_ids if a.mode is AuthMode.RECYCLED else ())
            if chosen is None:
                reasons.append(f"{a.mode.label} holds no key in common with the peer")
                continue
            if chosen.mode is not a.mode:
                raise LocalProtocolError(f"authenticator {a!r} accepted with mode {chosen.mode.label}")
            return chosen
        # Deliberately the generic authentication failure: the peer learns nothing about which keys
        # this side holds or whether its bootstrap is retired.
        raise AuthenticationError(f"no offered authentication mode is usable for {hello.identity!r}: "
                                  + "; ".join(reasons))

    def _check_qkd_hello(self, hello: w.HelloMsg) -> None:
        qkd = self._cfg.qkd
        assert qkd is not None
        hq = hello.qkd
        wanted = w.QKDMaster.RESPONDER if qkd.master == "responder" else w.QKDMaster.INITIATOR
        if hq.master is not wanted:
            raise PolicyViolation(f"QKD role mismatch: this side is configured with the {qkd.master} as ETSI 014 "
                                  "master, the initiator with the other side", ("qkd.master",))
        pinned = self._cfg.peer_sae_ids.get(hello.identity)
        if pinned is not None and pinned != hq.sae_id:
            raise PolicyViolation(f"initiator {hello.identity!r} claims SAE {hq.sae_id!r}, configured {pinned!r}",
                                  ("qkd.sae_id",))
        if hq.master is w.QKDMaster.INITIATOR:
            if hq.peer_sae_id != qkd.sae_id:
                raise PolicyViolation(f"the initiator took QKD keys for SAE {hq.peer_sae_id!r}, this side is "
                                      f"{qkd.sae_id!r}", ("qkd.sae_id",))
            if _usage_name(hq.usage) not in self._cfg.policy.key_budget.accepted_usages:
                raise PolicyViolation(f"the initiator used QKD key budget {_usage_name(hq.usage)!r}, which this "
                                      "side's policy does not accept", ("key_budget",))

    def _on_keys(self, request: QKDKeysRequired | QKDKeysByIdRequired, keys: list[QKDKey]) -> None:
        qkd = self._cfg.qkd
        hello = self._hello
        assert qkd is not None and hello is not None
        if isinstance(request, QKDKeysRequired):
            self._binding = QKDBinding(key_ids=tuple(k.key_id for k in keys), master_sae_id=qkd.sae_id,
                                       slave_sae_id=hello.qkd.sae_id,
                                       master_kme_id=qkd.kme_id, slave_kme_id=hello.qkd.kme_id)
        else:
            self._binding = QKDBinding(key_ids=hello.qkd.key_ids, master_sae_id=hello.qkd.sae_id,
                                       slave_sae_id=qkd.sae_id, master_kme_id=hello.qkd.kme_id, slave_kme_id=qkd.kme_id)
        self._send_flight(b"".join(k.key for k in keys), Input.QKD_KEYS)

    def _on_unavailable(self, request: QKDKeysRequired | QKDKeysByIdRequired, reason: str) -> None:
        assert self._suite is not None
        sibling = self._suite.without_qkd()
        if self._cfg.policy.qkd is not QKDMode.OPTIONAL:
            raise KeyUnavailableError(f"QKD keys are unavailable ({reason}) and the policy requires them")
        if isinstance(request, QKDKeysByIdRequired) or sibling not in self._candidates:
            raise KeyUnavailableError(f"QKD keys are unavailable ({reason}) and the initiator does not accept "
                                      "running without QKD" if isinstance(request, QKDKeysRequired) else
                                      f"QKD keys are unavailable ({reason}); the initiator already spent its "
                                      "keys, so this handshake cannot fall back")
        self._suite = sibling
        self._usage = w.QKDUsage.NONE
        self._note = w.QKDNote.KEY_SOURCE_UNAVAILABLE
        self._note_text = (f"this side's key source was unavailable ({reason}); policy 'optional' ran the "
                           f"no-QKD suite {sibling.name}")
        self._send_flight(b"", Input.QKD_UNAVAILABLE)

    def _send_flight(self, qkd_key: bytes, inp: Input = Input.RECV_HELLO) -> None:
        suite, hello, auth = self._suite, self._hello, self._authenticator
        assert suite is not None and hello is not None and auth is not None
        qkd = self._cfg.qkd
        rand = self._randbytes
        x_priv = _X25519.from_private_bytes(rand(32))
        ss_x = _peer_values(lambda: x_priv.decapsulate(hello.x25519), "X25519 public key")
        kem = _pq_kem(suite)
        ss_pq, ct = self._encapsulate(kem)
        nonce = rand(w.NONCE_LEN)
        binding = self._binding if suite.qkd else None
        ma = encode_party(suite, PartyView("initiator", hello.identity.encode(), hello.nonce, hello.x25519,
                                           self._share), binding)
        mb = encode_party(suite, PartyView("responder", self._cfg.identity.encode(), nonce, x_priv.public_bytes(),
                                           ct), binding)
        self._secret = combine(suite, qkd_key=qkd_key, x25519_secret=ss_x, pq_secret=ss_pq, ma=ma, mb=mb)
        if binding is not None:
            assert qkd is not None
            rq = w.ResponseQKD(self._usage, w.QKDNote.NONE, qkd.sae_id, qkd.kme_id,
                               binding.key_ids if hello.qkd.master is w.QKDMaster.RESPONDER else ())
        else:
            rq = w.ResponseQKD(w.QKDUsage.NONE, self._note, "", "", ())
        msg = w.ResponseMsg(suite.code, auth.mode, self._cfg.identity, nonce, x_priv.public_bytes(), ct, rq,
                            auth.key_id if auth.mode is AuthMode.RECYCLED else None)
        self._send(w.FrameType.RESPONSE, msg.encode())
        cert = auth.certificate() if auth.sends_certificate else None
        if cert is not None:
            self._send(w.FrameType.CERTIFICATE, cert.encode())
        th = self._th()
        confirm = self._confirm(labels.CONFIRM_RESPONDER, th)
        ctx = AuthContext(suite, "responder", self._cfg.identity, hello.identity, self._now())
        self._send(w.FrameType.FINISHED, w.FinishedMsg(confirm, auth.prove(ctx, th + confirm)).encode())
        self._move(inp, State.WAIT_CERTIFICATE if auth.sends_certificate else State.WAIT_FINISHED)

    def _encapsulate(self, kem: KEM) -> tuple[bytes, bytes]:
        try:
            if self._encapsulate_with is None:
                return kem.encapsulate(self._share)
            kem.encapsulate(self._share)  # the same checks of the peer's key as without the hook
            ss, ct = self._encapsulate_with(kem.name, self._share)
        except InvalidKeyMaterial as exc:
            raise RemoteProtocolError(f"invalid {kem.name} encapsulation key from the peer: {exc}") from exc
        if len(ss) != kem.shared_secret_size or len(ct) != kem.ciphertext_size:
            raise LocalProtocolError(f"the injected {kem.name} encapsulation returned a result of the wrong size")
        return bytes(ss), bytes(ct)

    def _on_finished(self, body: bytes, th_before: bytes) -> None:
        suite, hello, auth = self._suite, self._hello, self._authenticator
        assert suite is not None and hello is not None and auth is not None
        fin = w.FinishedMsg.decode(body, suite.hash_len)
        ctx = AuthContext(suite, "initiator", hello.identity, self._cfg.identity, self._now())
        auth.verify(ctx, th_before + fin.confirm, fin.proof, self._peer_certificate)
        if not hmac.compare_digest(self._confirm(labels.CONFIRM_INITIATOR, th_before), fin.confirm):
            raise KeyMismatchError("key confirmation failed: the authenticated initiator derived a different key")
        session = self._session(peer_identity=hello.identity, binding=self._binding if suite.qkd else None,
                                usage=self._usage, note=self._note_text, offered_modes=hello.auth_modes)
        self._move(Input.RECV_FINISHED, State.COMPLETE)
        self._events.append(HandshakeComplete(session))
