"""Decoy-state BB84 over fibre: expected gains, error rates, decoy bounds and the asymptotic key rate.

The channel model is the one of Lo, Ma & Chen, PRL 94, 230504 (2005) and Ma, Qi, Zhao & Lo,
PRA 72, 012326 (2005): a phase-randomised weak coherent source (Poisson photon number), a fibre of
transmittance ``10**(-alpha*L/10)``, Bob's overall efficiency ``eta_bob``, background yield ``Y0``
and an optical misalignment ``e_detector``.  All formulas are closed form (no fitting), so the
same :class:`LinkParameters` feed the event simulator (:mod:`.events`), whose statistics match
these expectations exactly: the gain is ``1-(1-Y0)exp(-eta*mu)`` (a threshold detector that also
clicks on background when no signal photon arrives); the papers write ``Y0 + 1 - exp(-eta*mu)``,
which differs by ``Y0*(1-exp(-eta*mu))``, below 1e-8 for the GYS parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..exceptions import ConfigurationError

__all__ = [
    "GYS",
    "DecoyBounds",
    "LinkParameters",
    "binary_entropy",
    "decoy_bounds",
    "expected_error_rate",
    "expected_gain",
    "key_rate_infinite_decoy",
    "key_rate_vacuum_weak",
    "max_distance",
    "optimal_mu",
    "single_photon_error",
    "single_photon_yield",
    "transmittance",
]

#: Error rate of a background (dark-count) click: its bit is random.
E0 = 0.5


def binary_entropy(p: float) -> float:
    """H2(p) in bits; 0 at p = 0 or 1, symmetric about 1/2."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


@dataclass(frozen=True)
class LinkParameters:
    """Physical parameters of one BB84 link (lengths in km, probabilities per pulse).

    ``mu``/``nu`` are the signal and weak-decoy mean photon numbers (the third intensity is vacuum);
    ``p_signal``/``p_decoy`` how often Alice sends each (the rest is vacuum).  ``q`` is the sifting
    factor (1/2 for BB84 with symmetric bases).  ``pulse_rate_hz`` only converts per-pulse rates to
    bits per second.  The defaults (nu 0.1, 70/20/10 % signal/decoy/vacuum) trade a little asymptotic
    rate for tighter finite-block decoy estimates; Ma et al. take nu -> 0 for the asymptotic curves.
    """

    distance_km: float = 50.0
    alpha_db_per_km: float = 0.21
    eta_bob: float = 0.045
    dark_count: float = 1.7e-6
    e_detector: float = 0.033
    f_ec: float = 1.22
    q: float = 0.5
    mu: float = 0.48
    nu: float = 0.1
    p_signal: float = 0.7
    p_decoy: float = 0.2
    pulse_rate_hz: float = 2e6

    def __post_init__(self) -> None:
        checks: tuple[tuple[str, bool], ...] = (
            ("distance_km", self.distance_km >= 0),
            ("alpha_db_per_km", self.alpha_db_per_km >= 0),
            ("eta_bob", 0 < self.eta_bob <= 1),
            ("dark_count", 0 <= self.dark_count < 1),
            ("e_detector", 0 <= self.e_detector < 0.5),
            ("f_ec", self.f_ec >= 1),
            ("q", 0 < self.q <= 1),
            ("mu", self.mu > 0),
            ("nu", 0 < self.nu < self.mu),
            ("p_signal", 0 < self.p_signal < 1),
            ("p_decoy", 0 < self.p_decoy < 1 - self.p_signal),
            ("pulse_rate_hz", self.pulse_rate_hz > 0),
        )
        for name, ok in checks:
            if not ok:
                raise ConfigurationError(f"out of range ({getattr(self, name)!r})", field=name)

    @property
    def p_vacuum(self) -> float:
        return 1.0 - self.p_signal - self.p_decoy

    @property
    def eta(self) -> float:
        """Overall transmittance: fibre times Bob's efficiency."""
        return transmittance(self)

    def at(self, distance_km: float) -> LinkParameters:
        """The same link at another length."""
        return replace(self, distance_km=distance_km)


#: The parameter set of Gobby, Yuan & Shields, APL 84, 3762 (2004), as used by Lo, Ma & Chen (2005)
#: and Ma, Qi, Zhao & Lo (2005): 1550 nm, 0.21 dB/km, eta_Bob 4.5 %, Y0 1.7e-6, e_detector 3.3 %,
#: f(e) 1.22, q 1/2 (mu, nu and the intensity mix are protocol choices, not part of the set).
GYS = LinkParameters()


def transmittance(link: LinkParameters) -> float:
    return float(10.0 ** (-link.alpha_db_per_km * link.distance_km / 10.0) * link.eta_bob)


def expected_gain(link: LinkParameters, intensity: float) -> float:
    """Q: probability that a pulse of mean photon number ``intensity`` gives a click."""
    return 1.0 - (1.0 - link.dark_count) * math.exp(-link.eta * intensity)


def expected_error_rate(link: LinkParameters, intensity: float) -> float:
    """E: error rate of the sifted clicks of that intensity."""
    signal = 1.0 - math.exp(-link.eta * intensity)
    errors = link.e_detector * signal + E0 * link.dark_count * (1.0 - signal)
    return errors / expected_gain(link, intensity)


def single_photon_yield(link: LinkParameters) -> float:
    """Y1 = 1 - (1-Y0)(1-eta), the true yield of single-photon pulses (infinite-decoy limit)."""
    return 1.0 - (1.0 - link.dark_count) * (1.0 - link.eta)


