"""Shared helper for the qkdlink tests: sift and estimate one simulated block in memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hybridkex.qkdlink import events, model
from hybridkex.qkdlink import postprocess as pp


@dataclass
class Sifted:
    block: events.Block
    alice_key: np.ndarray
    bob_key: np.ndarray
    sample_errors: int
    sample_size: int
    decoy_errors: int
    decoy_sifted: int


def sift_block(link: model.LinkParameters, n_pulses: int, seed: int, config: pp.PostProcessConfig,
               eavesdrop_fraction: float = 0.0) -> Sifted:
    rng = np.random.default_rng(seed)
    block = events.simulate_block(link, n_pulses, rng, eavesdrop_fraction=eavesdrop_fraction)
    a, b = block.alice, block.bob
    sifted = pp.sift(a.basis, b.basis)
    sig = sifted & (a.intensity == events.SIGNAL)
    dec = sifted & (a.intensity == events.DECOY)
    ab, bb = a.bit[sig], b.bit[sig]
    pos = pp.sample_positions(len(ab), config.sample_fraction, rng)
    keep = np.ones(len(ab), bool)
    keep[pos] = False
    return Sifted(block, ab[keep], bb[keep], int(np.count_nonzero(ab[pos] != bb[pos])), len(pos),
                  int(np.count_nonzero(a.bit[dec] != b.bit[dec])), int(np.count_nonzero(dec)))


def estimate(s: Sifted, link: model.LinkParameters, config: pp.PostProcessConfig) -> pp.Estimate:
    return pp.estimate(link=link, config=config, sent=s.block.sent,
                       clicks=pp.split_by_intensity(s.block.alice.intensity), sample_errors=s.sample_errors,
                       sample_size=s.sample_size, decoy_errors=s.decoy_errors, decoy_sifted=s.decoy_sifted)
