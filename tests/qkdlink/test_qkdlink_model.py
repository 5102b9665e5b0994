"""The decoy-state model against the closed forms of Lo, Ma & Chen (2005) and Ma, Qi, Zhao & Lo (2005).

The papers give their GYS curves as figures only (the numbers could not be retrieved as text), so the
reference values here are the papers' own closed-form infinite-decoy expressions, written out again
independently with the papers' approximations (Q = Y0 + 1 - exp(-eta mu), Y1 = Y0 + eta), and the
papers' stated conclusions: an optimal mu near 0.5, a maximal distance of about 140 km, and the
vacuum + weak decoy protocol approaching the infinite-decoy limit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from hybridkex.exceptions import ConfigurationError
from hybridkex.qkdlink import model
from hybridkex.qkdlink.model import GYS


def h2(x: float) -> float:
    return -x * math.log2(x) - (1 - x) * math.log2(1 - x)


def paper_rate(distance_km: float, mu: float) -> float:
    """LMC 2005 eqs. (1)-(3) with the GYS numbers typed in again."""
    eta = 10 ** (-0.21 * distance_km / 10) * 0.045
    y0, ed = 1.7e-6, 0.033
    q_mu = y0 + 1 - math.exp(-eta * mu)
    e_mu = (0.5 * y0 + ed * (1 - math.exp(-eta * mu))) / q_mu
    y1 = y0 + eta
    e1 = (0.5 * y0 + ed * eta) / y1
    q1 = y1 * mu * math.exp(-mu)
    return 0.5 * (-q_mu * 1.22 * h2(e_mu) + q1 * (1 - h2(e1)))


@pytest.mark.parametrize("distance", [10.0, 50.0, 100.0])
def test_infinite_decoy_rate_matches_the_papers_formula(distance: float) -> None:
    link = GYS.at(distance)
    mu = model.optimal_mu(link)
    ours = model.key_rate_infinite_decoy(replace(link, mu=mu))
    theirs = max(paper_rate(distance, m / 1000) for m in range(300, 700))
    assert ours == pytest.approx(theirs, rel=0.10)
    assert ours == pytest.approx(theirs, rel=0.01)  # in fact the two agree far better than 10 %


def test_optimal_mu_is_about_one_half() -> None:
    # LMC 2005 and Ma et al. 2005: mu_opt of order 1 (about 0.5 for GYS) instead of ~eta for GLLP.
    for d in (10.0, 50.0, 100.0):
        assert 0.4 < model.optimal_mu(GYS.at(d)) < 0.55


def test_maximal_distance() -> None:
    infinite = model.max_distance(GYS)
    practical = model.max_distance(GYS, vacuum_weak=True)
    assert 138.0 < infinite < 146.0  # about 140 km in LMC 2005 / Ma et al. 2005
    assert infinite - 3.0 < practical < infinite  # the vacuum + weak decoy case a little less
    assert practical < model.max_distance(replace(GYS, nu=0.02), vacuum_weak=True) < infinite  # nu -> 0: the limit


@pytest.mark.parametrize("distance", [10.0, 50.0, 100.0])
def test_vacuum_weak_decoy_approaches_the_limit(distance: float) -> None:
    link = replace(GYS.at(distance), nu=0.05)  # a weak decoy as weak as Ma et al. suggest
    practical = model.key_rate_vacuum_weak(replace(link, mu=model.optimal_mu(link, vacuum_weak=True)))
    infinite = model.key_rate_infinite_decoy(replace(link, mu=model.optimal_mu(link)))
    assert 0.9 * infinite < practical < infinite


def test_decoy_bounds_are_bounds() -> None:
    for d in (0.0, 40.0, 80.0, 120.0):
        link = GYS.at(d)
        q_mu, q_nu = model.expected_gain(link, link.mu), model.expected_gain(link, link.nu)
        b = model.decoy_bounds(link.mu, link.nu, q_mu=q_mu, q_nu=q_nu, y0=model.expected_gain(link, 0.0),
                               eq_nu=model.expected_error_rate(link, link.nu) * q_nu)
        y1, e1 = model.single_photon_yield(link), model.single_photon_error(link)
        assert 0.9 * y1 < b.y1_lower <= y1
        assert e1 <= b.e1_upper < 1.2 * e1 + 0.005


def test_rate_falls_with_distance_and_is_negative_beyond_the_limit() -> None:
    rates = [model.key_rate_infinite_decoy(GYS.at(d)) for d in range(0, 141, 20)]
    assert all(a > b > 0 for a, b in itertools.pairwise(rates))
    assert model.key_rate_infinite_decoy(GYS.at(160.0)) < 0


def test_parameters_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="nu"):
        replace(GYS, nu=0.6)
    with pytest.raises(ConfigurationError, match="e_detector"):
        replace(GYS, e_detector=0.5)
    assert model.binary_entropy(0.0) == 0.0 == model.binary_entropy(1.0)
    assert model.binary_entropy(0.5) == 1.0
