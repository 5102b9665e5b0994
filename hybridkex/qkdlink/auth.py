"""Wegman-Carter authentication of the link's classical channel, with one-time key material.

The tag of a message is ``(h_r(m) + s) mod p`` with h the polynomial hash over GF(2^127 - 1)
(:func:`.hashing.poly127`, (L/p)-almost-Delta-universal), ``r`` a hash key drawn once per block and
``s`` a one-time pad drawn afresh for every tag (Wegman & Carter, JCSS 22 (1981); reusing ``r``
under fresh pads is their construction).  A forger who sees any number of tagged messages succeeds
with probability at most L/p per attempt, about 2^-113 for a megabyte: the security is
information-theoretic, not computational.

The key material comes from a :class:`KeyPool`: the bootstrap pre-shared secret first, then slices
reserved from each completed block's output (:meth:`KeyPool.replenish`).  Both ends draw from their
pools in the same order, so they stay in step without telling each other anything.  Every draw is
counted (:attr:`KeyPool.consumed_bits`); an empty pool is :class:`~hybridkex.exceptions.BootstrapExhausted`.

The protocol is strictly alternating, so both ends make and check tags in the same order and
draw the same pads for the same tag.  Frames are ``seq (8 bytes) | flag (1) | payload | [tag (16)]``.
A tag covers every frame the sender sent since its previous tag (the *segment*), so the protocol
chooses per message between real-time authentication (a tag on every frame) and a tag at the end of
each phase (far less key for Cascade's many round trips); a receiver must not act irreversibly on
an untagged frame before the tag that closes its segment has verified.  Sequence numbers per
direction stop replay and reordering.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from ..exceptions import BootstrapExhausted, ConfigurationError, LinkAuthenticationError
from .hashing import P127, poly127

__all__ = ["TAG_BYTES", "ChannelAuthenticator", "KeyPool"]

TAG_BYTES = 16
KEY_BYTES = 16
_HEADER = 9


@dataclass(repr=False)
class KeyPool:
    """One-time authentication key, consumed front to back; never reused."""

    bootstrap: bytes
    _material: bytearray = field(init=False)
    consumed_bits: int = field(init=False, default=0)
    replenished_bits: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.bootstrap) < 2 * KEY_BYTES:
            raise ConfigurationError(f"needs at least {2 * KEY_BYTES} bytes", field="bootstrap")
        self._material = bytearray(self.bootstrap)
        self.bootstrap = b""  # only the pool keeps it, and only until used

    def __repr__(self) -> str:  # never the key material
        return f"KeyPool(available={self.available_bits} bits, consumed={self.consumed_bits} bits)"

    @property
    def available_bits(self) -> int:
        return 8 * len(self._material)

    def take(self, n_bytes: int) -> bytes:
        if n_bytes > len(self._material):
            if self.replenished_bits == 0:
                raise BootstrapExhausted(
                    f"authentication key exhausted: the bootstrap secret ran out before the first block completed "
                    f"(needed {8 * n_bytes} more bits, {self.available_bits} left)")
            raise BootstrapExhausted(
                f"authentication key exhausted: {self.available_bits} bits left, {8 * n_bytes} needed")
        out = bytes(self._material[:n_bytes])
        del self._material[:n_bytes]
        self.consumed_bits += 8 * n_bytes
        return out

    def replenish(self, key: bytes) -> None:
        """Add key reserved from a completed block (both ends must add the same bytes)."""
        self._material += key
        self.replenished_bits += 8 * len(key)


class ChannelAuthenticator:
    """One end's view of the authenticated channel: seals frames it sends, opens frames it receives."""

    def __init__(self, pool: KeyPool, *, initiator: bool) -> None:
        self._pool = pool
        self._me, self._peer = (b"A", b"B") if initiator else (b"B", b"A")
        self._r: int | None = None
        self._pads: list[bytes] | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._send_segment: list[bytes] = []
        self._recv_segment: list[bytes] = []
        self.tags_sent = 0
        self.tags_verified = 0

    def __repr__(self) -> str:
        return f"ChannelAuthenticator(sent={self._send_seq}, received={self._recv_seq}, pool={self._pool!r})"

    @property
    def pool(self) -> KeyPool:
        return self._pool

    def begin_block(self, tags: int | None = None) -> None:
        """Draw the block's hash key; both ends call it at the same point (before the first frame).

        With ``tags`` the pads for that many tags are drawn now, so the two pools stay in step even
        when a block dies half way (a failed tag, an abort): the next block starts at the same place
        on both ends.  Without it pads are drawn as tags are made (then a block that dies half way can
        leave the pools out of step).
        """
        self._r = int.from_bytes(self._pool.take(KEY_BYTES), "big") & P127
        if self._r == P127:  # the one 127-bit value outside Z_p
            self._r = 0
        self._pads = None if tags is None else [self._pool.take(KEY_BYTES) for _ in range(tags)]

    @property
    def pending_unverified(self) -> int:
        """Frames received whose segment has not been closed by a verified tag yet."""
        return len(self._recv_segment)

    def _tag(self, direction: bytes, segment: list[bytes]) -> bytes:
        if self._r is None:
            raise ConfigurationError("begin_block() first", field="auth")
        if self._pads is None:
            raw = self._pool.take(KEY_BYTES)
        elif self._pads:
            raw = self._pads.pop(0)
        else:
            raise BootstrapExhausted("more tags in this block than the pads drawn for it")
        pad = int.from_bytes(raw, "big") % P127
        body = direction + b"".join(len(f).to_bytes(8, "big") + f for f in segment)
        return ((poly127(self._r, body) + pad) % P127).to_bytes(TAG_BYTES, "big")

    def seal(self, payload: bytes, *, tag: bool = True) -> bytes:
        """Frame ``payload``; with ``tag`` the frame closes (and authenticates) the current segment."""
        head = self._send_seq.to_bytes(8, "big") + (b"\x01" if tag else b"\x00")
        self._send_seq += 1
        self._send_segment.append(head + payload)
        if not tag:
            return head + payload
        mac = self._tag(self._me, self._send_segment)
        self._send_segment = []
        self.tags_sent += 1
        return head + payload + mac

    def open(self, frame: bytes) -> tuple[bytes, bool]:
        """The payload and whether its segment is now verified; a bad tag, a wrong sequence number or a
        malformed frame raises :class:`LinkAuthenticationError` (the block must be discarded)."""
        if len(frame) < _HEADER:
            raise LinkAuthenticationError("classical frame too short")
        seq, flag = int.from_bytes(frame[:8], "big"), frame[8]
        if seq != self._recv_seq:
            raise LinkAuthenticationError(f"classical frame out of sequence (got {seq}, expected {self._recv_seq})")
        if flag not in (0, 1) or (flag == 1 and len(frame) < _HEADER + TAG_BYTES):
            raise LinkAuthenticationError("malformed classical frame")
        self._recv_seq += 1
        if flag == 0:
            self._recv_segment.append(frame)
            return frame[_HEADER:], False
        body, mac = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
        self._recv_segment.append(body)
        expected = self._tag(self._peer, self._recv_segment)
        self._recv_segment = []
        if not hmac.compare_digest(expected, mac):
            raise LinkAuthenticationError("Wegman-Carter tag mismatch on the classical channel")
        self.tags_verified += 1
        return body[_HEADER:], True
