"""The sampled clicks have the statistics of the model (gains, error rates per intensity), seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybridkex.exceptions import ConfigurationError
from hybridkex.qkdlink import events, model
from hybridkex.qkdlink.model import GYS


def observed(block: events.Block, label: int) -> tuple[float, float, int, int]:
    a, b = block.alice, block.bob
    mine = a.intensity == label
    sent = block.sent[label]
    sifted = mine & (a.basis == b.basis)
    errors = int(np.count_nonzero(a.bit[sifted] != b.bit[sifted]))
    n_sift = int(np.count_nonzero(sifted))
    return int(np.count_nonzero(mine)) / sent, errors / max(n_sift, 1), sent, n_sift


def within(value: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    sd = math.sqrt(expected * (1 - expected) / n)
    return abs(value - expected) <= sigmas * sd


@pytest.mark.parametrize(("distance", "n_pulses"), [(10.0, 10**8), (60.0, 5 * 10**8)])
def test_gains_and_error_rates_match_the_model(distance: float, n_pulses: int) -> None:
    link = GYS.at(distance)
    block = events.simulate_block(link, n_pulses, np.random.default_rng(7))
    for label, m in ((events.SIGNAL, link.mu), (events.DECOY, link.nu), (events.VACUUM, 0.0)):
        gain, qber, sent, n_sift = observed(block, label)
        assert within(gain, model.expected_gain(link, m), sent), (label, gain)
        assert within(qber, model.expected_error_rate(link, m), n_sift), (label, qber)
    assert block.sent[0] + block.sent[1] + block.sent[2] == n_pulses
    assert not block.attacked.any()
    idx = block.alice.index
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < n_pulses


def attacked_qber(link: model.LinkParameters, m: float, fraction: float) -> float:
    honest_sig = 1 - math.exp(-link.eta * m)
    eve_sig = (1 - math.exp(-m)) * link.eta
    y0 = link.dark_count
    clicks = (1 - fraction) * (honest_sig + y0 * (1 - honest_sig)) + fraction * (eve_sig + y0 * (1 - eve_sig))
    err = ((1 - fraction) * (honest_sig * link.e_detector + 0.5 * y0 * (1 - honest_sig))
           + fraction * (eve_sig * (0.5 * link.e_detector + 0.25) + 0.5 * y0 * (1 - eve_sig)))
    return err / clicks


def test_intercept_resend_raises_the_error_rate_as_expected() -> None:
    link = GYS.at(25.0)
    block = events.simulate_block(link, 2 * 10**8, np.random.default_rng(11), eavesdrop_fraction=0.1)
    _, qber, _, n_sift = observed(block, events.SIGNAL)
    expected = attacked_qber(link, link.mu, 0.1)
    assert expected > model.expected_error_rate(link, link.mu) + 0.015
    assert within(qber, expected, n_sift)
    assert 0.05 < block.attacked.mean() < 0.11  # Eve's resent photon clicks less often than mu photons


def test_seeded_and_repr_hides_bits() -> None:
    a = events.simulate_block(GYS, 10**7, np.random.default_rng(3))
    b = events.simulate_block(GYS, 10**7, np.random.default_rng(3))
    c = events.simulate_block(GYS, 10**7, np.random.default_rng(4))
    assert np.array_equal(a.alice.bit, b.alice.bit) and np.array_equal(a.bob.index, b.bob.index)
    assert not np.array_equal(a.bob.index[:100], c.bob.index[:100])
    assert "clicks" in repr(a.alice) and "[" not in repr(a.alice) + repr(a.bob) + repr(a)


def test_arguments_checked() -> None:
    with pytest.raises(ConfigurationError, match="n_pulses"):
        events.simulate_block(GYS, 0, np.random.default_rng(0))
    with pytest.raises(ConfigurationError, match="eavesdrop_fraction"):
        events.simulate_block(GYS, 10, np.random.default_rng(0), eavesdrop_fraction=1.5)
