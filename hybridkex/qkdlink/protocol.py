"""The two ends of one block's post-processing as sans-IO state machines exchanging authenticated bytes.

Bob starts (:meth:`BobEnd.start`); after that each end turns the frame it received into the frame
to send (:meth:`receive`), strictly alternating, until both are :attr:`done`.  A driver carries the
frames over any transport (``run_in_memory`` here; a TCP socket between the KMEs in :mod:`.driver`).  The messages:

1. B->A ``CLICKS``: Bob's header (the driver's, e.g. the block number), which pulses clicked,
   Bob's bases.                                                                           [tag]
2. A->B ``SIFT``: Alice's header (the driver's, e.g. the last block she completed), Alice's
   bases and intensities, the pulses sent per intensity, the QBER sample (seed) with Alice's
   sample bits, her sifted decoy bits, the Cascade permutation seed.                      [tag]
3. B->A ``ESTIMATE``: the error counts; both ends then run the same estimate and the same abort
   decision; unless aborting, Bob's first Cascade queries.                                 [tag]
4. A->B ``ANSWERS`` / B->A ``QUERIES``, Cascade's round trips.                     [no tag: see below]
5. B->A ``CASCADE_DONE``                                                                  [tag]
6. A->B ``VERIFY``: a fresh Toeplitz seed and Alice's 64-bit hash of her key, the privacy
   amplification seed and the final length.                                                [tag]
7. B->A ``CONFIRM``                                                                         [tag]

Cascade's frames are covered by the tags that close them (5 for Bob's queries, 6 for Alice's
answers), so a tampered parity is caught before anything depends on the key; with
``tag_every_frame`` every frame carries its own tag instead (real-time, at 128 bits per frame).
Alice releases her key only after Bob's authenticated ``CONFIRM``; an abort (QBER, verification,
no secret key) is announced with an ``ABORT`` frame and leaves both ends without key; a frame that
fails authentication ends that end at once (:class:`~hybridkex.exceptions.LinkAuthenticationError`).
After a good block both ends move the first bits of the final key into their authentication pool
(up to ``auth_reserve_bits``) and return the rest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..exceptions import (
    BootstrapExhausted,
    HybridKEXError,
    LinkAbort,
    LinkAuthenticationError,
    QBERAbort,
    RemoteProtocolError,
)
from . import model
from . import postprocess as pp
from .auth import ChannelAuthenticator
from .cascade import CascadeAlice, CascadeBob, CascadeParams, Query
from .events import DECOY, SIGNAL, AliceRecord, BobRecord

__all__ = ["AliceEnd", "BlockResult", "BobEnd", "run_in_memory"]

CLICKS, SIFT, ESTIMATE, ANSWERS, QUERIES, CASCADE_DONE, VERIFY, CONFIRM, ABORT = range(1, 10)
TAGS_PER_BLOCK = 6
_ABORT_REASONS = {1: "qber", 2: "verification", 3: "no secret key", 4: "key length disagreement"}


@dataclass(frozen=True, repr=False)
class BlockResult:
    """A completed block: the key handed out and what it cost."""

    key: bytes
    qber: float
    leaked_ec_bits: int
    final_bits: int
    reserved_bits: int
    auth_consumed_bits: int
    frames: int

    def __repr__(self) -> str:
        return (f"BlockResult({8 * len(self.key)} key bits, qber={self.qber:.4f}, leaked={self.leaked_ec_bits}, "
                f"reserved={self.reserved_bits}, auth={self.auth_consumed_bits})")


# -- encoding ----------------------------------------------------------------------------------------

def _blob(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _bits(arr: NDArray[np.uint8]) -> bytes:
    return struct.pack(">I", len(arr)) + np.packbits(arr).tobytes()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._d, self._i = data, 0

    def take(self, n: int) -> bytes:
        if self._i + n > len(self._d):
            raise RemoteProtocolError("classical message truncated")
        out = self._d[self._i:self._i + n]
        self._i += n
        return out

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def f64(self) -> float:
        return float(struct.unpack(">d", self.take(8))[0])

    def blob(self) -> bytes:
        return self.take(int(struct.unpack(">I", self.take(4))[0]))

    def bits(self) -> NDArray[np.uint8]:
        n = int(struct.unpack(">I", self.take(4))[0])
        packed = np.frombuffer(self.take((n + 7) // 8), np.uint8)
        return np.unpackbits(packed)[:n].astype(np.uint8)

    def end(self) -> None:
        if self._i != len(self._d):
            raise RemoteProtocolError("trailing bytes in classical message")


def _queries(qs: list[Query]) -> bytes:
    return _blob(np.asarray(qs, dtype=">u4").reshape(-1, 3).tobytes())


def _read_queries(r: _Reader) -> list[Query]:
    arr = np.frombuffer(r.blob(), dtype=">u4").reshape(-1, 3)
    return [(int(p), int(lo), int(hi)) for p, lo, hi in arr]


# -- the two ends ------------------------------------------------------------------------------------

class _End:
    def __init__(self, link: model.LinkParameters, config: pp.PostProcessConfig, auth: ChannelAuthenticator,
                 *, tag_every_frame: bool, auth_reserve_bits: int) -> None:
        self.link, self.config, self.auth = link, config, auth
        self.tag_every_frame = tag_every_frame
        self.auth_reserve_bits = auth_reserve_bits
        self.done = False
        self.error: HybridKEXError | None = None
        self.result: BlockResult | None = None
        self.frames = 0
        self._last_verified = True
        #: The peer's authenticated header (from CLICKS or SIFT) once that frame has verified.
        self.peer_header: bytes | None = None
        self._start_consumed = auth.pool.consumed_bits
        self._estimate: pp.Estimate | None = None
        # Phase tags: at most 6 per block (CLICKS, SIFT, ESTIMATE, CASCADE_DONE, VERIFY, CONFIRM or an
        # ABORT in place of one of them), drawn up front so a dead block leaves the pools in step.
        self.auth.begin_block(None if tag_every_frame else TAGS_PER_BLOCK)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(done={self.done}, error={type(self.error).__name__ if self.error else None})"

    def key(self) -> bytes:
        """The block's key; raises the block's error if it gave none."""
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise LinkAbort("block not finished", reason="unfinished")
        return self.result.key

    def _send(self, kind: int, body: bytes, *, tag: bool = True) -> bytes:
        self.frames += 1
        return self.auth.seal(bytes([kind]) + body, tag=tag or self.tag_every_frame)

    def _open(self, frame: bytes) -> tuple[int, _Reader]:
        self.frames += 1
        payload, verified = self.auth.open(frame)
        self._last_verified = verified
        if not payload:
            raise RemoteProtocolError("empty classical message")
        if not verified and payload[0] not in (ANSWERS, QUERIES):
            # Only Cascade's round trips may wait for a later tag; anything else untagged was altered.
            raise LinkAuthenticationError(f"untagged classical message {payload[0]} where a tag is required")
        return payload[0], _Reader(payload[1:])

    def _fail(self, err: HybridKEXError) -> None:
        self.done, self.error, self.result = True, err, None

    def abandon(self, reason: str = "the peer stopped answering") -> None:
        """End an unfinished block without key (the driver lost the peer)."""
        if not self.done:
            self._fail(LinkAbort(f"{reason}; block discarded", reason="abandoned"))

    def _abort(self, err: LinkAbort | QBERAbort, code: int, qber: float = 0.0) -> bytes:
        frame = self._send(ABORT, bytes([code]) + struct.pack(">d", qber))
        self._fail(err)
        return frame

    def _peer_abort(self, r: _Reader) -> None:
        code, qber = r.take(1)[0], r.f64()
        reason = _ABORT_REASONS.get(code, "unknown")
        if reason == "qber":
            sample = int(getattr(self, "_sample_size", 0))  # Alice knows the size of the sample she drew
            self._fail(QBERAbort(qber=qber, threshold=self.config.qber_threshold, sample_size=sample))
        else:
            self._fail(LinkAbort(f"the peer aborted the block ({reason})", reason=reason))

    def _length(self, n_key: int, leaked: int) -> int:
        assert self._estimate is not None
        return pp.final_key_length(self._estimate, n_key, leaked, self.config)

    def _finish(self, reconciled: NDArray[np.uint8], seed: NDArray[np.uint8], length: int, leaked: int) -> None:
        final = pp.privacy_amplify(reconciled, seed, length)
        # Both pools are at the same level here (every tag consumed key at both ends), so both reserve
        # the same bits without saying so.
        reserve = min(length, max(0, self.auth_reserve_bits - self.auth.pool.available_bits)) // 8 * 8
        final_bytes = np.packbits(final).tobytes()
        self.auth.pool.replenish(final_bytes[:reserve // 8])
        rest = final[reserve:]
        key = np.packbits(rest[:len(rest) // 8 * 8]).tobytes()
        assert self._estimate is not None
        self.result = BlockResult(
            key=key, qber=self._estimate.qber, leaked_ec_bits=leaked, final_bits=length, reserved_bits=reserve,
            auth_consumed_bits=self.auth.pool.consumed_bits - self._start_consumed, frames=self.frames)
        self.done = True

    def receive(self, frame: bytes) -> bytes | None:
        """The frame to send in answer (None when there is none); check :attr:`done` and :attr:`error`."""
        if self.done:
            raise RemoteProtocolError("block already finished")
        try:
            try:
                kind, r = self._open(frame)
                if kind == ABORT:
                    self._peer_abort(r)
                    return None
                return self._handle(kind, r)
            except (ValueError, IndexError, struct.error) as exc:
                # Sizes numpy or struct refuse (a length field altered in flight): malformed, typed.
                raise RemoteProtocolError(f"malformed classical message ({exc})") from None
        except (LinkAuthenticationError, BootstrapExhausted) as err:
            self._fail(err)
            return None
        except RemoteProtocolError as err:
            if not self._last_verified:
                # Malformed and not (yet) authenticated: altered in flight, as the closing tag would show.
                self._fail(LinkAuthenticationError(f"unauthenticated classical message is malformed ({err})"))
            else:
                self._fail(err)
            return None

    def _handle(self, kind: int, r: _Reader) -> bytes | None:
        raise NotImplementedError


class AliceEnd(_End):
    """Alice: holds the reference key, answers Cascade, decides verification and privacy amplification.

    ``rng`` chooses the QBER sample and the hash seeds (public, but they must be unpredictable before
    Bob's clicks are fixed): a Generator seeded from the OS in production, a fixed seed in tests.
    """

    def __init__(self, record: AliceRecord, sent: tuple[int, int, int], link: model.LinkParameters,
                 config: pp.PostProcessConfig, auth: ChannelAuthenticator, *, rng: np.random.Generator,
                 tag_every_frame: bool = False, auth_reserve_bits: int = 4096, header: bytes = b"") -> None:
        super().__init__(link, config, auth, tag_every_frame=tag_every_frame, auth_reserve_bits=auth_reserve_bits)
        self._rec, self._sent, self._rng = record, sent, rng
        self._header = header
        self._key: NDArray[np.uint8] | None = None
        self._cascade: CascadeAlice | None = None
        self._pending: tuple[NDArray[np.uint8], NDArray[np.uint8], int, int] | None = None

    def _handle(self, kind: int, r: _Reader) -> bytes | None:
        if kind == CLICKS and self._key is None and self._estimate is None:
            self.peer_header = r.blob()
            index = np.frombuffer(r.blob(), dtype=">i8").astype(np.int64)
            bob_basis = r.bits()
            r.end()
            if not np.array_equal(index, self._rec.index) or len(bob_basis) != len(index):
                raise RemoteProtocolError("click list does not match the pulses sent")
            return self._sift(bob_basis)
        if kind == ESTIMATE and self._key is not None and self._cascade is None:
            sample_errors, decoy_errors = r.u64(), r.u64()
            queries = _read_queries(r)
            r.end()
            return self._estimate_and_answer(sample_errors, decoy_errors, queries)
        if kind == QUERIES and self._cascade is not None:
            queries = _read_queries(r)
            r.end()
            return self._send(ANSWERS, _bits(np.asarray(self._cascade.answer(queries), np.uint8)), tag=False)
        if kind == CASCADE_DONE and self._cascade is not None and self._pending is None:
            r.end()
            return self._verify()
        if kind == CONFIRM and self._pending is not None:
            r.end()
            key, seed, length, leaked = self._pending
            self._finish(key, seed, length, leaked)
            return None
        raise RemoteProtocolError(f"unexpected classical message {kind}")

    def _sift(self, bob_basis: NDArray[np.uint8]) -> bytes:
        rec = self._rec
        sifted = pp.sift(rec.basis, bob_basis)
        sig = sifted & (rec.intensity == SIGNAL)
        dec = sifted & (rec.intensity == DECOY)
        bits = rec.bit[sig]
        sample_seed = int(self._rng.integers(0, 2**63))
        pos = pp.sample_positions(len(bits), self.config.sample_fraction, np.random.default_rng(sample_seed))
        keep = np.ones(len(bits), bool)
        keep[pos] = False
        self._key = bits[keep]
        self._sample_size, self._decoy_sifted = len(pos), int(np.count_nonzero(dec))
        self._cascade_seed = int(self._rng.integers(0, 2**63))
        body = (_blob(self._header) + _bits(rec.basis) + _blob(rec.intensity.tobytes())
                + struct.pack(">QQQ", *self._sent) + struct.pack(">QQ", sample_seed, self._cascade_seed)
                + _bits(bits[pos]) + _bits(rec.bit[dec]))
        return self._send(SIFT, body)

    def _estimate_and_answer(self, sample_errors: int, decoy_errors: int, queries: list[Query]) -> bytes | None:
        assert self._key is not None
        try:
            self._estimate = pp.estimate(
                link=self.link, config=self.config, sent=self._sent,
                clicks=pp.split_by_intensity(self._rec.intensity), sample_errors=sample_errors,
                sample_size=self._sample_size, decoy_errors=decoy_errors, decoy_sifted=self._decoy_sifted)
        except QBERAbort as err:
            # Bob reached the same decision and said so; a Bob who carries on is not following the protocol.
            raise RemoteProtocolError("peer continued past a QBER abort") from err
        params = CascadeParams.for_qber(len(self._key), self._estimate.qber, self._cascade_seed,
                                        self.config.cascade_passes)
        self._cascade = CascadeAlice(self._key, params)
        return self._send(ANSWERS, _bits(np.asarray(self._cascade.answer(queries), np.uint8)), tag=False)

    def _verify(self) -> bytes:
        assert self._key is not None and self._cascade is not None
        leaked = self._cascade.answered
        length = self._length(len(self._key), leaked)
        n = len(self._key)
        ver_seed = self._rng.integers(0, 2, n + self.config.ver_bits - 1, dtype=np.uint8)
        tag = pp.verification_tag(self._key, ver_seed, self.config.ver_bits)
        pa_seed = self._rng.integers(0, 2, n + max(length, 1) - 1, dtype=np.uint8)
        self._pending = (self._key, pa_seed, length, leaked)
        return self._send(VERIFY, _bits(ver_seed) + _blob(tag) + _bits(pa_seed) + struct.pack(">Q", length))


class BobEnd(_End):
    """Bob: announces his clicks, estimates, drives Cascade, checks the verification hash."""

    def __init__(self, record: BobRecord, link: model.LinkParameters, config: pp.PostProcessConfig,
                 auth: ChannelAuthenticator, *, tag_every_frame: bool = False, auth_reserve_bits: int = 4096,
                 header: bytes = b"") -> None:
        super().__init__(link, config, auth, tag_every_frame=tag_every_frame, auth_reserve_bits=auth_reserve_bits)
        self._rec = record
        self._header = header
        self._cascade: CascadeBob | None = None
        self._verified = False

    def start(self) -> bytes:
        clicks = _blob(self._rec.index.astype(">i8").tobytes()) + _bits(self._rec.basis)
        return self._send(CLICKS, _blob(self._header) + clicks)

    def _handle(self, kind: int, r: _Reader) -> bytes | None:
        if kind == SIFT and self._estimate is None and self._cascade is None:
            return self._sifted(r)
        if kind == ANSWERS and self._cascade is not None and not self._cascade.done:
            answers = r.bits()
            r.end()
            self._cascade.receive([int(b) for b in answers])
            if self._cascade.done:
                return self._send(CASCADE_DONE, b"")
            return self._send(QUERIES, _queries(self._cascade.queries()), tag=False)
        if kind == VERIFY and self._cascade is not None and self._cascade.done and not self._verified:
            return self._check(r)
        raise RemoteProtocolError(f"unexpected classical message {kind}")

    def _sifted(self, r: _Reader) -> bytes:
        header = r.blob()
        a_basis = r.bits()
        intensity = np.frombuffer(r.blob(), np.uint8)
        sent = (r.u64(), r.u64(), r.u64())
        sample_seed, cascade_seed = r.u64(), r.u64()
        a_sample, a_decoy = r.bits(), r.bits()
        r.end()
        self.peer_header = header  # the frame is authenticated (tagged) and well formed
        rec = self._rec
        if len(a_basis) != len(rec.basis) or len(intensity) != len(rec.basis):
            raise RemoteProtocolError("sifting lists do not match the clicks")
        sifted = pp.sift(a_basis, rec.basis)
        sig = sifted & (intensity == SIGNAL)
        dec = sifted & (intensity == DECOY)
        bits = rec.bit[sig]
        pos = pp.sample_positions(len(bits), self.config.sample_fraction, np.random.default_rng(sample_seed))
        if len(a_sample) != len(pos) or len(a_decoy) != int(np.count_nonzero(dec)):
            raise RemoteProtocolError("sample does not match the sifted clicks")
        sample_errors = int(np.count_nonzero(a_sample != bits[pos]))
        decoy_errors = int(np.count_nonzero(a_decoy != rec.bit[dec]))
        keep = np.ones(len(bits), bool)
        keep[pos] = False
        try:
            self._estimate = pp.estimate(
                link=self.link, config=self.config, sent=sent, clicks=pp.split_by_intensity(intensity),
                sample_errors=sample_errors, sample_size=len(pos), decoy_errors=decoy_errors,
                decoy_sifted=len(a_decoy))
        except QBERAbort as err:
            return self._abort(err, 1, err.qber)
        key = bits[keep]
        params = CascadeParams.for_qber(len(key), self._estimate.qber, cascade_seed, self.config.cascade_passes)
        self._cascade = CascadeBob(key, params)
        return self._send(ESTIMATE, struct.pack(">QQ", sample_errors, decoy_errors) + _queries(self._cascade.queries()))

    def _check(self, r: _Reader) -> bytes:
        assert self._cascade is not None
        ver_seed, tag, pa_seed, length = r.bits(), r.blob(), r.bits(), r.u64()
        r.end()
        key = self._cascade.bits
        leaked = self._cascade.leaked_bits
        if len(ver_seed) != len(key) + self.config.ver_bits - 1 or len(pa_seed) != len(key) + max(length, 1) - 1:
            raise RemoteProtocolError("hash seeds of the wrong length")
        if pp.verification_tag(key, ver_seed, self.config.ver_bits) != tag:
            return self._abort(LinkAbort("error verification failed: keys differ after Cascade; block discarded",
                                         reason="verification"), 2)
        mine = self._length(len(key), leaked)
        if mine != length:
            return self._abort(LinkAbort("the two ends computed different key lengths", reason="length"), 4)
        if length <= 0:
            return self._abort(LinkAbort("no secret key in this block (finite-size bound is zero)",
                                         reason="no secret key"), 3)
        self._verified = True
        frame = self._send(CONFIRM, b"")
        self._finish(key, pa_seed, length, leaked)
        return frame


def run_in_memory(alice: AliceEnd, bob: BobEnd, *, tamper: object = None, max_frames: int = 100_000) -> int:
    """Carry frames between the ends until neither has more to say; return the frame count.

    ``tamper`` (tests): a callable ``(number, frame) -> frame`` applied to every frame in flight.
    """
    frame: bytes | None = bob.start()
    to_alice = True
    n = 0
    while frame is not None and n < max_frames:
        if callable(tamper):
            frame = tamper(n, frame)
        n += 1
        end: _End = alice if to_alice else bob
        frame = end.receive(frame) if not end.done else None
        to_alice = not to_alice
    # One end stopped on a tampered frame and sent nothing: the other never completes (no key).
    alice.abandon()
    bob.abandon()
    return n
