"""The two ends of a block, driven in memory: identical keys, no key from an aborted or tampered block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from hybridkex.exceptions import BootstrapExhausted, LinkAbort, LinkAuthenticationError, QBERAbort
from hybridkex.qkdlink import events, model, protocol
from hybridkex.qkdlink import postprocess as pp
from hybridkex.qkdlink.auth import ChannelAuthenticator, KeyPool
from hybridkex.qkdlink.model import GYS

PSK = bytes(range(256)) * 2
# A short block that still gives key: more decoys, looser estimation failure (1e-6) than the defaults.
SMALL = replace(GYS.at(10.0), p_signal=0.6, p_decoy=0.3)
SMALL_CONFIG = pp.PostProcessConfig.calibrated(SMALL, eps_pe=1e-6)
TINY = replace(GYS.at(1.0), p_signal=0.6, p_decoy=0.3)


def ends(link: model.LinkParameters, n_pulses: int, seed: int, config: pp.PostProcessConfig, *,
         eavesdrop: float = 0.0, psk: bytes = PSK, every: bool = False,
         pools: tuple[KeyPool, KeyPool] | None = None) -> tuple[protocol.AliceEnd, protocol.BobEnd]:
    rng = np.random.default_rng(seed)
    block = events.simulate_block(link, n_pulses, rng, eavesdrop_fraction=eavesdrop)
    pa, pb = pools or (KeyPool(psk), KeyPool(psk))
    alice = protocol.AliceEnd(block.alice, block.sent, link, config, ChannelAuthenticator(pa, initiator=False),
                              rng=rng, tag_every_frame=every)
    bob = protocol.BobEnd(block.bob, link, config, ChannelAuthenticator(pb, initiator=True), tag_every_frame=every)
    return alice, bob


def test_both_ends_get_the_same_key_and_the_pool_is_refilled() -> None:
    pa, pb = KeyPool(PSK), KeyPool(PSK)
    total = 0
    for seed in range(2):
        alice, bob = ends(SMALL, 10**7, seed, SMALL_CONFIG, pools=(pa, pb))
        frames = protocol.run_in_memory(alice, bob)
        assert alice.error is None and bob.error is None
        assert alice.key() == bob.key() and len(alice.key()) > 100
        res = alice.result
        assert res is not None and bob.result is not None
        assert res.final_bits == bob.result.final_bits and frames > 20
        assert res.auth_consumed_bits == 8 * 16 * (1 + protocol.TAGS_PER_BLOCK)  # hash key + 6 pads
        assert "key bits" in repr(res) and alice.key().hex()[:16] not in repr(res) + repr(alice)
        total += res.final_bits
    # the pools stayed equal and were topped up from the blocks' own output
    assert pa.available_bits == pb.available_bits == 4096 and pa.replenished_bits > 0
    assert pa.consumed_bits == pb.consumed_bits


def test_keys_differ_between_blocks_and_are_balanced() -> None:
    a1, b1 = ends(SMALL, 10**7, 11, SMALL_CONFIG)
    a2, b2 = ends(SMALL, 10**7, 12, SMALL_CONFIG)
    protocol.run_in_memory(a1, b1)
    protocol.run_in_memory(a2, b2)
    k1, k2 = a1.key(), a2.key()
    assert k1[:32] != k2[:32]
    ones = int(np.unpackbits(np.frombuffer(k1, np.uint8)).sum())
    assert abs(ones - 4 * len(k1)) < 5 * (2 * len(k1)) ** 0.5


def test_intercept_resend_aborts_and_no_key_is_given() -> None:
    for seed in range(3):
        alice, bob = ends(GYS, 10**8, 100 + seed, pp.PostProcessConfig.calibrated(GYS), eavesdrop=0.1)
        protocol.run_in_memory(alice, bob)
        assert isinstance(bob.error, QBERAbort) and isinstance(alice.error, QBERAbort)
        assert alice.result is None and bob.result is None
        for end in (alice, bob):
            with pytest.raises(QBERAbort, match="threshold"):
                end.key()


Tamper = Callable[[int, bytes], bytes]


def flip_in(target: int, position: int) -> Tamper:
    def tamper(n: int, frame: bytes) -> bytes:
        if n != target:
            return frame
        bad = bytearray(frame)
        bad[position % len(bad)] ^= 0x10
        return bytes(bad)
    return tamper


def caught(alice: protocol.AliceEnd, bob: protocol.BobEnd, target: int) -> None:
    assert alice.result is None and bob.result is None, target
    errors = (alice.error, bob.error)
    assert any(isinstance(e, LinkAuthenticationError) for e in errors), (target, errors)
    assert all(isinstance(e, LinkAuthenticationError | LinkAbort) for e in errors)


def test_every_tampered_frame_is_caught() -> None:
    # A tiny block (it ends in "no secret key" untouched), so that every one of its frames can be hit.
    config = pp.PostProcessConfig.calibrated(TINY, eps_pe=1e-6)
    alice, bob = ends(TINY, 3 * 10**5, 5, config)
    n_frames = protocol.run_in_memory(alice, bob)
    assert n_frames > 30
    rng = np.random.default_rng(0)
    for target in range(n_frames):
        alice, bob = ends(TINY, 3 * 10**5, 5, config)
        protocol.run_in_memory(alice, bob, tamper=flip_in(target, int(rng.integers(0, 1 << 30))))
        caught(alice, bob, target)


def test_tampering_turns_a_good_block_into_no_key() -> None:
    link = replace(GYS.at(1.0), p_signal=0.6, p_decoy=0.3)
    config = pp.PostProcessConfig.calibrated(link, eps_pe=1e-4, eps_pa=1e-4)
    big = bytes(range(256)) * 4
    alice, bob = ends(link, 2 * 10**6, 5, config, psk=big)
    n_frames = protocol.run_in_memory(alice, bob)
    assert alice.key() == bob.key() and len(alice.key()) > 10
    # the tagged phases (first three, last three) and Cascade's first and last round trips
    for target in (0, 1, 2, 3, 4, n_frames - 5, n_frames - 4, n_frames - 3, n_frames - 2):
        alice, bob = ends(link, 2 * 10**6, 5, config, psk=big)
        protocol.run_in_memory(alice, bob, tamper=flip_in(target, 9 + 7 * target))
        caught(alice, bob, target)
    # The last frame (Bob's CONFIRM): Alice rejects it and has no key; Bob, who sent it, cannot know
    # (the last message of any protocol can be lost), so his key is only "pending" for the KME layer
    # until the next block's first authenticated frame from Alice shows she completed.
    alice, bob = ends(link, 2 * 10**6, 5, config, psk=big)
    protocol.run_in_memory(alice, bob, tamper=flip_in(n_frames - 1, 12))
    assert isinstance(alice.error, LinkAuthenticationError) and alice.result is None
    assert bob.result is not None


def test_a_forged_cascade_answer_is_caught_with_real_time_tags_too() -> None:
    config = pp.PostProcessConfig.calibrated(TINY, eps_pe=1e-6)
    big = bytes(range(256)) * 64
    alice, bob = ends(TINY, 3 * 10**5, 5, config, psk=big, every=True)
    protocol.run_in_memory(alice, bob, tamper=flip_in(3, -20))  # in the payload of Alice's first ANSWERS
    assert isinstance(bob.error, LinkAuthenticationError)  # at once, not at the end of Cascade
    assert bob.auth.tags_verified == 1 and isinstance(alice.error, LinkAbort)


def test_bootstrap_exhausted_before_the_first_block_completes() -> None:
    alice, bob = ends(TINY, 3 * 10**5, 5, pp.PostProcessConfig.calibrated(TINY), psk=bytes(64), every=True)
    protocol.run_in_memory(alice, bob)
    assert any(isinstance(e, BootstrapExhausted) for e in (alice.error, bob.error))
    assert alice.result is None and bob.result is None
    with pytest.raises(BootstrapExhausted, match="bootstrap"):
        ends(TINY, 3 * 10**5, 5, pp.PostProcessConfig.calibrated(TINY), psk=bytes(100))  # 7 x 16 bytes needed


def test_no_secret_key_is_an_abort_not_an_empty_key() -> None:
    alice, bob = ends(TINY, 2 * 10**5, 5, pp.PostProcessConfig.calibrated(TINY))  # far too short for 1e-10
    protocol.run_in_memory(alice, bob)
    assert isinstance(bob.error, LinkAbort) and bob.error.reason == "no secret key"
    assert isinstance(alice.error, LinkAbort) and alice.result is None


def test_a_cascade_frame_whose_length_field_was_altered_is_tampering_not_a_crash() -> None:
    # The length of the query list in an untagged QUERIES frame, changed by one byte: numpy would
    # refuse the buffer (ValueError); the end must call it tampering, like any other malformed frame.
    link = replace(GYS.at(1.0), p_signal=0.6, p_decoy=0.3)
    config = pp.PostProcessConfig.calibrated(link, eps_pe=1e-4, eps_pa=1e-4)
    big = bytes(range(256)) * 4
    kinds: list[int] = []
    alice, bob = ends(link, 2 * 10**6, 5, config, psk=big)
    protocol.run_in_memory(alice, bob, tamper=lambda n, f: kinds.append(f[9]) or f)
    target = kinds.index(protocol.QUERIES)

    def shorten(n: int, frame: bytes) -> bytes:
        if n != target:
            return frame
        length = int.from_bytes(frame[10:14], "big")
        # 4 bytes shorter: still whole 32-bit words, but no longer whole (pass, lo, hi) triples
        return frame[:10] + (length - 4).to_bytes(4, "big") + frame[14:]

    alice, bob = ends(link, 2 * 10**6, 5, config, psk=big)
    protocol.run_in_memory(alice, bob, tamper=shorten)
    caught(alice, bob, target)
