"""Small statistics helpers: quantiles and a noise figure, on the standard library's ``statistics``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["quantile", "spread", "summarize"]


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``samples``, ``q`` in hundredths (0.5, 0.95, 0.99; 0 and 1 are min and max).

    Every quantile the benchmarks report comes from here: ``statistics.quantiles(method="inclusive")``,
    linear interpolation between closest ranks.  That is NumPy's default percentile too, so the
    quartiles and whiskers matplotlib draws in the plots agree with the p95/p99 in the tables.
    """
    pct = round(q * 100)
    if not 0 <= pct <= 100 or not math.isclose(pct, q * 100, abs_tol=1e-9):
        raise ValueError(f"quantile {q!r} is not a whole percentile between 0 and 1")
    if not samples:
        return math.nan
    if pct == 0:
        return float(min(samples))
    if pct == 100 or len(samples) == 1:  # statistics.quantiles needs two samples before Python 3.13
        return float(max(samples))
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def spread(values: Sequence[float]) -> float:
    """Relative spread of repeated measurements: (max - min) / median, 0 for fewer than two values.

    Reported next to each median so that a reader can tell a real difference from machine noise.
    """
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else 0.0


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, p95, p99, min, max and count of ``samples`` (same unit as the samples)."""
    if not samples:
        return {"median": math.nan, "p95": math.nan, "p99": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "median": statistics.median(samples),
        "p95": quantile(samples, 0.95),
        "p99": quantile(samples, 0.99),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }
