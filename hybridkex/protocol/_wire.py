"""The handshake wire format (docs/spec.md, "Wire format"): frames and message bodies.

Everything that turns bytes into messages is here, and it is strict: every length is checked
against a bound before anything is copied, every field is fully consumed, and every malformation
becomes a :class:`~hybridkex.exceptions.RemoteProtocolError` (a :class:`VersionError` for an
unknown version).  No ``IndexError``, ``struct.error`` or ``UnicodeError`` escapes: the
:class:`~hybridkex.hazmat.encoding.Reader` converts them at the source.

This module knows nothing about state or cryptography; it only checks shapes.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from ..exceptions import RemoteProtocolError, VersionError
from ..hazmat.encoding import Reader, u8, u16

__all__ = [
    "HEADER_LEN",
    "KEM_CODES",
    "MAGIC",
    "MAX_BODY",
    "MAX_SHARE",
    "MAX_SHARES",
    "VERSION",
    "AbortCode",
    "CertificateChain",
    "CertificateMsg",
    "FinishedMsg",
    "FrameType",
    "HelloMsg",
    "HelloQKD",
    "KeyShare",
    "QKDMaster",
    "QKDNote",
    "QKDUsage",
    "ResponseMsg",
    "ResponseQKD",
    "SignatureAlgorithm",
    "encode_abort",
    "encode_frame",
    "parse_header",
]

#: First two bytes of every frame: "HK".  A peer that is not speaking hybridkex (a TLS client
#: connecting to the wrong port, say) is told apart from one speaking another version.
MAGIC = b"HK"
#: The one protocol version this implementation speaks.
VERSION = 1

_HEADER = struct.Struct(">2sBBI")
#: magic (2) || version (1) || type (1) || body length (4)
HEADER_LEN = _HEADER.size


class FrameType(IntEnum):
    """The frame types; each frame carries exactly one message."""

    HELLO = 0x01
    RESPONSE = 0x02
    CERTIFICATE = 0x03
    FINISHED = 0x04
    ABORT = 0x7F


#: Largest body accepted per frame type, checked on the header before the body is buffered.
MAX_BODY: dict[FrameType, int] = {
    FrameType.HELLO: 64 * 1024,
    FrameType.RESPONSE: 32 * 1024,
    FrameType.CERTIFICATE: 64 * 1024,
    FrameType.FINISHED: 8 * 1024,
    FrameType.ABORT: 1,
}


class AbortCode(IntEnum):
    """Why a side gave up. Deliberately coarse: the peer learns *that* it failed, not *which check*."""

    #: Anything else (internal error, cancelled by the application).
    GENERIC = 0
    #: A message could not be parsed.
    DECODE_ERROR = 1
    #: A message arrived in a state that does not allow it.
    UNEXPECTED_MESSAGE = 2
    #: The frame version is not supported.
    UNSUPPORTED_VERSION = 3
    #: Authentication or key confirmation failed (never says which).
    AUTHENTICATION_FAILED = 4
    #: No suite, authentication mode, QKD role or key budget acceptable to both sides.
    POLICY = 5
    #: QKD keys could not be obtained and the policy requires them.
    QKD_UNAVAILABLE = 6
    #: A deadline passed.
    TIMEOUT = 7
    #: This side's KME does not know the QKD key ID(s) the master sent (stale: e.g. a KME restart); the
    #: master should discard the keys it pooled for this peer, and a new handshake can succeed.
    QKD_KEY_UNKNOWN = 8
    #: The responder refused the connection under its connection limits (rate or count); retry later.
    RATE_LIMITED = 9


class QKDMaster(IntEnum):
    """Which side is the ETSI GS QKD 014 master (calls "Get key"); the other fetches by key ID."""

    NONE = 0
    RESPONDER = 1
    INITIATOR = 2


class QKDUsage(IntEnum):
    """How the QKD key of this handshake is budgeted (docs/spec.md, "QKD key budget")."""

    NONE = 0
    FRESH = 1
    EPOCH = 2


#: Bits of the "accepted usages" field of a Hello.
USAGE_BIT = {QKDUsage.FRESH: 0x01, QKDUsage.EPOCH: 0x02}


class QKDNote(IntEnum):
    """Why a side runs without QKD, so that a session without QKD is never silent about it."""

    NONE = 0
    #: The sender's policy disables QKD (or it has no QKD configuration).
    DISABLED_BY_POLICY = 1
    #: The sender's key source could not deliver and its policy allowed going on without QKD.
    KEY_SOURCE_UNAVAILABLE = 2


class SignatureAlgorithm(IntEnum):
    """Certificate chains and Finished signatures."""

    ED25519 = 1
    MLDSA65 = 2


#: Wire codes of post-quantum KEMs in Hello key shares (X25519 is always present, separately).
#: 0x0102 and 0x0104 were liboqs's pre-0.16 HQC-128/HQC-192, a different HQC version: retired, not reused.
#: Classic McEliece has no code: its public keys exceed MAX_SHARE.
KEM_CODES: dict[str, int] = {
    "ML-KEM-768": 0x0001,
    "ML-KEM-1024": 0x0002,
    "FrodoKEM-640-AES": 0x0101,
    "FrodoKEM-976-AES": 0x0103,
    "HQC-1": 0x0105,
    "HQC-3": 0x0106,
    "HQC-5": 0x0107,
}
KEM_BY_CODE: dict[int, str] = {v: k for k, v in KEM_CODES.items()}

_MAX_TEXT = 255
_MAX_SUITES = 16
#: Most key shares (distinct post-quantum KEMs) in one Hello.
MAX_SHARES = 4
#: Largest post-quantum encapsulation key or ciphertext a Hello or Response carries (a vec16).
MAX_SHARE = 16 * 1024
_MAX_AUTH_MODES = 8
_MAX_KEY_IDS = 16
_KEY_ID_LEN = 36
_MAX_CHAIN = 4
_MAX_CERT = 16 * 1024
_MAX_PROOF = 6 * 1024
NONCE_LEN = 32
#: Wire id of the recycled authentication mode (``auth.AuthMode.RECYCLED``; auth imports this module).
RECYCLED_MODE = 5
#: Recycled authentication keys are named by public 16-byte IDs (docs/spec.md, "Recycled authentication").
RECYCLED_KEY_ID_LEN = 16
#: Most recycled key IDs a Hello may list.
MAX_RECYCLED_KEY_IDS = 16
_E = TypeVar("_E", bound=IntEnum)
#: 8-4-4-4-12 hex digits in either case: exactly the key IDs whose UUID is their lower-case form.
_CANONICAL_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
X25519_LEN = 32


def encode_frame(frame_type: FrameType, body: bytes) -> bytes:
    """``"HK" || u8(version) || u8(type) || u32(len(body)) || body``."""
    if len(body) > MAX_BODY[frame_type]:
        # Our own message is too large: a configuration problem (e.g. a huge certificate chain).
        raise ValueError(f"{frame_type.name} body of {len(body)} bytes exceeds {MAX_BODY[frame_type]}")
    return _HEADER.pack(MAGIC, VERSION, frame_type, len(body)) + body


def parse_header(header: bytes) -> tuple[FrameType, int]:
    """Check a frame header; returns ``(type, body length)``.

    Raises RemoteProtocolError for a bad magic, unknown type or oversized body and VersionError for
    an unsupported version, all before a single body byte is buffered.
    """
    magic, version, raw_type, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise RemoteProtocolError("the peer is not speaking the hybridkex handshake (bad frame magic)")
    if version != VERSION:
        raise VersionError(f"the peer speaks hybridkex handshake version {version}; this side supports {VERSION}")
    try:
        frame_type = FrameType(raw_type)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame type 0x{raw_type:02x}") from None
    if length > MAX_BODY[frame_type]:
        raise RemoteProtocolError(
            f"{frame_type.name} frame of {length} bytes exceeds the maximum {MAX_BODY[frame_type]}")
    return frame_type, length


# --- field helpers ---------------------------------------------------------------------------------


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > _MAX_TEXT:
        raise ValueError(f"text field longer than {_MAX_TEXT} bytes")
    return u16(len(raw)) + raw


def _vec16(value: bytes) -> bytes:
    return u16(len(value)) + value


def _key_id(value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) != _KEY_ID_LEN:
        raise ValueError("QKD key IDs are canonical 36-character UUIDs")
    return raw


def _read_key_ids(r: Reader, what: str) -> tuple[str, ...]:
    n = r.u8(f"{what} count")
    if n > _MAX_KEY_IDS:
        raise RemoteProtocolError(f"{what}: {n} key IDs, at most {_MAX_KEY_IDS} allowed")
    out: list[str] = []
    for _ in range(n):
        raw = r.fixed(_KEY_ID_LEN, what)
        if _CANONICAL_UUID.fullmatch(raw) is None:  # the pattern settles the usual case, no UUID object
            try:
                uuid.UUID(raw.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise RemoteProtocolError(f"{what}: a key ID is not a UUID") from None
            raise RemoteProtocolError(f"{what}: a key ID is not a canonical UUID")
        out.append(raw.decode("ascii"))
    if len(set(out)) != len(out):
        raise RemoteProtocolError(f"{what}: duplicate key ID")
    return tuple(out)


def _recycled_ids(ids: tuple[bytes, ...], most: int) -> bytes:
    if len(ids) > most or any(len(k) != RECYCLED_KEY_ID_LEN for k in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"at most {most} distinct {RECYCLED_KEY_ID_LEN}-byte recycled key IDs")
    return u8(len(ids)) + b"".join(ids)


def _read_recycled_ids(r: Reader, most: int, what: str) -> tuple[bytes, ...]:
    n = r.u8(f"{what} count")
    if n > most:
        raise RemoteProtocolError(f"{what}: {n} key IDs, at most {most} allowed")
    ids = tuple(r.fixed(RECYCLED_KEY_ID_LEN, what) for _ in range(n))
    if len(set(ids)) != n:
        raise RemoteProtocolError(f"{what}: duplicate key ID")
    return ids


def _read_enum(r: Reader, enum: type[_E], field: str) -> _E:
    raw = r.u8(field)
    try:
        return enum(raw)
    except ValueError:
        raise RemoteProtocolError(f"field {field!r} has unknown value {raw}") from None


def _identity(r: Reader, field: str) -> str:
    return r.text16(field, min_len=1, max_len=_MAX_TEXT)


# --- messages --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyShare:
    """An initiator's post-quantum encapsulation key for one KEM."""

    kem_code: int
    public_key: bytes


@dataclass(frozen=True, slots=True)
class HelloQKD:
    """The QKD part of a Hello."""

    master: QKDMaster
    #: The initiator's SAE and KME IDs (empty when ``master`` is NONE).
    sae_id: str
    kme_id: str
    #: Bit set of :class:`QKDUsage` the initiator accepts when the responder is master.
    accepted_usages: int
    note: QKDNote
    # Only when the initiator is master: the keys it took for the responder's SAE.
    peer_sae_id: str = ""
    usage: QKDUsage = QKDUsage.NONE
    key_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HelloMsg:
    """Initiator → responder: offer."""

    suites: tuple[int, ...]
    identity: str
    nonce: bytes
    x25519: bytes
    key_shares: tuple[KeyShare, ...]
    auth_modes: tuple[int, ...]
    qkd: HelloQKD
    #: Recycled authentication (present on the wire iff mode 5 is offered): the IDs of the keys the
    #: initiator holds for the responder, newest first; none = "recycling, but no key yet".
    recycled_key_ids: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        q = self.qkd
        if RECYCLED_MODE in self.auth_modes:
            recycled = _recycled_ids(self.recycled_key_ids, MAX_RECYCLED_KEY_IDS)
        elif self.recycled_key_ids:
            raise ValueError("recycled key IDs without the recycled authentication mode")
        else:
            recycled = b""
        return b"".join((
            u8(len(self.suites)), *(u16(s) for s in self.suites),
            _text(self.identity),
            self.nonce,
            self.x25519,
            u8(len(self.key_shares)), *(u16(k.kem_code) + _vec16(k.public_key) for k in self.key_shares),
            u8(len(self.auth_modes)), *(u8(m) for m in self.auth_modes),
            u8(q.master), _text(q.sae_id), _text(q.kme_id), u8(q.accepted_usages), u8(q.note),
            _text(q.peer_sae_id), u8(q.usage), u8(len(q.key_ids)), *(_key_id(k) for k in q.key_ids),
            recycled,
        ))

    @classmethod
    def decode(cls, body: bytes) -> HelloMsg:
        r = Reader(body, "Hello")
        n = r.u8("suite count")
        if not 1 <= n <= _MAX_SUITES:
            raise RemoteProtocolError(f"Hello: {n} suites offered, allowed 1..{_MAX_SUITES}")
        suites = tuple(r.u16("suite") for _ in range(n))
        if len(set(suites)) != n:
            raise RemoteProtocolError("Hello: a suite is offered twice")
        identity = _identity(r, "identity")
        nonce = r.fixed(NONCE_LEN, "nonce")
        x25519 = r.fixed(X25519_LEN, "x25519 public key")
        n = r.u8("key share count")
        if not 1 <= n <= MAX_SHARES:
            raise RemoteProtocolError(f"Hello: {n} key shares, allowed 1..{MAX_SHARES}")
        shares = []
        for _ in range(n):
            code = r.u16("key share KEM")
            shares.append(KeyShare(code, r.vec16("key share", min_len=1, max_len=MAX_SHARE)))
        if len({s.kem_code for s in shares}) != n:
            raise RemoteProtocolError("Hello: two key shares for one KEM")
        n = r.u8("auth mode count")
        if not 1 <= n <= _MAX_AUTH_MODES:
            raise RemoteProtocolError(f"Hello: {n} authentication modes, allowed 1..{_MAX_AUTH_MODES}")
        modes = tuple(r.u8("auth mode") for _ in range(n))
        if len(set(modes)) != n:
            raise RemoteProtocolError("Hello: an authentication mode is offered twice")
        master = _read_enum(r, QKDMaster, "qkd master")
        sae_id = r.text16("qkd sae id", max_len=_MAX_TEXT)
        kme_id = r.text16("qkd kme id", max_len=_MAX_TEXT)
        accepted = r.u8("qkd accepted usages")
        note = _read_enum(r, QKDNote, "qkd note")
        peer_sae_id = r.text16("qkd peer sae id", max_len=_MAX_TEXT)
        usage = _read_enum(r, QKDUsage, "qkd usage")
        key_ids = _read_key_ids(r, "Hello qkd key ids")
        recycled = (_read_recycled_ids(r, MAX_RECYCLED_KEY_IDS, "Hello recycled key ids")
                    if RECYCLED_MODE in modes else ())
        r.end()
        # Consistency of the QKD fields: shapes only; what is acceptable is policy (the connection).
        if accepted & ~0x03:
            raise RemoteProtocolError("Hello: unknown bits in qkd accepted usages")
        if master is QKDMaster.NONE:
            if sae_id or kme_id or accepted or peer_sae_id or usage or key_ids:
                raise RemoteProtocolError("Hello: QKD fields present although no QKD master is named")
        else:
            if not sae_id or not kme_id:
                raise RemoteProtocolError("Hello: QKD master named but SAE or KME ID missing")
            if note is not QKDNote.NONE:
                raise RemoteProtocolError("Hello: a QKD note is set although QKD is offered")
            if master is QKDMaster.RESPONDER:
                if not accepted or peer_sae_id or usage or key_ids:
                    raise RemoteProtocolError("Hello: inconsistent QKD fields for a responder master")
            elif not peer_sae_id or usage is QKDUsage.NONE or not key_ids or accepted:
                raise RemoteProtocolError("Hello: inconsistent QKD fields for an initiator master")
        return cls(suites, identity, nonce, x25519, tuple(shares), modes,
                   HelloQKD(master, sae_id, kme_id, accepted, note, peer_sae_id, usage, key_ids), recycled)


@dataclass(frozen=True, slots=True)
class ResponseQKD:
    """The QKD part of a Response."""

    usage: QKDUsage
    note: QKDNote
    #: The responder's SAE and KME IDs (empty without QKD).
    sae_id: str
    kme_id: str
    #: Only when the responder is master: the key IDs it took for the initiator's SAE.
    key_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ResponseMsg:
    """Responder → initiator: choice and key exchange."""

    suite: int
    auth_mode: int
    identity: str
    nonce: bytes
    x25519: bytes
    kem_ciphertext: bytes
    qkd: ResponseQKD
    #: Recycled authentication (present on the wire iff ``auth_mode`` is 5): the ID of the key the
    #: responder chose from the Hello's list (None for a recycled authenticator without key IDs).
    recycled_key_id: bytes | None = None

    def encode(self) -> bytes:
        q = self.qkd
        chosen = () if self.recycled_key_id is None else (self.recycled_key_id,)
        if self.auth_mode == RECYCLED_MODE:
            recycled = _recycled_ids(chosen, 1)
        elif chosen:
            raise ValueError("a recycled key ID without the recycled authentication mode")
        else:
            recycled = b""
        return b"".join((
            u16(self.suite), u8(self.auth_mode), _text(self.identity), self.nonce, self.x25519,
            _vec16(self.kem_ciphertext),
            u8(q.usage), u8(q.note), _text(q.sae_id), _text(q.kme_id),
            u8(len(q.key_ids)), *(_key_id(k) for k in q.key_ids),
            recycled,
        ))

    @classmethod
    def decode(cls, body: bytes) -> ResponseMsg:
        r = Reader(body, "Response")
        suite = r.u16("suite")
        auth_mode = r.u8("auth mode")
        identity = _identity(r, "identity")
        nonce = r.fixed(NONCE_LEN, "nonce")
        x25519 = r.fixed(X25519_LEN, "x25519 public key")
        ct = r.vec16("kem ciphertext", min_len=1, max_len=MAX_SHARE)
        usage = _read_enum(r, QKDUsage, "qkd usage")
        note = _read_enum(r, QKDNote, "qkd note")
        sae_id = r.text16("qkd sae id", max_len=_MAX_TEXT)
        kme_id = r.text16("qkd kme id", max_len=_MAX_TEXT)
        key_ids = _read_key_ids(r, "Response qkd key ids")
        chosen = _read_recycled_ids(r, 1, "Response recycled key id") if auth_mode == RECYCLED_MODE else ()
        r.end()
        if usage is QKDUsage.NONE:
            if sae_id or kme_id or key_ids:
                raise RemoteProtocolError("Response: QKD fields present although no QKD key is used")
        else:
            if not sae_id or not kme_id:
                raise RemoteProtocolError("Response: QKD used but SAE or KME ID missing")
            if note is not QKDNote.NONE:
                raise RemoteProtocolError("Response: a QKD note is set although QKD is used")
        return cls(suite, auth_mode, identity, nonce, x25519, ct, ResponseQKD(usage, note, sae_id, kme_id, key_ids),
                   chosen[0] if chosen else None)


@dataclass(frozen=True, slots=True)
class CertificateChain:
    """One certificate chain, leaf first, DER; every signature in it made with ``algorithm``."""

    algorithm: SignatureAlgorithm
    certificates: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class CertificateMsg:
    """The sender's certificate chains (one per signature algorithm of the authentication mode)."""

    chains: tuple[CertificateChain, ...]

    def encode(self) -> bytes:
        out = [u8(len(self.chains))]
        for chain in self.chains:
            out.append(u8(chain.algorithm) + u8(len(chain.certificates)))
            out.extend(_vec16(c) for c in chain.certificates)
        return b"".join(out)

    @classmethod
    def decode(cls, body: bytes) -> CertificateMsg:
        r = Reader(body, "Certificate")
        n = r.u8("chain count")
        if not 1 <= n <= 2:
            raise RemoteProtocolError(f"Certificate: {n} chains, allowed 1..2")
        chains = []
        for _ in range(n):
            alg = _read_enum(r, SignatureAlgorithm, "chain algorithm")
            count = r.u8("certificate count")
            if not 1 <= count <= _MAX_CHAIN:
                raise RemoteProtocolError(f"Certificate: chain of {count} certificates, allowed 1..{_MAX_CHAIN}")
            certs = tuple(r.vec16("certificate", min_len=1, max_len=_MAX_CERT) for _ in range(count))
            chains.append(CertificateChain(alg, certs))
        r.end()
        if len({c.algorithm for c in chains}) != n:
            raise RemoteProtocolError("Certificate: two chains for one algorithm")
        return cls(tuple(chains))


@dataclass(frozen=True, slots=True)
class FinishedMsg:
    """Key confirmation MAC and authentication proof."""

    confirm: bytes
    proof: bytes

    def encode(self) -> bytes:
        return self.confirm + _vec16(self.proof)

    @classmethod
    def decode(cls, body: bytes, confirm_len: int) -> FinishedMsg:
        r = Reader(body, "Finished")
        confirm = r.fixed(confirm_len, "confirm")
        proof = r.vec16("proof", min_len=1, max_len=_MAX_PROOF)
        r.end()
        return cls(confirm, proof)


def encode_abort(code: AbortCode) -> bytes:
    return encode_frame(FrameType.ABORT, u8(code))


def decode_abort(body: bytes) -> int:
    """The abort code (unknown codes are returned as they are, to be treated as GENERIC)."""
    r = Reader(body, "Abort")
    code = r.u8("code")
    r.end()
    return code

