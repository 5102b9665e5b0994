"""Post-processing: QBER interval coverage, abort on intercept-resend, Cascade leakage, hashing, PA."""

from __future__ import annotations

import math

import numpy as np
import pytest
from blocks import estimate, sift_block

from hybridkex.exceptions import ConfigurationError, QBERAbort, RemoteProtocolError
from hybridkex.qkdlink import cascade, model
from hybridkex.qkdlink import postprocess as pp
from hybridkex.qkdlink.hashing import toeplitz_hash
from hybridkex.qkdlink.model import GYS

DEFAULT_PULSES = 10**8  # the default block at the default 50 km


def test_toeplitz_fft_equals_the_matrix_product() -> None:
    rng = np.random.default_rng(0)
    for n, m in ((1, 1), (7, 3), (64, 64), (257, 100), (1000, 999)):
        x = rng.integers(0, 2, n, dtype=np.uint8)
        seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        t = np.array([[seed[i - j + n - 1] for j in range(n)] for i in range(m)], dtype=np.int64)
        assert np.array_equal(toeplitz_hash(x, seed, m), (t @ x) % 2)
    with pytest.raises(ConfigurationError, match="seed"):
        toeplitz_hash(np.zeros(4, np.uint8), np.zeros(4, np.uint8), 2)


def test_toeplitz_is_exact_at_key_sizes() -> None:
    # 2^18 input bits: sums up to 2^18, still exact through the float FFT (compared on a row subset).
    rng = np.random.default_rng(1)
    n, m = 1 << 18, 512
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    out = toeplitz_hash(x, seed, m)
    for i in (0, 1, 255, 511):
        row = seed[i:i + n][::-1]
        assert out[i] == int(row.astype(np.int64) @ x) % 2


def test_qber_interval_covers_the_true_value_at_the_stated_rate() -> None:
    link = GYS.at(25.0)
    config = pp.PostProcessConfig.calibrated(link)
    truth = model.expected_error_rate(link, link.mu)
    covered = 0
    for seed in range(200):
        s = sift_block(link, 5 * 10**6, seed, config)
        lo, hi = pp.wilson_interval(s.sample_errors, s.sample_size, 0.95)
        covered += lo <= truth <= hi
    # 95 % nominal: over 200 blocks a correct interval covers 181..198 times with probability > 99.5 %.
    assert 181 <= covered <= 198, covered


def miss_probability(n: int, p: float, threshold: float) -> float:
    """P(sample QBER <= threshold) for Binomial(n, p): the chance Eve goes unnoticed."""
    k_max = math.floor(threshold * n)
    log = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
           + (n - k) * math.log1p(-p) for k in range(k_max + 1)]
    top = max(log)
    return math.exp(top) * sum(math.exp(v - top) for v in log)


def test_intercept_resend_on_ten_percent_is_caught() -> None:
    link = GYS  # 50 km
    config = pp.PostProcessConfig.calibrated(link)
    # The statistics first: Eve's QBER on the signal clicks at 10 %, the default sample size, and the
    # chance that a binomial sample of that size stays below the threshold.
    eve = 0.1 * (1 - math.exp(-link.mu)) * link.eta
    honest = 0.9 * model.expected_gain(link, link.mu)
    attacked_qber = (honest * model.expected_error_rate(link, link.mu) + eve * (0.5 * link.e_detector + 0.25)) / (
        honest + eve)
    sifted = DEFAULT_PULSES * link.p_signal * model.expected_gain(link, link.mu) * link.q
    sample = round(sifted * config.sample_fraction)
    assert sample > 9000 and attacked_qber > config.qber_threshold + 0.007
    assert miss_probability(sample, attacked_qber, config.qber_threshold) < 1e-3  # detected >= 99.9 %
    assert miss_probability(sample, model.expected_error_rate(link, link.mu), config.qber_threshold) > 1 - 1e-6
    # Then the simulation: a few hundred attacked blocks, every one aborts.
    missed = 0
    for seed in range(300):
        s = sift_block(link, DEFAULT_PULSES, 1000 + seed, config, eavesdrop_fraction=0.1)
        with pytest.raises(QBERAbort) as err:
            estimate(s, link, config)
            missed += 1
        assert err.value.qber > config.qber_threshold and err.value.sample_size == s.sample_size
    assert missed == 0


