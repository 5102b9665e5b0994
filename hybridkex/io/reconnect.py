"""Zero-extra-round-trip reconnects: per-connection PSKs derived from a parent hybrid session.

After a full hybrid handshake (ML-KEM + X25519 + QKD, then TLS), both ends may keep the parent's
combined secret ``S`` for a bounded time and count.  Reconnect number ``i`` (1, 2, ...) then goes
straight to TLS 1.3, with no hybrid exchange before it, using::

    handle   = derive(S, "reconnect session handle", 16)                 # names the parent
    tag_i    = derive(S, "reconnect psk identity", 16, context=u32(i))
    identity = "hk1-rc." || base64url(handle || u32(i) || tag_i)         # 55 ASCII bytes, in clear
    psk_i    = derive(S, "reconnect psk", HashLen, context=u32(i))

The server finds the parent by ``handle``, checks ``tag_i`` in constant time (so nobody who lacks
``S`` can spend a counter), refuses any ``i`` it accepted before or beyond ``max_uses``, and
forgets the parent when it expires or is used up.  Each reconnect's TLS handshake is psk_dhe_ke
with X25519MLKEM768 only, so it also gets a fresh post-quantum and classical secret of its own.

* :class:`ReconnectTicket`: the client's side (hands out each counter once).
* :class:`ReconnectRegistry`: the server's side (bounded, expiring, replay-refusing).
* :func:`client_hello_cipher`: how a server tells which PSK hash a reconnect uses before TLS starts.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NoReturn

from .. import workers
from ..combiner import CombinedSecret
from ..exceptions import AlreadyFinalized, RemoteProtocolError, StateError, TLSError
from ..hazmat import labels
from ..hazmat.encoding import Reader, b64url, b64url_decode, u32
from ..protocol import SessionInfo
from ..steady.reads import ParentReads
from ..suites import Suite
from ..tls import CIPHER_ID
from .config import ReconnectPolicy, StateReads

if TYPE_CHECKING:
    from ..state import SharedState

__all__ = [
    "IDENTITY_LEN",
    "RAW_IDENTITY_LEN",
    "ReconnectKey",
    "ReconnectMatch",
    "ReconnectRegistry",
    "ReconnectTicket",
    "client_hello_cipher",
    "parse_reconnect_identity",
    "reconnect_identity",
    "reconnect_psk",
    "session_handle",
]

_log = logging.getLogger("hybridkex.reconnect")

HANDLE_LEN: Final = 16
TAG_LEN: Final = 16
#: handle (16) || u32 counter (4) || tag (16): the bytes a reconnect identity encodes.
RAW_IDENTITY_LEN: Final = HANDLE_LEN + 4 + TAG_LEN
#: Length of a reconnect identity: the prefix and 48 base64url characters (36 bytes, no padding).
IDENTITY_LEN: Final = len(labels.RECONNECT_IDENTITY_PREFIX) + (4 * RAW_IDENTITY_LEN + 2) // 3

#: First byte of a TLS handshake record (a ClientHello); a hybridkex Hello starts with "H" (0x48).
TLS_HANDSHAKE_BYTE: Final = 0x16
#: TLS record header: content type (1), legacy version (2), length (2).
TLS_RECORD_HEADER_LEN: Final = 5
#: RFC 8446 section 5.1: a plaintext record carries at most 2^14 bytes.
TLS_MAX_RECORD: Final = 2**14

_CIPHER_BY_ID: Final = {int.from_bytes(v, "big"): k for k, v in CIPHER_ID.items()}


def session_handle(secret: CombinedSecret) -> bytes:
    """The 16-byte handle that names a parent session in its reconnect identities."""
    return secret.derive(labels.RECONNECT_HANDLE, HANDLE_LEN)


def reconnect_identity(secret: CombinedSecret, index: int, handle: bytes | None = None) -> bytes:
    """The TLS PSK identity of reconnect ``index``: printable ASCII text (public: it travels in the
    ClientHello), ``"hk1-rc." || base64url(handle || u32(index) || tag)`` without padding."""
    handle = handle if handle is not None else session_handle(secret)
    raw = handle + u32(index) + secret.derive(labels.RECONNECT_IDENTITY, TAG_LEN, u32(index))
    return labels.RECONNECT_IDENTITY_PREFIX + b64url(raw)


def parse_reconnect_identity(identity: bytes) -> tuple[bytes, int, bytes] | None:
    """``(handle, index, tag)`` of a well-formed reconnect identity, else None (never raises).

    Strict: the exact prefix, then exactly the canonical base64url of 36 bytes; a full handshake's
    identity, a 0.1.0 raw binary identity, padding, whitespace or any other byte is "not one".
    """
    if (not isinstance(identity, bytes) or len(identity) != IDENTITY_LEN
            or not identity.startswith(labels.RECONNECT_IDENTITY_PREFIX)):
        return None
    try:
        raw = b64url_decode(identity[len(labels.RECONNECT_IDENTITY_PREFIX):], RAW_IDENTITY_LEN)
    except RemoteProtocolError:
        return None
    return raw[:HANDLE_LEN], int.from_bytes(raw[HANDLE_LEN:HANDLE_LEN + 4], "big"), raw[HANDLE_LEN + 4:]


def reconnect_psk(secret: CombinedSecret, index: int) -> bytes:
    """The TLS PSK of reconnect ``index`` (HashLen bytes of the parent suite's hash)."""
    return secret.derive(labels.RECONNECT_PSK, secret.suite.hash_len, u32(index))


@dataclass(frozen=True, slots=True)
class ReconnectKey:
    """One reconnect's identity and key (the key never appears in ``repr``)."""

    index: int
    identity: bytes
    psk: bytes = field(repr=False)
    #: The TLS 1.3 cipher suite the PSK is bound to (the parent suite's hash).
    cipher: str
    #: The parent session.
    info: SessionInfo = field(repr=False)


class ReconnectTicket:
    """The client's right to reconnect to one server without a hybrid exchange.

    Obtained from a connection that ran a full hybrid handshake with reconnects enabled
    (``sock.reconnect_ticket``, ``writer.get_extra_info("hybridkex_ticket")``), and passed as
    ``ticket=`` to :func:`hybridkex.connect` / :func:`hybridkex.open_connection` (or kept for you
    by :class:`hybridkex.HybridClient`).  Thread-safe: each counter is handed out once.  Holds the
    parent's combined secret until it is used up or expires; :meth:`erase` drops it early.  Never
    printed, never pickled.
    """

    __slots__ = ("_clock", "_expires", "_handle", "_lock", "_max", "_next", "_secret", "info")

    def __init__(self, secret: CombinedSecret, info: SessionInfo, policy: ReconnectPolicy, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._secret: CombinedSecret | None = secret
        self.info = info
        self._handle = session_handle(secret)
        self._max = policy.max_uses
        self._clock = clock
        self._expires = clock() + policy.lifetime
        self._next = 1
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"<ReconnectTicket peer={self.info.peer_identity!r} suite={self.info.suite} "
                f"remaining={self.remaining} expires_in={self.expires_in:.0f}s>")

    def __reduce__(self) -> NoReturn:
        raise TypeError("ReconnectTicket cannot be pickled: it holds the parent session's secret")

    @property
    def remaining(self) -> int:
        """Reconnects left (0 once expired or erased)."""
        with self._lock:
            if self._secret is None or self._clock() >= self._expires:
                return 0
            return self._max - self._next + 1

    @property
    def expires_in(self) -> float:
        """Seconds until the ticket expires (0 when it has)."""
        return max(0.0, self._expires - self._clock())

    @property
    def usable(self) -> bool:
        """Whether :meth:`take` would hand out a key now."""
        return self.remaining > 0

    def take(self) -> ReconnectKey | None:
        """The next reconnect's identity and key, or None when the ticket is used up or expired
        (it then erases the parent secret)."""
        with self._lock:
            secret = self._secret
            if secret is None:
                return None
            if self._clock() >= self._expires or self._next > self._max:
                self._erase_locked()
                return None
            index = self._next
            self._next += 1
            try:
                key = ReconnectKey(index, reconnect_identity(secret, index, self._handle),
                                   reconnect_psk(secret, index), secret.suite.tls_cipher, self.info)
            except AlreadyFinalized:
                self._secret = None
                return None
            if self._next > self._max:
                self._erase_locked()
            return key

    def _erase_locked(self) -> None:
        if self._secret is not None:
            self._secret.erase()
            self._secret = None

    def erase(self) -> None:
        """Drop the parent secret now; the ticket is unusable afterwards."""
        with self._lock:
            self._erase_locked()


@dataclass(frozen=True, slots=True)
class ReconnectMatch:
    """What the registry found for an identity: the key to accept it with and whom it belongs to."""

    index: int
    psk: bytes = field(repr=False)
    info: SessionInfo


class _Parent:
    __slots__ = ("count", "expires", "info", "max_uses", "secret", "used")

    def __init__(self, secret: CombinedSecret, info: SessionInfo, expires: float, max_uses: int) -> None:
        self.secret = secret
        self.info = info
        self.expires = expires
        self.max_uses = max_uses
        self.used = bytearray((max_uses + 7) // 8)  # one bit per counter: bounded, whatever the order
        self.count = 0

    def __repr__(self) -> str:
        return f"<reconnect parent {self.info.peer_identity!r} used={self.count}/{self.max_uses}>"


@dataclass(slots=True)
class RegistryStats:
    """Counters of a :class:`ReconnectRegistry` (for metrics and tests)."""

    registered: int = 0
    accepted: int = 0
    replayed: int = 0
    expired: int = 0
    unknown: int = 0
    evicted: int = 0


class ReconnectRegistry:
    """The server's parent sessions, each accepting every reconnect counter at most once.

    Bounded: at most ``policy.max_sessions`` parents (the oldest is dropped, and its secret erased,
    when a new one arrives), each remembered for ``policy.lifetime`` seconds and up to
    ``policy.max_uses`` reconnects, with one bit of state per counter.  Thread-safe.
    """

    def __init__(self, policy: ReconnectPolicy, *, clock: Callable[[], float] = time.monotonic,
                 state: SharedState | None = None, off_loop: bool = False, reads: StateReads | None = None) -> None:
        self.policy = policy
        self._clock = clock
        # With a shared state that has a key, parents are stored there too (only their per-reconnect
        # tags and PSKs, sealed: never the parent secret), and every counter is spent there.
        self._state = state if state is not None and state.can_seal else None
        #: The gate on reading parents not in memory (ServerConfig.state_reads; None: nothing is read).
        self.reads = ParentReads(reads or StateReads(), clock=clock) if self._state is not None else None
        #: An event loop drives the connections (an asyncio server sets it): the shared-state calls
        #: are made on worker threads (the lookup before TLS starts, see ServerSetup; the write in
        #: the background), never on the loop.
        self.off_loop = off_loop
        self._lock = threading.Lock()
        # Insertion order is expiry order (one lifetime for all), so expired parents are at the front.
        self._parents: OrderedDict[bytes, _Parent] = OrderedDict()
        self.stats = RegistryStats()

    def __repr__(self) -> str:
        return f"<ReconnectRegistry sessions={len(self)} max_sessions={self.policy.max_sessions}>"

    def __len__(self) -> int:
        with self._lock:
            self._purge_locked()
            return len(self._parents)

    @property
    def shared(self) -> bool:
        """Whether lookups and registrations make shared-state calls (a database round trip)."""
        return self._state is not None

    def register(self, secret: CombinedSecret, info: SessionInfo, *,
                 share: list[Callable[[], None]] | None = None) -> bytes:
        """Remember a parent session (the registry now owns ``secret`` and erases it); its handle.

        With :attr:`off_loop`, storing it in the shared state is left to a worker thread: appended to
        ``share`` (the server setup runs it before its TLS handshake answers, so a client that finished
        that handshake finds the parent at any server), else submitted in the background.  Without
        :attr:`off_loop`, it is stored before this returns."""
        handle = session_handle(secret)
        with self._lock:
            self._purge_locked()
            old = self._parents.pop(handle, None)
            if old is not None:  # pragma: no cover - a 128-bit handle collision
                old.secret.erase()
            while len(self._parents) >= self.policy.max_sessions:
                _, evicted = self._parents.popitem(last=False)
                evicted.secret.erase()
                self.stats.evicted += 1
            self._parents[handle] = _Parent(secret, info, self._clock() + self.policy.lifetime,
                                            self.policy.max_uses)
            self.stats.registered += 1
            shared = _encode_shared(secret, info, self.policy.max_uses) if self._state is not None else None
        if shared is not None:
            put = functools.partial(self._put_parent, handle, shared, info.peer_identity,
                                    time.time() + self.policy.lifetime)
            if self.off_loop and share is not None:
                share.append(put)
            elif self.off_loop:
                workers.submit(put, lambda _value, _error: None)  # put logs its own failure
            else:
                put()
        return handle

    def _put_parent(self, handle: bytes, blob: bytes, peer: str, expires_at: float) -> None:
        assert self._state is not None
        try:
            self._state.put_ticket(SHARED_KIND, handle, blob, expires_at=expires_at)
        except StateError as exc:  # this process still accepts its reconnects; others refuse them
            _log.warning("the reconnect parent of %r is not shared with other servers: %s", peer, exc)

    def discard(self, handle: bytes) -> None:
        """Forget a parent (e.g. its own TLS handshake failed) and erase its secret."""
        with self._lock:
            parent = self._parents.pop(handle, None)
            if parent is not None:
                parent.secret.erase()

    def clear(self) -> None:
        """Forget every parent and erase every secret (server shutdown)."""
        with self._lock:
            for parent in self._parents.values():
                parent.secret.erase()
            self._parents.clear()

    def _purge_locked(self) -> None:
        now = self._clock()
        while self._parents:
            handle, parent = next(iter(self._parents.items()))
            if parent.expires > now:
                break
            del self._parents[handle]
            parent.secret.erase()

    def lookup(self, identity: bytes, cipher: str, *, source: str | None = None) -> ReconnectMatch | None:
        """The key for reconnect ``identity`` if it is valid now, else None.

        Valid means: a known, unexpired parent; a counter within its limit, never accepted before;
        a tag that only a holder of the parent secret can compute; and a parent whose suite binds
        the PSK to ``cipher``.  A valid counter is spent here, before the TLS handshake completes,
        so it can never be accepted twice (a failed handshake spends it too: fail closed).
        ``source``: the client's IP address, for the per-address bound on reading unknown parents.
        """
        parsed = parse_reconnect_identity(identity)
        if parsed is None:  # malformed, or not a reconnect identity at all: unknown, never an error
            with self._lock:
                self.stats.unknown += 1
            return None
        handle, index, tag = parsed
        match = self._lookup_local(handle, index, tag, cipher)
        if match is None and self.reads is not None and handle not in self._parents:
            why = self.reads.begin(handle, source)
            if why is not None:  # counted in self.reads
                _log.info("reconnect refused: %s", why)
                return None
            return self._lookup_shared(handle, index, tag, cipher, source)
        if match is not None and self._state is not None and not self._spend_shared(handle, index, match.info):
            with self._lock:
                self.stats.accepted -= 1  # accepted here, refused by the shared state: not accepted
            return None
        return match

    def _spend_shared(self, handle: bytes, index: int, info: SessionInfo) -> bool:
        """Counter ``index`` of the parent spent in the shared state too (fail closed)."""
        assert self._state is not None
        try:
            if self._state.spend(f"reconnect:{handle.hex()}", [str(index)]):
                return True
            with self._lock:
                self.stats.replayed += 1
            _log.warning("reconnect refused: identity #%d of %r was already used at another server (replay)", index,
                         info.peer_identity)
        except StateError as exc:
            _log.warning("reconnect of %r refused: %s (fail closed)", info.peer_identity, exc)
        return False

    def _lookup_shared(self, handle: bytes, index: int, tag: bytes, cipher: str,
                       source: str | None) -> ReconnectMatch | None:
        """A parent another process registered: its tags and PSKs from the shared state."""
        assert self._state is not None and self.reads is not None
        try:
            ticket = self._state.get_ticket(SHARED_KIND, handle)
            found = _decode_shared(ticket.secret) if ticket is not None else None
        except StateError as exc:
            _log.warning("cannot read a reconnect parent from the shared state: %s (refused: fail closed)", exc)
            return None
        if ticket is None:
            self.reads.unknown(handle)
        if found is None:
            return None
        suite, info, keys = found
        if not 1 <= index <= len(keys) or suite.tls_cipher != cipher:
            return None
        expected, psk = keys[index - 1]
        if not hmac.compare_digest(tag, expected):
            return None
        self.reads.found(source)  # a real client's read: not charged
        if not self._spend_shared(handle, index, info):
            return None
        with self._lock:
            self.stats.accepted += 1
        return ReconnectMatch(index, psk, info)

    def _lookup_local(self, handle: bytes, index: int, tag: bytes, cipher: str) -> ReconnectMatch | None:
        with self._lock:
            parent = self._parents.get(handle)
            if parent is not None and parent.expires <= self._clock():
                del self._parents[handle]
                parent.secret.erase()
                self.stats.expired += 1
                _log.info("reconnect refused: the parent session of %r expired", parent.info.peer_identity)
                return None
            if parent is None:
                self.stats.unknown += 1
                return None
            if not 1 <= index <= parent.max_uses or parent.secret.suite.tls_cipher != cipher:
                self.stats.unknown += 1
                return None
            expected = parent.secret.derive(labels.RECONNECT_IDENTITY, TAG_LEN, u32(index))
            if not hmac.compare_digest(tag, expected):
                self.stats.unknown += 1
                return None
            byte, bit = divmod(index - 1, 8)
            if parent.used[byte] & (1 << bit):
                self.stats.replayed += 1
                _log.warning("reconnect refused: identity #%d of %r was already used (replay)", index,
                             parent.info.peer_identity)
                return None
            parent.used[byte] |= 1 << bit
            parent.count += 1
            psk = reconnect_psk(parent.secret, index)
            if parent.count >= parent.max_uses:
                del self._parents[handle]
                parent.secret.erase()
            self.stats.accepted += 1
            return ReconnectMatch(index, psk, parent.info)


#: Ticket kind of a reconnect parent in a shared state.
SHARED_KIND: Final = "reconnect"


def _encode_shared(secret: CombinedSecret, info: SessionInfo, max_uses: int) -> bytes:
    """What another server needs to accept this parent's reconnects: each reconnect's tag and PSK
    (the parent secret itself is never stored), the suite and the parent's facts."""
    facts = json.dumps({"suite": secret.suite.name, "info": info.as_dict()}, separators=(",", ":")).encode()
    keys = b"".join(secret.derive(labels.RECONNECT_IDENTITY, TAG_LEN, u32(i)) + reconnect_psk(secret, i)
                    for i in range(1, max_uses + 1))
    return u32(len(facts)) + facts + keys


def _decode_shared(blob: bytes) -> tuple[Suite, SessionInfo, list[tuple[bytes, bytes]]] | None:
    from ..steady.shared import decode_facts  # noqa: PLC0415 - one decoder of a parent's facts

    try:
        n = int.from_bytes(blob[:4], "big")
        suite, info = decode_facts(blob[4:4 + n])
    except StateError as exc:
        _log.warning("a reconnect parent in the shared state is malformed: %s", exc)
        return None
    width = TAG_LEN + suite.hash_len
    rest = blob[4 + n:]
    return suite, info, [(rest[o:o + TAG_LEN], rest[o + TAG_LEN:o + width]) for o in range(0, len(rest), width)]


def tls_record_length(header: bytes) -> int:
    """Check the 5-byte header of the first TLS record of a reconnect; its body length."""
    if len(header) != TLS_RECORD_HEADER_LEN or header[0] != TLS_HANDSHAKE_BYTE or header[1] != 3:
        raise RemoteProtocolError("the peer's first bytes are not a TLS handshake record")
    length = int.from_bytes(header[3:5], "big")
    if not 4 <= length <= TLS_MAX_RECORD:
        raise RemoteProtocolError(f"TLS record of {length} bytes is outside 4..{TLS_MAX_RECORD}")
    return length


def client_hello_cipher(record_body: bytes) -> str:
    """The cipher suite to bind a reconnect PSK to, from the body of the first TLS record.

    A server must choose the PSK's hash (SHA-256 or SHA-384) before OpenSSL reads the ClientHello,
    so it reads the ClientHello's cipher list first: the first suite the client offers that carries
    an external PSK here.  hybridkex clients offer exactly one (the parent suite's).  Strict: a
    malformed or fragmented ClientHello raises :class:`RemoteProtocolError`.
    """
    r = Reader(record_body, "TLS ClientHello")
    if r.u8("msg_type") != 1:
        raise RemoteProtocolError("the first TLS handshake message is not a ClientHello")
    r.fixed(3, "length")
    r.u16("legacy_version")
    r.fixed(32, "random")
    sid_len = r.u8("legacy_session_id")
    if sid_len > 32:
        raise RemoteProtocolError("TLS ClientHello: legacy_session_id longer than 32 bytes")
    r.fixed(sid_len, "legacy_session_id")
    return cipher_from_suites(r.vec16("cipher_suites", min_len=2, max_len=65534))


def cipher_from_suites(suites: bytes) -> str:
    """The first TLS 1.3 cipher suite in a ClientHello's ``cipher_suites`` that an external PSK is
    bound to here (see :func:`client_hello_cipher`)."""
    if len(suites) % 2:
        raise RemoteProtocolError("TLS ClientHello: odd cipher_suites length")
    for i in range(0, len(suites), 2):
        name = _CIPHER_BY_ID.get(int.from_bytes(suites[i:i + 2], "big"))
        if name is not None:
            return name
    raise TLSError("the ClientHello offers no TLS 1.3 cipher suite that an external PSK is bound to here "
                   f"({', '.join(CIPHER_ID)})")