def single_photon_error(link: LinkParameters) -> float:
    """e1 = (e0 Y0 (1-eta) + e_d eta) / Y1, the true single-photon error rate."""
    eta, y0 = link.eta, link.dark_count
    return (E0 * y0 * (1.0 - eta) + link.e_detector * eta) / single_photon_yield(link)


def key_rate_infinite_decoy(link: LinkParameters) -> float:
    """GLLP rate with Y1 and e1 known exactly (LMC 2005 eq. 1; the infinite-decoy case), per pulse.

    Not clamped: a negative value means no key.
    """
    mu = link.mu
    q_mu, e_mu = expected_gain(link, mu), expected_error_rate(link, mu)
    q1 = single_photon_yield(link) * mu * math.exp(-mu)
    return link.q * (-q_mu * link.f_ec * binary_entropy(e_mu) + q1 * (1.0 - binary_entropy(single_photon_error(link))))


@dataclass(frozen=True)
class DecoyBounds:
    """Lower bound on the single-photon yield and upper bound on its error rate."""

    y1_lower: float
    e1_upper: float
    q1_lower: float  # = y1_lower * mu * exp(-mu), the single-photon share of the signal gain


def decoy_bounds(
    mu: float, nu: float, *, q_mu: float, q_nu: float, y0: float, eq_nu: float, y0_for_error: float | None = None,
) -> DecoyBounds:
    """The vacuum + weak decoy estimates of Ma, Qi, Zhao & Lo, PRA 72, 012326, eqs. (34) and (37).

    Y1 >= mu/(mu nu - nu^2) (Q_nu e^nu - Q_mu e^mu nu^2/mu^2 - (mu^2-nu^2)/mu^2 Y0)
    e1 <= (E_nu Q_nu e^nu - e0 Y0) / (Y1_L nu)

    ``eq_nu`` is E_nu * Q_nu (the error gain).  For finite blocks pass the pessimistic end of each
    confidence interval: upper ``q_mu`` and ``y0``, lower ``q_nu``; ``y0_for_error`` (default ``y0``)
    takes the lower end of Y0, since e1's bound falls as Y0 grows.
    """
    if not 0 < nu < mu:
        raise ConfigurationError("need 0 < nu < mu", field="nu")
    y1 = mu / (mu * nu - nu * nu) * (
        q_nu * math.exp(nu) - q_mu * math.exp(mu) * nu * nu / (mu * mu) - (mu * mu - nu * nu) / (mu * mu) * y0)
    y1 = max(y1, 0.0)
    y0e = y0 if y0_for_error is None else y0_for_error
    e1 = 0.5 if y1 <= 0 else min(0.5, max(0.0, (eq_nu * math.exp(nu) - E0 * y0e) / (y1 * nu)))
    return DecoyBounds(y1_lower=y1, e1_upper=e1, q1_lower=y1 * mu * math.exp(-mu))


def key_rate_vacuum_weak(link: LinkParameters) -> float:
    """Asymptotic rate of the practical vacuum + weak decoy protocol (expected gains, no fluctuations).

    As in Ma et al. only the signal pulses give key; R = q{-Q_mu f H2(E_mu) + Q1_L[1 - H2(e1_U)]}.
    """
    mu, nu = link.mu, link.nu
    q_mu, q_nu = expected_gain(link, mu), expected_gain(link, nu)
    bounds = decoy_bounds(mu, nu, q_mu=q_mu, q_nu=q_nu, y0=expected_gain(link, 0.0),
                          eq_nu=expected_error_rate(link, nu) * q_nu)
    leak = q_mu * link.f_ec * binary_entropy(expected_error_rate(link, mu))
    return link.q * (-leak + bounds.q1_lower * (1.0 - binary_entropy(bounds.e1_upper)))


def _with_mu(link: LinkParameters, mu: float) -> LinkParameters:
    # nu only matters to the vacuum + weak estimate (where mu > nu is enforced by the search), so it
    # is lowered, never raised, to keep the parameters valid while mu is scanned.
    return replace(link, mu=mu, nu=min(link.nu, mu / 2.0))


def optimal_mu(link: LinkParameters, *, vacuum_weak: bool = False, lo: float = 0.01, hi: float = 1.2) -> float:
    """The signal intensity that maximises the key rate at this link (golden-section search)."""
    rate = key_rate_vacuum_weak if vacuum_weak else key_rate_infinite_decoy

    def f(m: float) -> float:
        if vacuum_weak and m <= link.nu:
            return -math.inf
        return rate(_with_mu(link, m))

    lo = max(lo, link.nu * 1.01) if vacuum_weak else lo
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def max_distance(link: LinkParameters, *, vacuum_weak: bool = False, optimise_mu: bool = True,
                 hi_km: float = 400.0) -> float:
    """The length (km) at which the key rate (with ``mu`` re-optimised at each length) reaches zero."""
    rate = key_rate_vacuum_weak if vacuum_weak else key_rate_infinite_decoy

    def best(d: float) -> float:
        at = link.at(d)
        if optimise_mu:
            at = _with_mu(at, optimal_mu(at, vacuum_weak=vacuum_weak))
        return rate(at)

    lo, hi = 0.0, hi_km
    if best(lo) <= 0:
        return 0.0
    for _ in range(50):
        mid = (lo + hi) / 2.0
        if best(mid) > 0:
            lo = mid
        else:
            hi = mid
    return lo
