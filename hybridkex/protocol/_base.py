"""The sans-IO handshake: bytes in, events out (what the initiator and the responder share).

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

import functools
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn

from ..combiner import CombinedSecret, QKDBinding
from ..exceptions import (
    ConfigurationError,
    HybridKEXError,
    InvalidKeyMaterial,
    KeySourceError,
    LocalProtocolError,
    QKDKeyUnknownError,
    RemoteProtocolError,
)
from ..hazmat.kdf import hmac_digest
from ..hazmat.kem import KEM, X25519KEM, get_kem
from ..qkd.base import QKDKey
from ..suites import Suite
from . import _wire as w
from ._config import InitiatorConfig, ResponderConfig
from ._errors import _UnexpectedMessage, abort_code, peer_abort_error
from ._session import Component, Session, SessionInfo
from ._state import FRAME_INPUT, Input, State, Table, allowed, expected_frames
from .auth import Authenticator, AuthMode
from .events import NEED_DATA, PAUSED, Event, QKDKeysByIdRequired, QKDKeysRequired, Sentinel

__all__ = ["Connection", "Role"]

Role = Literal["initiator", "responder"]

#: Most bytes buffered from the peer before the handshake completes (all frame maxima together).
MAX_BUFFER = 256 * 1024
#: Room a Hello needs besides its key shares: suites, identities, nonce, X25519, QKD fields, key IDs.
_HELLO_SLACK = 4 * 1024

_X25519: X25519KEM = X25519KEM()


def _default_randbytes(n: int) -> bytes:
    return os.urandom(n)  # looked up per call, so a caller (or a test) can inject its own source


def _default_clock() -> float:
    return time.time()


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


def suite_kem(suite: Suite) -> KEM:
    """The post-quantum KEM of ``suite``, checked against the wire format before any handshake.

    Raises UnsupportedAlgorithm when its backend is missing and ConfigurationError when the KEM
    cannot be used in this handshake: a public key or ciphertext larger than a key share may be
    (Classic McEliece's 261 KB keys), no wire code, or a shared secret of another size than the
    suite declares. Configuration code calls this, so such a suite is refused before it is offered.
    """
    kem = get_kem(suite.pq_kem, suite.backend)
    for what, size in (("public key", kem.public_key_size), ("ciphertext", kem.ciphertext_size)):
        if size > w.MAX_SHARE:
            raise ConfigurationError(
                f"suite {suite.name}: the {kem.name} {what} is {size} bytes, larger than the "
                f"{w.MAX_SHARE} bytes the handshake carries; this suite cannot be used", field="policy.suites")
    if suite.pq_kem not in w.KEM_CODES:
        raise ConfigurationError(f"suite {suite.name}: {kem.name} has no KEM code on the wire", field="policy.suites")
    if kem.shared_secret_size != suite.pq_secret_bytes:
        raise ConfigurationError(
            f"suite {suite.name}: {kem.name} gives {kem.shared_secret_size}-byte shared secrets, the suite "
            f"declares {suite.pq_secret_bytes}", field="policy.suites")
    return kem


_pq_kem = suite_kem


def _share_size(kem_code: int) -> int | None:
    """The encapsulation-key size of a KEM code, or None when unknown here (ignored, forward compatible)."""
    name = w.KEM_BY_CODE.get(kem_code)
    # Only the built-in ML-KEMs: probing for liboqs on a peer's say-so would search the file system.
    if name is None or not name.startswith("ML-KEM"):
        return None
    return get_kem(name, "cryptography").public_key_size


@functools.lru_cache(maxsize=64)  # public and immutable: one tuple per suite
def _components(suite: Suite) -> tuple[Component, ...]:
    x = Component("X25519", "classical", 32)
    pq = Component(suite.pq_kem, "post-quantum", _pq_kem(suite).shared_secret_size)
    if not suite.qkd:
        return (x, pq) if suite.ordering == "etsi" else (pq, x)
    q = Component("QKD", "qkd", suite.qkd_key_bits // 8)
    return (q, x, pq) if suite.ordering == "etsi" else (pq, x, q)


class Connection:
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
        # Running transcript hash, started once the suite (and so the hash) is known; fed the
        # frames not yet hashed on each use, so no frame is hashed twice.
        self._th_hash: Any = None
        self._th_fed = 0
        self._suite: Suite | None = None
        self._secret: CombinedSecret | None = None
        self._authenticator: Authenticator | None = None
        self._peer_certificate: w.CertificateMsg | None = None
        self._failure: BaseException | None = None
        # Fail at construction, not mid-handshake: every suite's KEM loads and fits the wire format,
        # and the initiator's key shares (one per distinct KEM) fit one Hello.
        shares = {s.pq_kem: suite_kem(s).public_key_size for s in config.policy.allowed_suites}
        if isinstance(config, InitiatorConfig) and len(shares) > w.MAX_SHARES:
            raise ConfigurationError(f"the suites use {len(shares)} post-quantum KEMs ({', '.join(shares)}); a Hello "
                                     f"carries key shares for at most {w.MAX_SHARES}", field="policy.suites")
        if isinstance(config, InitiatorConfig) and sum(shares.values()) + _HELLO_SLACK > w.MAX_BODY[w.FrameType.HELLO]:
            raise ConfigurationError(
                f"the key shares of {', '.join(shares)} ({sum(shares.values())} bytes) do not fit one Hello "
                f"({w.MAX_BODY[w.FrameType.HELLO]} bytes); offer fewer large-key suites", field="policy.suites")

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
        h = self._th_hash
        if h is None:
            h = self._th_hash = hashlib.new(self._suite.hash)
        for frame in self._transcript[self._th_fed:]:
            h.update(frame)
        self._th_fed = len(self._transcript)
        return bytes(h.copy().digest())

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
            self._outbuf += w.encode_abort(code if code is not None else abort_code(exc))
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
        return hmac_digest(self._suite.hash, key, th)

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
