"""The link driver over a real TCP socket on 127.0.0.1: identical keys, attacks caught, pending-key rule."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from linkhelpers import FrameProxy, fast_settings, kind, wait_for

from hybridkex.exceptions import BootstrapExhausted, LinkAbort, LinkAuthenticationError, QBERAbort
from hybridkex.qkdlink.driver import LinkPair
from hybridkex.qkdlink.protocol import CONFIRM
from hybridkex.qkdlink.session import BLOCK_AUTH_BYTES, LinkSettings, LinkStats, abort_reason


def run_pair(settings: LinkSettings, until: object, *, hook: object = None, timeout: float = 15.0
             ) -> tuple[LinkPair, list[bytes], list[bytes]]:
    got_a: list[bytes] = []
    got_b: list[bytes] = []

    async def main() -> LinkPair:
        proxy = None
        pair = LinkPair(settings, got_a.append, got_b.append, read_timeout=5.0)
        if hook is not None:
            # Start Alice first, then put the proxy in front of her before Bob connects.
            pair.connect_to = ("127.0.0.1", 1)  # replaced below, before Bob's first connect attempt succeeds
        await pair.start()
        if hook is not None:
            proxy = FrameProxy(pair.address, hook)  # type: ignore[arg-type]
            await proxy.start()
            pair.connect_to = proxy.address
        try:
            await wait_for(lambda: until(pair), timeout)  # type: ignore[operator]
        finally:
            await pair.stop()
            if proxy is not None:
                await proxy.stop()
        return pair

    return asyncio.run(main()), got_a, got_b


def test_both_kmes_receive_identical_keys_and_authentication_is_accounted() -> None:
    pair, a, b = run_pair(fast_settings(), lambda p: p.alice.stats.blocks_ok >= 4
                          and p.bob.stats.key_bits_delivered > 0 and p.alice.stats.key_bits_delivered > 0)
    n = min(len(a), len(b))
    assert n >= 2 and a[:n] == b[:n]  # same keys, same order, at both KMEs
    assert len(set(a)) == len(a)
    for side in (pair.alice, pair.bob):
        s = side.stats
        assert s.blocks_aborted == 0 and s.alarms == 0 and 0.02 < (s.last_qber or 0) < 0.05
        # every block used exactly one block's key, first from the bootstrap, then from reserved slices
        assert side.auth.consumed_bits == 8 * BLOCK_AUTH_BYTES * s.blocks_started
        assert side.auth.reserved_bits > 0


def test_intercept_resend_aborts_every_block_no_key_alarm_then_bootstrap_runs_out(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hybridkex.qkdlink")
    pair, a, b = run_pair(fast_settings(eavesdrop_fraction=0.1), lambda p: bool(p.bob.stats.fatal))
    assert a == [] and b == []  # no key from an aborted block ever reaches a KME, let alone an SAE
    assert pair.bob.stats.blocks_ok == 0 and pair.bob.stats.aborted_qber >= 3
    assert pair.bob.stats.aborted_qber == pair.bob.stats.blocks_aborted
    assert (pair.bob.stats.last_qber or 0) > fast_settings().postprocess.qber_threshold
    alarms = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALARM")]
    assert any("QBER" in m and "eavesdropper" in m for m in alarms)
    # Eve's aborts burn the bootstrap secret: the link stops with a clear message, it does not hang.
    assert "bootstrap secret" in pair.bob.stats.fatal and "before the first block completed" in pair.bob.stats.fatal


def test_a_flipped_bit_on_the_classical_channel_is_caught_and_the_block_discarded(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hybridkex.qkdlink")
    hit: list[tuple[str, int, int]] = []

    def flip_one(direction: str, block: int, frame: bytes) -> bytes:
        # Block 2, the fourth frame Bob sends (an untagged Cascade query batch): caught by a later tag.
        if block == 2 and direction == "b2a":
            hit.append((direction, block, kind(frame)))
            if len(hit) == 4:
                return frame[:20] + bytes([frame[20] ^ 0x08]) + frame[21:]
        return frame

    pair, a, b = run_pair(fast_settings(), lambda p: p.alice.stats.blocks_ok >= 3 and p.bob.stats.blocks_ok >= 3
                          and p.alice.stats.aborted_auth + p.bob.stats.aborted_auth >= 1
                          and p.bob.stats.key_bits_delivered > 0, hook=flip_one)
    assert pair.alice.stats.aborted_auth + pair.bob.stats.aborted_auth >= 1
    assert pair.alice.stats.alarms + pair.bob.stats.alarms >= 1
    assert any("authentication failed" in r.getMessage() and r.getMessage().startswith("ALARM")
               for r in caplog.records)
    n = min(len(a), len(b))
    assert n >= 1 and a[:n] == b[:n]  # the tampered block gave nothing; the others agree
    assert pair.bob.stats.blocks_ok + pair.bob.stats.blocks_aborted >= 4


def test_dropped_confirm_bob_key_is_never_delivered() -> None:
    dropped: list[int] = []

    def drop_confirm(direction: str, block: int, frame: bytes) -> bytes | None:
        if direction == "b2a" and block == 1 and kind(frame) == CONFIRM:
            dropped.append(block)
            return None  # Alice never learns Bob completed block 1
        return frame

    pair, a, b = run_pair(fast_settings(), lambda p: p.bob.stats.pending_discarded >= 1
                          and p.bob.stats.key_bits_delivered > 0 and p.alice.stats.key_bits_delivered > 0,
                          hook=drop_confirm)
    assert dropped == [1]
    assert pair.bob.stats.pending_discarded == 1  # Bob's key of block 1 was discarded, not delivered
    assert pair.alice.stats.blocks_ok >= 1 and pair.alice.stats.aborted_other >= 1
    n = min(len(a), len(b))
    assert n >= 1 and a[:n] == b[:n]  # neither KME holds block 1's key: their streams still agree
    assert pair.bob.stats.key_bits_delivered <= pair.alice.stats.key_bits_delivered + 8 * max(map(len, b))


def test_bootstrap_too_short_for_the_first_block_is_a_clear_error() -> None:
    with pytest.raises(BootstrapExhausted, match=r"bootstrap secret .* ran out before the first block completed"):
        fast_settings(bootstrap=b"\x00" * 64)


def test_bootstrap_exhausted_before_the_first_block_completes_stops_the_link() -> None:
    # Enough for one block's tags, not for the second block's, which must start before block 1's
    # reserved slice is confirmed: the link stops at block 2 and nothing was delivered.
    pair, a, b = run_pair(fast_settings(bootstrap=b"\x01" * (BLOCK_AUTH_BYTES + 40)),
                          lambda p: bool(p.bob.stats.fatal))
    assert a == [] and b == []
    assert "before the first block completed" in pair.bob.stats.fatal
    assert "provide a longer bootstrap secret" in pair.bob.stats.fatal



def test_a_replayed_block_number_is_refused_and_never_reuses_a_pad(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hybridkex.qkdlink")
    rewritten: list[int] = []

    def replay(direction: str, block: int, frame: bytes) -> bytes | tuple[int, bytes]:
        if direction == "b2a" and block == 3 and not rewritten:
            rewritten.append(block)
            return 1, frame  # Bob's block 3 relabelled as block 1, whose key Alice has used already
        return frame

    pair, a, b = run_pair(fast_settings(), lambda p: p.alice.stats.blocks_ok >= 3 and p.alice.stats.alarms >= 1
                          and p.bob.stats.key_bits_delivered > 0, hook=replay)
    assert rewritten == [3]
    assert any("frame for block 1 refused" in r.getMessage() and "already used" in r.getMessage()
               for r in caplog.records)
    assert pair.bob.stats.fatal == "" and pair.alice.stats.fatal == ""  # an alarm, not the end of the link
    n = min(len(a), len(b))
    assert n >= 1 and a[:n] == b[:n]


def test_blocks_are_paced_at_the_scaled_pulse_rate() -> None:
    # 5*10^6 pulses at 2 MHz are 2.5 s of fibre; at speedup 2.5 a block may start every second, no
    # sooner (unpaced, this machine runs such a block in 0.2-0.5 s).
    started = time.monotonic()
    pair, _, _ = run_pair(fast_settings(speedup=2.5), lambda p: p.bob.stats.blocks_started >= 3)
    elapsed = time.monotonic() - started
    assert elapsed >= 2 * 1.0 - 0.05  # blocks 2 and 3 each waited for their slot
    assert pair.bob.stats.blocks_started == 3


@pytest.mark.parametrize(("error", "reason"), [
    (QBERAbort(qber=0.06, threshold=0.04, sample_size=1000), "qber"),
    (LinkAbort("keys differ after Cascade", reason="verification"), "verification"),
    (LinkAbort("the peer aborted the block (verification)", reason="verification"), "verification"),
    (LinkAbort("no secret key in this block", reason="no secret key"), "no_secret_key"),
    (LinkAbort("the link connection failed; block discarded", reason="abandoned"), "abandoned"),
    (LinkAuthenticationError("authentication failed"), "authentication"),
    (LinkAbort("the peer aborted the block (key length disagreement)", reason="key length disagreement"), "other"),
    (LinkAbort("peer said something new", reason="anything a peer may send"), "other"),
    (None, "abandoned"),
])
def test_abort_reasons_are_a_fixed_few_words(error: object, reason: str) -> None:
    # They label a metric: a reason must never grow the label set, whatever the peer sends.
    assert abort_reason(error) == reason  # type: ignore[arg-type]
    stats = LinkStats("bob")
    stats.aborted(abort_reason(error))  # type: ignore[arg-type]
    assert stats.blocks_aborted == 1 and stats.aborted_reasons == {reason: 1}
