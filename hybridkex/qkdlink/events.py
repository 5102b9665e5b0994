"""Detection events of one block of decoy-state BB84 pulses, sampled with a seeded numpy Generator.

Only pulses that make Bob's detector click matter to the protocol (Alice's choices for the others are
never announced), so the block is sampled *per click*, with exactly the statistics of pulse-by-pulse
simulation: the pulses are split into intensity classes (multinomial), a class into attacked and
untouched pulses (binomial), and each part into "a signal photon clicked", "only the background
clicked" and "no click" (multinomial, with the probabilities below).  Alice's bit and basis, Bob's
basis and bit are then drawn for the clicks only, and the clicks get distinct pulse numbers drawn
uniformly from the block.  A block of 10^8 pulses at 50 km takes milliseconds, so the pulse rate
is "scaled": a block stands for ``n_pulses / pulse_rate_hz`` seconds of a real link.

Untouched pulse of mean photon number m: the photons reaching Bob's detector are Poisson(eta m), so
a signal click has probability 1 - exp(-eta m); otherwise the background clicks with probability Y0.
Intercept-resend on a pulse: Eve measures one photon (she has one when n >= 1, probability
1 - exp(-m)) at Alice's door in a random basis and resends it in that basis, so Bob receives one
photon (click probability eta); when Eve's basis differs from Alice's, Bob's bit in Alice's basis is
random.  Misalignment ``e_detector`` flips a signal click's bit in the matching basis; a background
click's bit is random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..exceptions import ConfigurationError
from .model import LinkParameters

__all__ = ["DECOY", "SIGNAL", "VACUUM", "AliceRecord", "Block", "BobRecord", "simulate_block"]

#: Intensity labels.
SIGNAL, DECOY, VACUUM = 0, 1, 2

U8 = NDArray[np.uint8]


@dataclass(frozen=True, repr=False)
class AliceRecord:
    """What Alice knows about the clicked pulses (in pulse order): intensity, basis, bit."""

    index: NDArray[np.int64]
    intensity: U8
    basis: U8
    bit: U8

    def __repr__(self) -> str:  # the bits are key material: never in a repr
        return f"AliceRecord({len(self.index)} clicks)"


@dataclass(frozen=True, repr=False)
class BobRecord:
    """What Bob knows: which pulses clicked, his basis and his bit."""

    index: NDArray[np.int64]
    basis: U8
    bit: U8

    def __repr__(self) -> str:
        return f"BobRecord({len(self.index)} clicks)"


@dataclass(frozen=True, repr=False)
class Block:
    """One simulated block: both ends' records plus the ground truth tests may look at."""

    n_pulses: int
    alice: AliceRecord
    bob: BobRecord
    attacked: NDArray[np.bool_]  # per click: the pulse went through Eve (never known to Alice or Bob)
    sent: tuple[int, int, int]   # pulses sent per intensity (signal, decoy, vacuum), announced by Alice

    def __repr__(self) -> str:
        return f"Block({self.n_pulses} pulses, {len(self.alice.index)} clicks)"


def _part(rng: np.random.Generator, n: int, p_signal_click: float, p_background: float) -> tuple[int, int]:
    p_none = max(0.0, 1.0 - p_signal_click - p_background)
    counts = rng.multinomial(n, [p_signal_click, p_background, p_none])
    return int(counts[0]), int(counts[1])


def simulate_block(link: LinkParameters, n_pulses: int, rng: np.random.Generator, *,
                   eavesdrop_fraction: float = 0.0) -> Block:
    """Sample the clicks of ``n_pulses`` pulses sent over ``link``; Eve attacks each pulse with
    probability ``eavesdrop_fraction`` (intercept-resend)."""
    if n_pulses <= 0:
        raise ConfigurationError("must be positive", field="n_pulses")
    if not 0.0 <= eavesdrop_fraction <= 1.0:
        raise ConfigurationError("must be between 0 and 1", field="eavesdrop_fraction")
    eta, y0 = link.eta, link.dark_count
    sent = rng.multinomial(n_pulses, [link.p_signal, link.p_decoy, link.p_vacuum])
    intensities = (link.mu, link.nu, 0.0)
    labels, kinds, attacked = [], [], []
    for label, (count, m) in enumerate(zip(sent, intensities, strict=True)):
        n_attacked = int(rng.binomial(int(count), eavesdrop_fraction)) if eavesdrop_fraction else 0
        for is_attacked, n in ((False, int(count) - n_attacked), (True, n_attacked)):
            if n == 0:
                continue
            p_sig = (1.0 - math.exp(-m)) * eta if is_attacked else 1.0 - math.exp(-eta * m)
            n_sig, n_bg = _part(rng, n, p_sig, y0 * (1.0 - p_sig))
            for kind, k in ((1, n_sig), (0, n_bg)):
                labels.append(np.full(k, label, np.uint8))
                kinds.append(np.full(k, kind, np.uint8))
                attacked.append(np.full(k, is_attacked, np.bool_))
    label_a, kind_a, attacked_a = np.concatenate(labels), np.concatenate(kinds), np.concatenate(attacked)
    n_clicks = len(label_a)
    # The clicks are exchangeable, so a random order plus sorted random pulse numbers places them.
    order = rng.permutation(n_clicks)
    label_a, kind_a, attacked_a = label_a[order], kind_a[order], attacked_a[order]
    index = np.sort(rng.choice(n_pulses, size=n_clicks, replace=False)).astype(np.int64)

    a_basis = rng.integers(0, 2, n_clicks, dtype=np.uint8)
    a_bit = rng.integers(0, 2, n_clicks, dtype=np.uint8)
    b_basis = rng.integers(0, 2, n_clicks, dtype=np.uint8)
    random_bit = rng.integers(0, 2, n_clicks, dtype=np.uint8)
    flip = (rng.random(n_clicks) < link.e_detector).astype(np.uint8)
    # The state reaching Bob: Alice's own, or Eve's re-preparation in her basis with her result.
    e_basis = rng.integers(0, 2, n_clicks, dtype=np.uint8)
    e_bit = np.where(e_basis == a_basis, a_bit, rng.integers(0, 2, n_clicks, dtype=np.uint8)).astype(np.uint8)
    state_basis = np.where(attacked_a, e_basis, a_basis)
    state_bit = np.where(attacked_a, e_bit, a_bit)
    b_bit = np.where((kind_a == 1) & (b_basis == state_basis), state_bit ^ flip, random_bit).astype(np.uint8)
    return Block(
        n_pulses=n_pulses,
        alice=AliceRecord(index=index, intensity=label_a, basis=a_basis, bit=a_bit),
        bob=BobRecord(index=index.copy(), basis=b_basis, bit=b_bit),
        attacked=attacked_a,
        sent=(int(sent[0]), int(sent[1]), int(sent[2])),
    )
