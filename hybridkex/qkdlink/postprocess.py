"""Post-processing of one block: sifting, parameter estimation, the finite key length, verification, PA.

Pure functions on numpy arrays; the interactive parts (Cascade, in :mod:`.cascade`) and the messages
(in :mod:`.protocol`) build on them.

Parameter estimation, per block:

* the QBER of the signal pulses from a random sample of the sifted signal bits (disclosed, then
  dropped), with a Wilson score interval; the block aborts (:class:`~hybridkex.exceptions.QBERAbort`)
  when the sample QBER is above the threshold;
* the gains Q_mu, Q_nu, Q_0 from the clicks per intensity Alice announces, and E_nu from the sifted
  decoy bits, which are all disclosed (decoy pulses never give key, as in Ma et al. 2005);
* the vacuum + weak decoy bounds on Y1 and e1 (:func:`.model.decoy_bounds`) from the pessimistic end
  of each gain's interval: ``count +- u sqrt(count)`` with ``u`` the normal quantile of ``eps_pe``
  (the Gaussian approximation of Ma et al. 2005, section on statistical fluctuations).

The final length follows the leftover hash lemma: with s1 single-photon key bits of phase-error
rate at most e1', the smooth min-entropy of Alice's key given Eve is at least s1 (1 - H2(e1')) -
leak_EC - leak_EV, and a two-universal hash to ``l`` bits is ``eps_pa``-close to uniform when
l = that - 2 log2(1/(2 eps_pa)).  e1' adds to the decoy bound on e1 the Hoeffding deviation of a
sample of s1 bits.  The block's total failure probability is at most eps_pa + 9 eps_pe + 2^-ver_bits
(eight one-sided interval estimates and the sampling term, and the verification hash).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..exceptions import ConfigurationError, QBERAbort
from . import model
from .events import DECOY, SIGNAL, VACUUM
from .hashing import toeplitz_hash

__all__ = [
    "Estimate",
    "PostProcessConfig",
    "estimate",
    "final_key_length",
    "privacy_amplify",
    "sample_positions",
    "sift",
    "verification_tag",
    "wilson_interval",
]


@dataclass(frozen=True)
class PostProcessConfig:
    """Security and estimation settings both ends share."""

    sample_fraction: float = 0.15   # of the sifted signal bits, disclosed for the QBER
    qber_threshold: float = 0.045   # abort above this sample QBER
    confidence: float = 0.95        # of the reported QBER interval (not a security parameter)
    eps_pe: float = 1e-10           # failure probability of each estimate
    eps_pa: float = 1e-10           # distance from uniform of the final key (leftover hash lemma)
    ver_bits: int = 64              # verification hash length: undetected residual error <= 2^-64
    cascade_passes: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.sample_fraction < 1:
            raise ConfigurationError("must be between 0 and 1", field="sample_fraction")
        if not 0 < self.qber_threshold < 0.5:
            raise ConfigurationError("must be between 0 and 0.5", field="qber_threshold")
        for name in ("confidence", "eps_pe", "eps_pa"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigurationError("must be between 0 and 1", field=name)
        if not 16 <= self.ver_bits <= 256:
            raise ConfigurationError("must be 16..256", field="ver_bits")

    @classmethod
    def calibrated(cls, link: model.LinkParameters, margin: float = 0.01, **kw: Any) -> PostProcessConfig:
        """The threshold set ``margin`` above the QBER the link is calibrated to give (alarm on excess)."""
        threshold = model.expected_error_rate(link, link.mu) + margin
        return cls(qber_threshold=threshold, **kw)


def sift(alice_basis: NDArray[np.uint8], bob_basis: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """The clicks measured in the basis Alice prepared (both bases announced, bits kept)."""
    if len(alice_basis) != len(bob_basis):
        raise ConfigurationError("basis lists differ in length", field="basis")
    return np.asarray(alice_basis == bob_basis)


def sample_positions(n_sifted: int, fraction: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """A uniformly random sample (sorted positions into the sifted signal bits) for the QBER."""
    k = max(1, round(n_sifted * fraction)) if n_sifted else 0
    return np.sort(rng.choice(n_sifted, size=k, replace=False)).astype(np.int64)


def wilson_interval(errors: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Estimate:
    """What parameter estimation found (all of it public)."""

    qber: float
    qber_interval: tuple[float, float]
    sample_size: int
    gains: tuple[float, float, float]        # observed Q_mu, Q_nu, Q_0
    decoy_qber: float                        # observed E_nu
    bounds: model.DecoyBounds                # from the pessimistic ends of the intervals
    single_photon_fraction: float            # lower bound on the share of signal clicks from one photon


def _bound(count: int, u: float, sign: int) -> float:
    return max(0.0, count + sign * u * math.sqrt(max(count, 1)))


def estimate(
    *, link: model.LinkParameters, config: PostProcessConfig, sent: tuple[int, int, int],
    clicks: tuple[int, int, int], sample_errors: int, sample_size: int, decoy_errors: int, decoy_sifted: int,
) -> Estimate:
    """Decide on the block from the public counts; raise :class:`QBERAbort` above the threshold.

    ``sent``/``clicks`` are per intensity (signal, decoy, vacuum).  Only the intensities come from
    ``link``: the channel's losses and noise are what is being estimated.
    """
    qber = sample_errors / sample_size if sample_size else 1.0
    interval = wilson_interval(sample_errors, sample_size, config.confidence)
    if sample_size == 0 or qber > config.qber_threshold:
        raise QBERAbort(qber=qber, threshold=config.qber_threshold, sample_size=sample_size)
    u = NormalDist().inv_cdf(1.0 - config.eps_pe)
    n_mu, n_nu, n_0 = sent
    c_mu, c_nu, c_0 = clicks
    if min(n_mu, n_nu, n_0) <= 0:
        raise ConfigurationError("every intensity must have been sent", field="sent")
    q_mu_u = _bound(c_mu, u, +1) / n_mu
    q_nu_l = _bound(c_nu, u, -1) / n_nu
    y0_u, y0_l = _bound(c_0, u, +1) / n_0, _bound(c_0, u, -1) / n_0
    e_nu = decoy_errors / decoy_sifted if decoy_sifted else 0.5
    # E_nu Q_nu, pessimistic: more errors among the sifted decoys, a larger decoy gain.
    eq_nu_u = min(0.5, _bound(decoy_errors, u, +1) / max(decoy_sifted, 1)) * _bound(c_nu, u, +1) / n_nu
    bounds = model.decoy_bounds(link.mu, link.nu, q_mu=q_mu_u, q_nu=q_nu_l, y0=y0_u, eq_nu=eq_nu_u,
                                y0_for_error=y0_l)
    fraction = min(1.0, bounds.q1_lower / q_mu_u) if q_mu_u > 0 else 0.0
    return Estimate(
        qber=qber, qber_interval=interval, sample_size=sample_size,
        gains=(c_mu / n_mu, c_nu / n_nu, c_0 / n_0), decoy_qber=e_nu, bounds=bounds,
        single_photon_fraction=fraction,
    )


def final_key_length(est: Estimate, n_key: int, leaked_bits: int, config: PostProcessConfig) -> int:
    """Secret bits extractable from ``n_key`` reconciled bits (0 when none)."""
    s1 = est.single_photon_fraction * n_key
    if s1 < 1:
        return 0
    e1 = min(0.5, est.bounds.e1_upper + math.sqrt(math.log(1.0 / config.eps_pe) / (2.0 * s1)))
    entropy = s1 * (1.0 - model.binary_entropy(e1))
    length = entropy - leaked_bits - config.ver_bits - 2.0 * math.log2(1.0 / (2.0 * config.eps_pa))
    return max(0, math.floor(length))


def verification_tag(bits: NDArray[np.uint8], seed: NDArray[np.uint8], out_bits: int) -> bytes:
    """A Toeplitz hash of the reconciled key, ``out_bits`` long, packed (the seed is public, fresh)."""
    return np.packbits(toeplitz_hash(bits, seed, out_bits)).tobytes()


def privacy_amplify(bits: NDArray[np.uint8], seed: NDArray[np.uint8], length: int) -> NDArray[np.uint8]:
    """The final key: a Toeplitz hash of the reconciled key to ``length`` bits."""
    return toeplitz_hash(bits, seed, length)


def split_by_intensity(intensity: NDArray[np.uint8]) -> tuple[int, int, int]:
    """Clicks per intensity (signal, decoy, vacuum)."""
    return (int(np.count_nonzero(intensity == SIGNAL)), int(np.count_nonzero(intensity == DECOY)),
            int(np.count_nonzero(intensity == VACUUM)))
