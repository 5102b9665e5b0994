"""Small statistics helpers: quantiles and a noise figure, with no third-party dependency."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["quantile", "spread", "summarize"]


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between closest ranks (NumPy's default)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


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
