"""Comparing two fitted learning curves (Hoiem et al., ICML 2021): differences of e_N and beta_N, crossing points.

"Given two classifiers with similar e_N, the one with higher beta_N is said to be more data-reliant and would
outperform when trained on more data but underperform with less data" (the paper's project page). Two curves
``e_A(n)`` and ``e_B(n)`` cross where ``e_A(n) = e_B(n)``; a crossing is found on a log-spaced grid and refined by
bisection (numpy only). A crossing beyond 4N lies where the official README stops trusting the curves, and one below the smallest
measured size is an extrapolation too: both are flagged, never hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .learning_curve import LearningCurveFit

_GRID_POINTS = 2000
_BISECTIONS = 200  # halvings of a bracket in log n: far below float64 resolution


def _bisect(f, lo: float, hi: float) -> float:
    """A root of ``f`` in ``[lo, hi]`` (``f(lo)`` and ``f(hi)`` of opposite signs), bisected in log n."""
    f_lo = f(lo)
    for _ in range(_BISECTIONS):
        mid = math.sqrt(lo * hi)
        if mid in (lo, hi):
            break
        f_mid = f(mid)
        if (f_mid < 0) == (f_lo < 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


@dataclass(frozen=True)
class Crossing:
    """A size n (per class) at which two fitted curves have the same error.

    Attributes:
        n: the crossing size.
        error: the common error there (percent).
        below: which curve is lower for n just above the crossing: ``"a"`` or ``"b"``.
        trusted: whether n lies between the smallest measured size and 4N (the range the fits support).
    """

    n: float
    error: float
    below: str
    trusted: bool


def curve_crossings(a: LearningCurveFit, b: LearningCurveFit, *, n_min: float | None = None,
                    n_max: float | None = None) -> list[Crossing]:
    """Sizes in ``[n_min, n_max]`` where the curves ``a`` and ``b`` cross (ascending).

    Args:
        a, b: two fits of the same task (their N may differ; the trusted range uses the smaller of each bound).
        n_min: smallest size searched (default: a tenth of the smallest measured size of either fit).
        n_max: largest size searched (default: 100 x the larger N).

    Raises:
        ValueError: ``n_min`` / ``n_max`` not positive or not increasing.
    """
    lowest = min(a.sizes[0], b.sizes[0])
    n_min = lowest / 10.0 if n_min is None else float(n_min)
    n_max = 100.0 * max(a.N, b.N) if n_max is None else float(n_max)
    if not (math.isfinite(n_min) and math.isfinite(n_max) and 0 < n_min < n_max):
        raise ValueError(f"need 0 < n_min < n_max; got n_min={n_min!r}, n_max={n_max!r}")
    trusted_max = min(a.extrapolation_limit, b.extrapolation_limit)
    trusted_min = max(a.sizes[0], b.sizes[0])

    def diff(n: float) -> float:
        return float(a.e(n)) - float(b.e(n))

    grid = np.geomspace(n_min, n_max, _GRID_POINTS)
    values = np.asarray(a.e(grid)) - np.asarray(b.e(grid))
    found: list[Crossing] = []
    for i in np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) <= 0):
        lo, hi = float(grid[i]), float(grid[i + 1])
        if values[i] == 0 and found and math.isclose(found[-1].n, lo):
            continue
        n = lo if values[i] == 0 else (hi if values[i + 1] == 0 else _bisect(diff, lo, hi))
        after = diff(n * 1.001)
        found.append(Crossing(n=float(n), error=float(a.e(n)), below="a" if after < 0 else "b",
                              trusted=trusted_min <= n <= trusted_max))
    return found


def compare_fits(a: LearningCurveFit, b: LearningCurveFit) -> dict[str, Any]:
    """Differences ``b - a`` of e_N and beta_N with standard errors ``sqrt(se_a^2 + se_b^2)`` and the crossings.

    The standard errors treat the two fits as independent. Two models trained on the same partitions make
    correlated errors, positively in practice, so the independent SE is conservative for the difference.
    """
    if not math.isclose(a.N, b.N):
        raise ValueError(f"compare fits at the same N; got N = {a.N:g} and N = {b.N:g}")
    se_e = math.hypot(float(a.se_e(a.N)), float(b.se_e(b.N)))
    se_b = math.hypot(a.se_beta(), b.se_beta())
    return dict(delta_e_N=b.e_N - a.e_N, delta_e_N_se=se_e, delta_beta_N=b.beta_N - a.beta_N, delta_beta_N_se=se_b,
                crossings=[c.__dict__ for c in curve_crossings(a, b)])
