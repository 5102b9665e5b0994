"""Wegman-Carter authentication of the classical channel: every change is caught, key use is counted."""

from __future__ import annotations

import pytest

from hybridkex.exceptions import AuthenticationError, BootstrapExhausted, ConfigurationError, LinkAuthenticationError
from hybridkex.qkdlink.auth import TAG_BYTES, ChannelAuthenticator, KeyPool
from hybridkex.qkdlink.hashing import P127, poly127

PSK = bytes(range(200))


def pair(psk: bytes = PSK, tags: int | None = None) -> tuple[ChannelAuthenticator, ChannelAuthenticator]:
    a = ChannelAuthenticator(KeyPool(psk), initiator=True)
    b = ChannelAuthenticator(KeyPool(psk), initiator=False)
    a.begin_block(tags)
    b.begin_block(tags)
    return a, b


def test_roundtrip_and_key_accounting() -> None:
    a, b = pair()
    for i in range(3):
        assert b.open(a.seal(b"hello %d" % i)) == (b"hello %d" % i, True)
        assert a.open(b.seal(b"world")) == (b"world", True)
    # one 16-byte hash key per block plus one 16-byte pad per tag, the same on both ends
    assert a.pool.consumed_bits == b.pool.consumed_bits == 8 * (16 + 6 * 16)
    assert a.pool.available_bits == 8 * len(PSK) - a.pool.consumed_bits
    assert "available=" in repr(a.pool) and PSK[:8].hex() not in repr(a.pool) + repr(a)


def test_every_bit_of_a_frame_is_protected() -> None:
    a0, _ = pair()
    frame, after = a0.seal(b"sifting: bases 0101"), a0.seal(b"next")
    for i in range(8 * len(frame)):
        _, b = pair()
        bad = bytearray(frame)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(LinkAuthenticationError) as err:
            payload, verified = b.open(bytes(bad))
            # Clearing the tag flag makes it an untagged frame: never verified, and the next tag fails.
            assert i == 64 and not verified and payload.endswith(frame[-TAG_BYTES:])
            b.open(after)
        assert str(err.value) == AuthenticationError.GENERIC  # uninformative to the peer, detail in logs
        assert isinstance(err.value, AuthenticationError) and err.value.detail


def test_truncation_replay_and_reordering_are_caught() -> None:
    a, b = pair()
    f1, f2 = a.seal(b"one"), a.seal(b"two")
    with pytest.raises(LinkAuthenticationError):
        b.open(f2)  # out of order
    a, b = pair()
    f1 = a.seal(b"one")
    b.open(f1)
    with pytest.raises(LinkAuthenticationError):
        b.open(f1)  # replay
    for cut in (1, TAG_BYTES, len(f1) - 4):
        a, b = pair()
        with pytest.raises(LinkAuthenticationError):
            b.open(a.seal(b"one")[:-cut])


def test_untagged_frames_are_checked_by_the_tag_that_closes_them() -> None:
    a, b = pair()
    frames = [a.seal(b"parity %d" % i, tag=False) for i in range(5)] + [a.seal(b"done")]
    assert [b.open(f)[1] for f in frames] == [False] * 5 + [True]
    a, b = pair()
    frames = [a.seal(b"parity %d" % i, tag=False) for i in range(5)] + [a.seal(b"done")]
    bad = bytearray(frames[2])
    bad[-1] ^= 1
    frames[2] = bytes(bad)
    for f in frames[:-1]:
        b.open(f)
    assert b.pending_unverified == 5
    with pytest.raises(LinkAuthenticationError):
        b.open(frames[-1])


def test_a_different_key_never_verifies() -> None:
    a = ChannelAuthenticator(KeyPool(PSK), initiator=True)
    b = ChannelAuthenticator(KeyPool(bytes(200)), initiator=False)
    a.begin_block()
    b.begin_block()
    with pytest.raises(LinkAuthenticationError):
        b.open(a.seal(b"x"))


def test_reflection_is_caught() -> None:
    # A frame of Bob's sent back to him as Alice's: the direction is part of the tagged data.
    _, b = pair()
    frame = b.seal(b"reflect me")
    with pytest.raises(LinkAuthenticationError):
        b.open(frame)


def test_bootstrap_exhausted_is_a_clear_error() -> None:
    a, b = pair(PSK[:64])  # room for the hash key and three pads
    for _ in range(3):
        b.open(a.seal(b"m"))
    with pytest.raises(BootstrapExhausted, match="bootstrap secret ran out before the first block completed"):
        a.seal(b"m")
    pool = KeyPool(PSK[:32])
    pool.take(32)
    pool.replenish(b"\x00" * 16)
    pool.take(16)
    with pytest.raises(BootstrapExhausted, match="0 bits left"):
        pool.take(1)
    with pytest.raises(ConfigurationError, match="bootstrap"):
        KeyPool(b"short")


def test_pads_drawn_up_front_keep_the_pools_in_step() -> None:
    a, b = pair(tags=4)
    b.open(a.seal(b"one"))
    assert a.pool.consumed_bits == b.pool.consumed_bits == 8 * 16 * 5
    with pytest.raises(BootstrapExhausted, match="more tags"):
        for _ in range(4):
            a.seal(b"more")


def test_poly127_is_a_polynomial_over_the_prime_field() -> None:
    assert poly127(0, b"anything") == 0
    assert poly127(1, b"") == (1 << 120) * 0 + int.from_bytes(b"\x01" + (0).to_bytes(8, "big"), "big") % P127
    assert poly127(5, b"a") != poly127(5, b"a\x00")  # the length prefix separates them
    with pytest.raises(ConfigurationError):
        poly127(P127, b"")
