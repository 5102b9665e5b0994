"""The sans-IO handshake: bytes in, events out.

A :class:`Initiator` or :class:`Responder` never touches a socket, a clock, a file or a KME.  The
caller moves bytes (``receive_data`` / ``data_to_send``), asks for events (``next_event``) and
answers QKD requests (``provide_qkd_keys`` / ``qkd_unavailable``).  Randomness (nonces, X25519
keys, ML-KEM key-generation seeds) and time (certificate validity) come from injectable callables;
the only randomness not injectable is inside ML-KEM encapsulation and ML-DSA signing, which
``cryptography`` draws from OpenSSL's generator.

Error contract (after h11): every exception raised from ``receive_data``, ``next_event``,
``provide_qkd_keys`` or ``qkd_unavailable`` is a :class:`~hybridkex.exceptions.HybridKEXError`;
when one is raised the connection is ``FAILED``, an Abort with a coarse code is queued in
``data_to_send()`` (unless the failure *was* the peer's Abort), and every later call raises
:class:`~hybridkex.exceptions.LocalProtocolError`.  Anything else escaping is a bug.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Literal, NoReturn

from ..combiner import CombinedSecret, PartyView, QKDBinding, combine, encode_party
from ..exceptions import (
    AuthenticationError,
    HandshakeTimeout,
    HybridKEXError,
    InvalidKeyMaterial,
    KeyMismatchError,
    KeySourceError,
    KeyUnavailableError,
    LocalProtocolError,
    PolicyViolation,
    QKDKeyUnknownError,
    RateLimited,
    RemoteProtocolError,
    VersionError,
)
from ..hazmat import labels
from ..hazmat.kem import KEM, MLKEM, X25519KEM, KEMPrivateKey, get_kem
from ..policy import QKDMode
from ..qkd.base import QKDKey
from ..suites import Suite, suite_by_code
from . import _wire as w
from ._config import InitiatorConfig, ResponderConfig
from ._session import Component, Session, SessionInfo
from ._state import FRAME_INPUT, INITIATOR, RESPONDER, Input, State, Table, allowed, expected_frames
from .auth import AuthContext, Authenticator, AuthMode, AuthOffer
from .events import NEED_DATA, PAUSED, Event, HandshakeComplete, QKDKeysByIdRequired, QKDKeysRequired, Sentinel

__all__ = ["Initiator", "Responder"]

Role = Literal["initiator", "responder"]

#: Most bytes buffered from the peer before the handshake completes (all frame maxima together).
MAX_BUFFER = 256 * 1024

_X25519: X25519KEM = X25519KEM()


def _default_randbytes(n: int) -> bytes:
    return os.urandom(n)  # looked up per call, so a caller (or a test) can inject its own source


def _default_clock() -> float:
    return time.time()


class _UnexpectedMessage(RemoteProtocolError):
    """A well-formed frame that the current state does not allow."""


def _abort_code(exc: BaseException) -> w.AbortCode:
    if isinstance(exc, VersionError):
        return w.AbortCode.UNSUPPORTED_VERSION
    if isinstance(exc, _UnexpectedMessage):
        return w.AbortCode.UNEXPECTED_MESSAGE
    if isinstance(exc, RemoteProtocolError):
        return w.AbortCode.DECODE_ERROR
    if isinstance(exc, AuthenticationError | KeyMismatchError):
        return w.AbortCode.AUTHENTICATION_FAILED
    if isinstance(exc, PolicyViolation):
        return w.AbortCode.POLICY
    if isinstance(exc, QKDKeyUnknownError):
        return w.AbortCode.QKD_KEY_UNKNOWN
    if isinstance(exc, KeySourceError):
        return w.AbortCode.QKD_UNAVAILABLE
    if isinstance(exc, HandshakeTimeout):
        return w.AbortCode.TIMEOUT
    if isinstance(exc, RateLimited):
        return w.AbortCode.RATE_LIMITED
    return w.AbortCode.GENERIC


def peer_abort_error(code: int) -> HybridKEXError:
    """The local exception for an Abort the peer sent (unknown codes count as GENERIC)."""
    prefix = "the peer aborted the handshake"
    if code == w.AbortCode.UNSUPPORTED_VERSION:
        return VersionError(f"{prefix}: it does not support this protocol version")
    if code == w.AbortCode.AUTHENTICATION_FAILED:
        return AuthenticationError("the peer reported that authentication or key confirmation failed")
    if code == w.AbortCode.POLICY:
        return PolicyViolation(f"{prefix}: no suite, authentication mode, QKD role or key budget is acceptable "
                               "to it", ("peer policy",))
    if code == w.AbortCode.QKD_UNAVAILABLE:
        return KeyUnavailableError(f"{prefix}: it could not obtain QKD keys and its policy requires them")
    if code == w.AbortCode.QKD_KEY_UNKNOWN:
        return QKDKeyUnknownError(f"{prefix}: its KME does not know the QKD key ID(s) of this handshake (stale "
                                  "keys, e.g. after a KME restart); a new handshake takes a fresh key",
                                  reported_by_peer=True)
    if code == w.AbortCode.TIMEOUT:
        return HandshakeTimeout(f"{prefix}: a deadline passed on its side")
    if code == w.AbortCode.DECODE_ERROR:
        return RemoteProtocolError(f"{prefix}: it could not parse a message from this side")
    if code == w.AbortCode.UNEXPECTED_MESSAGE:
        return RemoteProtocolError(f"{prefix}: it received a message out of order")
    if code == w.AbortCode.RATE_LIMITED:
        return RateLimited(f"{prefix}: rate limited (its connection limits refused this connection); retry later")
    return RemoteProtocolError(prefix)


def _peer_values(fn: Callable[[], bytes], what: str) -> bytes:
    """Run a KEM operation on the peer's public value; a rejected value is the peer's fault."""
    try:
        return fn()
    except InvalidKeyMaterial as exc:
        raise RemoteProtocolError(f"invalid {what} from the peer: {exc}") from exc


def _usage_name(usage: w.QKDUsage) -> Literal["fresh", "epoch"]:
    return "epoch" if usage is w.QKDUsage.EPOCH else "fresh"


def _usage_code(name: str) -> w.QKDUsage:
    return w.QKDUsage.EPOCH if name == "epoch" else w.QKDUsage.FRESH


def _accepted_bits(names: frozenset[str]) -> int:
    return sum(w.USAGE_BIT[_usage_code(n)] for n in names)


def _accepted_names(bits: int) -> frozenset[str]:
    return frozenset(_usage_name(u) for u, b in w.USAGE_BIT.items() if bits & b)


def _note_text(note: w.QKDNote, who: str) -> str:
    if note is w.QKDNote.DISABLED_BY_POLICY:
        return f"the {who}'s policy disables QKD"
    if note is w.QKDNote.KEY_SOURCE_UNAVAILABLE:
        return f"the {who}'s key source was unavailable and its policy allows running without QKD"
    return f"the {who} offered no QKD suite"


def _mode_names(modes: Sequence[int]) -> tuple[str, ...]:
    known = {m.value for m in AuthMode}
    return tuple(AuthMode(m).label if m in known else str(m) for m in modes)


def _pq_kem(suite: Suite) -> KEM:
    return get_kem(suite.pq_kem, suite.backend)


def _share_size(kem_code: int) -> int | None:
    """The encapsulation-key size of a KEM code, or None when unknown here (ignored, forward compatible)."""
    name = w.KEM_BY_CODE.get(kem_code)
    # Only the built-in ML-KEMs: probing for liboqs on a peer's say-so would search the file system.
    if name is None or not name.startswith("ML-KEM"):
        return None
    return get_kem(name, "cryptography").public_key_size


def _components(suite: Suite) -> tuple[Component, ...]:
    x = Component("X25519", "classical", 32)
    pq = Component(suite.pq_kem, "post-quantum", _pq_kem(suite).shared_secret_size)
    if not suite.qkd:
        return (x, pq) if suite.ordering == "etsi" else (pq, x)
    q = Component("QKD", "qkd", suite.qkd_key_bits // 8)
    return (q, x, pq) if suite.ordering == "etsi" else (pq, x, q)


class _Connection:
    """Shared machinery: buffering, framing, transcript, failure handling."""

    _role: Role
    _table: Table

    def __init__(self, config: InitiatorConfig | ResponderConfig, initial: State,
                 randbytes: Callable[[int], bytes] | None, clock: Callable[[], float] | None) -> None:
        self._config = config
        self._randbytes = randbytes or _default_randbytes
        self._clock = clock or _default_clock
        self._state = initial
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._eof = False
        self._events: list[Event] = []
        self._request: QKDKeysRequired | QKDKeysByIdRequired | None = None
        self._request_open = False
        self._transcript: list[bytes] = []
        self._suite: Suite | None = None
        self._secret: CombinedSecret | None = None
        self._authenticator: Authenticator | None = None
        self._peer_certificate: w.CertificateMsg | None = None
        self._failure: BaseException | None = None
        for s in config.policy.allowed_suites:  # fail at construction, not mid-handshake
            _pq_kem(s)

    def __repr__(self) -> str:
        suite = f", suite={self._suite.name!r}" if self._suite is not None else ""
        return f"<{type(self).__name__} identity={self._config.identity!r} state={self._state.value}{suite}>"

    # --- public API -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state (see ``hybridkex.protocol._state``)."""
        return self._state

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer; ``b""`` means the peer closed the connection."""
        self._check_usable()
        if not data:
            self._eof = True
            return
        if self._state is not State.COMPLETE and len(self._inbuf) + len(data) > MAX_BUFFER:
            self._fail(RemoteProtocolError(f"the peer sent more than {MAX_BUFFER} bytes without a complete message"))
        self._inbuf += data

    def data_to_send(self) -> bytes:
        """Bytes to send to the peer now (possibly empty). Call after every other method."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    def next_event(self) -> Event | Sentinel:
        """The next event, or NEED_DATA / PAUSED. Raises a HybridKEXError when the handshake fails."""
        self._check_usable()
        try:
            while True:
                if self._events:
                    return self._events.pop(0)
                if self._state is State.COMPLETE:
                    raise LocalProtocolError("the handshake is complete; there are no more events")
                if self._request is not None:
                    if self._request_open:
                        return PAUSED
                    self._request_open = True
                    return self._request
                frame = self._read_frame()
                if frame is None:
                    if self._eof:
                        raise RemoteProtocolError("the peer closed the connection before the handshake completed")
                    return NEED_DATA
                self._dispatch(*frame)
        except LocalProtocolError:
            raise
        except HybridKEXError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug: still fail closed, abort, and surface it
            self._fail(exc)

    def provide_qkd_keys(self, keys: Sequence[QKDKey]) -> None:
        """Answer the outstanding QKD request with the key source's keys (in the order it returned them)."""
        self._check_usable()
        request = self._take_request()
        try:
            try:
                keys = list(keys)
            except TypeError:
                raise KeySourceError("the key source returned something that is not a list of QKDKey") from None
            self._check_keys(request, keys)
        except HybridKEXError as exc:  # the key source misbehaved: the peer learns "QKD unavailable"
            self._fail(exc, w.AbortCode.QKD_UNAVAILABLE)
        try:
            self._on_keys(request, keys)
        except HybridKEXError as exc:
            self._fail(exc)

    def qkd_unavailable(self, reason: str | BaseException) -> None:
        """Answer the outstanding QKD request: the key source could not deliver (``reason`` says why).

        Depending on the policy the handshake continues with the no-QKD sibling suite, or fails here
        with KeyUnavailableError (chained to ``reason`` when it is an exception).
        """
        self._check_usable()
        request = self._take_request()
        text = str(reason) or type(reason).__name__
        try:
            self._on_unavailable(request, text)
        except HybridKEXError as exc:
            if isinstance(reason, QKDKeyUnknownError) and isinstance(request, QKDKeysByIdRequired):
                # The peer (master) must learn this one: its Abort code lets it drop its stale keys.
                exc = QKDKeyUnknownError(f"{exc}; a new handshake takes a fresh key", key_ids=request.key_ids)
            if isinstance(reason, BaseException) and exc.__cause__ is None:
                exc.__cause__ = reason
            self._fail(exc)

    def abort(self, code: w.AbortCode = w.AbortCode.GENERIC) -> None:
        """Give up (e.g. a driver's deadline passed): queue an Abort and move to FAILED."""
        if self._state in (State.COMPLETE, State.FAILED):
            return
        self._failure = HybridKEXError("aborted by the application")
        self._outbuf += w.encode_abort(code)
        self._move(Input.ERROR, State.FAILED)
        self._erase()

    def bytes_wanted(self) -> int:
        """How many more bytes complete the frame being read (0 when none is wanted).

        Reading exactly this many bytes never consumes bytes that follow the handshake on the same
        stream (e.g. a TLS ClientHello), which matters when the stream is handed on afterwards.
        """
        if self._state in (State.COMPLETE, State.FAILED) or self._request is not None:
            return 0
        if len(self._inbuf) < w.HEADER_LEN:
            return w.HEADER_LEN - len(self._inbuf)
        try:
            _, length = w.parse_header(bytes(self._inbuf[: w.HEADER_LEN]))
        except RemoteProtocolError:
            return 0  # next_event() reports it
        return max(0, w.HEADER_LEN + length - len(self._inbuf))

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the handshake's last frame (belong to whatever runs next)."""
        return bytes(self._inbuf) if self._state is State.COMPLETE else b""

    # --- framing ----------------------------------------------------------------------------------

    def _read_frame(self) -> tuple[w.FrameType, bytes, bytes] | None:
        if len(self._inbuf) < w.HEADER_LEN:
            return None
        frame_type, length = w.parse_header(bytes(self._inbuf[: w.HEADER_LEN]))
        if frame_type is not w.FrameType.ABORT and frame_type not in expected_frames(self._table, self._state):
            raise _UnexpectedMessage(f"unexpected {frame_type.name} message in state {self._state.value}")
        end = w.HEADER_LEN + length
        if len(self._inbuf) < end:
            return None
        raw = bytes(self._inbuf[:end])
        del self._inbuf[:end]
        return frame_type, raw[w.HEADER_LEN:], raw

    def _dispatch(self, frame_type: w.FrameType, body: bytes, raw: bytes) -> None:
        if frame_type is w.FrameType.ABORT:
            code = w.decode_abort(body)
            self._failure = peer_abort_error(code)
            self._move(Input.RECV_ABORT, State.FAILED)
            self._erase()
            raise self._failure
        th_before = self._th() if self._suite is not None else b""
        self._transcript.append(raw)
        self._on_frame(FRAME_INPUT[frame_type], body, th_before)

    def _send(self, frame_type: w.FrameType, body: bytes) -> None:
        frame = w.encode_frame(frame_type, body)
        self._transcript.append(frame)
        self._outbuf += frame

    def _th(self) -> bytes:
        assert self._suite is not None
        return hashlib.new(self._suite.hash, b"".join(self._transcript)).digest()

    # --- state and failure ------------------------------------------------------------------------

    def _move(self, inp: Input, target: State) -> None:
        if target not in allowed(self._table, self._state, inp):
            raise LocalProtocolError(f"internal error: {inp.value} may not lead from {self._state.value} to "
                                     f"{target.value}")
        self._state = target

    def _check_usable(self) -> None:
        if self._state is State.FAILED:
            raise LocalProtocolError("the handshake has failed; start a new one") from self._failure

    def _take_request(self) -> QKDKeysRequired | QKDKeysByIdRequired:
        if self._request is None or not self._request_open:
            raise LocalProtocolError("there is no outstanding QKD request to answer")
        request = self._request
        self._request = None
        self._request_open = False
        return request

    def _fail(self, exc: BaseException, code: w.AbortCode | None = None) -> NoReturn:
        if self._state is not State.FAILED:
            self._failure = exc
            self._outbuf += w.encode_abort(code if code is not None else _abort_code(exc))
            self._state = State.FAILED  # ERROR leads to FAILED from every non-terminal state
            self._erase()
        raise exc

    def _erase(self) -> None:
        if self._secret is not None:
            self._secret.erase()
        self._secret = None
        self._drop_private_keys()

    def _drop_private_keys(self) -> None:
        """Subclasses drop their ephemeral private keys here."""

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    def _confirm(self, purpose: bytes, th: bytes) -> bytes:
        assert self._secret is not None and self._suite is not None
        key = self._secret.derive(purpose, self._suite.hash_len)
        return hmac.digest(key, th, self._suite.hash)

    def _check_keys(self, request: QKDKeysRequired | QKDKeysByIdRequired, keys: list[QKDKey]) -> None:
        if not all(isinstance(k, QKDKey) for k in keys):
            raise KeySourceError("the key source returned something that is not a QKDKey")
        ids = [k.key_id for k in keys]
        if len({i.lower() for i in ids}) != len(ids):
            raise KeySourceError("the key source returned the same key ID twice")
        if isinstance(request, QKDKeysRequired):
            if len(keys) != request.number:
                raise KeySourceError(f"the key source returned {len(keys)} keys, {request.number} were requested")
            for k in keys:
                if len(k.key) * 8 != request.size_bits:
                    raise InvalidKeyMaterial(f"QKD key {k.key_id} has {len(k.key) * 8} bits, "
                                             f"{request.size_bits} were requested")
        else:
            if [i.lower() for i in ids] != [i.lower() for i in request.key_ids]:
                raise KeySourceError("the key source returned keys for other key IDs than requested")
            assert self._suite is not None
            total = sum(len(k.key) for k in keys) * 8
            if total != self._suite.qkd_key_bits:
                raise InvalidKeyMaterial(f"QKD keys {', '.join(ids)} total {total} bits; suite "
                                         f"{self._suite.name} needs {self._suite.qkd_key_bits}")

    def _session(self, *, peer_identity: str, binding: QKDBinding | None, usage: w.QKDUsage,
                 note: str | None, offered_modes: Sequence[int] = ()) -> Session:
        assert self._suite is not None and self._secret is not None and self._authenticator is not None
        auth_key_id = self._authenticator.key_id if self._authenticator.mode is AuthMode.RECYCLED else None
        info = SessionInfo(
            version=w.VERSION,
            role=self._role,
            suite=self._suite.name,
            offered_suites=self._offered_names(),
            local_identity=self._config.identity,
            peer_identity=peer_identity,
            auth_mode=self._authenticator.mode.label,
            components=_components(self._suite),
            qkd_used=binding is not None,
            qkd_usage=_usage_name(usage) if binding is not None else "none",
            qkd_policy=self._config.policy.qkd.value,
            qkd_key_ids=binding.key_ids if binding else (),
            master_sae_id=binding.master_sae_id if binding else None,
            slave_sae_id=binding.slave_sae_id if binding else None,
            master_kme_id=binding.master_kme_id if binding else None,
            slave_kme_id=binding.slave_kme_id if binding else None,
            qkd_note=None if binding is not None else note,
            transcript_hash=self._th().hex(),
            offered_auth_modes=_mode_names(offered_modes),
            auth_key_id=auth_key_id.hex() if auth_key_id is not None else None,
        )
        session = Session(self._secret, info)
        self._secret = None  # owned by the session now
        self._drop_private_keys()
        return session

    # --- role hooks -------------------------------------------------------------------------------

    def _offered_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _on_frame(self, inp: Input, body: bytes, th_before: bytes) -> None:
        raise NotImplementedError

    def _on_keys(self, request: QKDKeysRequired | QKDKeysByIdRequired, keys: list[QKDKey]) -> None:
        raise NotImplementedError

    def _on_unavailable(self, request: QKDKeysRequired | QKDKeysByIdRequired, reason: str) -> None:
        raise NotImplementedError

    def _auth_for(self, mode: int) -> Authenticator | None:
        for a in self._config.authenticators:
            if a.mode == mode:
                return a
        return None


# === Initiator =====================================================================================


class Initiator(_Connection):
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
                self._binding = QKDBinding(q.key_ids, q.sae_id, hello.qkd.sae_id, q.kme_id, hello.qkd.kme_id)
            else:
                if q.key_ids or q.usage is not hello.qkd.usage:
                    raise RemoteProtocolError("the responder changed the QKD keys this side (master) chose")
                self._binding = QKDBinding(hello.qkd.key_ids, hello.qkd.sae_id, q.sae_id, hello.qkd.kme_id, q.kme_id)
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
        self._ss_x = self._ss_pq = b""
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


# === Responder =====================================================================================


class Responder(_Connection):
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
            self._binding = QKDBinding(tuple(k.key_id for k in keys), qkd.sae_id, hello.qkd.sae_id, qkd.kme_id,
                                       hello.qkd.kme_id)
        else:
            self._binding = QKDBinding(hello.qkd.key_ids, hello.qkd.sae_id, qkd.sae_id, hello.qkd.kme_id, qkd.kme_id)
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