def test_honest_blocks_pass_and_give_decoy_bounds() -> None:
    link = GYS
    config = pp.PostProcessConfig.calibrated(link)
    for seed in range(30):
        est = estimate(sift_block(link, DEFAULT_PULSES, 1000 + seed, config), link, config)
        assert est.qber <= config.qber_threshold
        assert 0.75 * model.single_photon_yield(link) < est.bounds.y1_lower <= model.single_photon_yield(link)
        assert model.single_photon_error(link) < est.bounds.e1_upper < 0.12


@pytest.mark.parametrize("qber", [0.02, 0.035, 0.06])
def test_cascade_corrects_at_the_expected_leakage(qber: float) -> None:
    rng = np.random.default_rng(int(qber * 1000))
    n = 40_000
    ratios = []
    for seed in range(3):
        alice = rng.integers(0, 2, n, dtype=np.uint8)
        bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
        actual = float(np.mean(alice != bob))
        corrected, leaked, rounds = cascade.reconcile(alice, bob, actual, seed)
        assert np.array_equal(corrected, alice)
        ratios.append(leaked / (n * model.binary_entropy(actual)))
        assert rounds < 100
    # Original 4-pass Cascade discloses about 1.15-1.25 n H2(QBER) (f of the GYS set: 1.22).
    assert 1.05 < float(np.mean(ratios)) < 1.3, ratios


def test_cascade_refuses_malformed_answers_and_queries() -> None:
    params = cascade.CascadeParams.for_qber(1000, 0.03, 1)
    bits = np.zeros(1000, np.uint8)
    bob = cascade.CascadeBob(bits ^ 1, params)
    alice = cascade.CascadeAlice(bits, params)
    with pytest.raises(RemoteProtocolError):
        bob.receive([0])
    with pytest.raises(RemoteProtocolError):
        alice.answer([(0, 5, 2000)])
    bob.receive(alice.answer(bob.queries()))
    assert not bob.done and "n=1000" in repr(bob)


def test_final_key_length_follows_the_leftover_hash_lemma() -> None:
    link = GYS.at(25.0)
    config = pp.PostProcessConfig.calibrated(link)
    s = sift_block(link, DEFAULT_PULSES, 5, config)
    est = estimate(s, link, config)
    n = len(s.alice_key)
    full = pp.final_key_length(est, n, 0, config)
    s1 = est.single_photon_fraction * n
    assert full < s1 * (1 - model.binary_entropy(est.bounds.e1_upper))
    assert pp.final_key_length(est, n, 1000, config) == full - 1000
    looser = pp.PostProcessConfig.calibrated(link, eps_pa=1e-5)
    assert pp.final_key_length(est, n, 0, looser) > full
    assert pp.final_key_length(est, n, 10**7, config) == 0


def test_verification_and_privacy_amplification() -> None:
    rng = np.random.default_rng(9)
    key = rng.integers(0, 2, 5000, dtype=np.uint8)
    other = key.copy()
    other[1234] ^= 1
    seed = rng.integers(0, 2, 5000 + 63, dtype=np.uint8)
    assert pp.verification_tag(key, seed, 64) == pp.verification_tag(key.copy(), seed, 64)
    assert pp.verification_tag(key, seed, 64) != pp.verification_tag(other, seed, 64)
    assert len(pp.verification_tag(key, seed, 64)) == 8
    pa_seed = rng.integers(0, 2, 5000 + 1000 - 1, dtype=np.uint8)
    final = pp.privacy_amplify(key, pa_seed, 1000)
    assert len(final) == 1000 and 400 < int(final.sum()) < 600


def test_config_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="sample_fraction"):
        pp.PostProcessConfig(sample_fraction=1.0)
    with pytest.raises(ConfigurationError, match="ver_bits"):
        pp.PostProcessConfig(ver_bits=8)
    assert pp.wilson_interval(0, 0, 0.95) == (0.0, 1.0)
