"""The learning-curve fit of Hoiem et al., *Learning Curves for Analysis of Deep Networks* (ICML 2021, arXiv
2010.11029).

The test error (percent) as a function of the training-set size n (samples per class) is modelled as

    e(n) = alpha + eta * n**gamma                                    (the paper's "extended power law")

and estimated exactly as the official code does (github.com/allenai/learning-curve, ``lc/curve.py`` and
``lc/variance.py``, Apache-2.0):

1. the sample variance ``s2_j`` (ddof 1) of the repeated measurements at every size with ``m_j >= 2`` of them;
2. the smoothed variance model ``sigma2(n) = v0 + v1 / n`` with ``v0 = 0.02`` (%^2) fixed and ``v1`` from a weighted
   least squares through the origin in ``x = 1/n`` with weights ``m_j - 1``: ``v1 = sum w x (s2 - v0) / sum w x^2``
   (the lazy mode, one measurement per size, takes ``v1`` by hand instead);
3. for each gamma of the grid -1.00, -0.99, ..., -0.01: weighted least squares for (alpha, eta) in closed form, one row
   ``[1, n_i**gamma]`` per measurement with weight ``1 / (sigma2(n_i) * m_j)`` (every size weighs ``1/sigma2`` in
   total however many repetitions it has);
4. gamma minimizes ``sum_i w_i (e_i - alpha - eta n_i**gamma)**2 + 5 |gamma + 0.5|`` (a prior towards -0.5; the first
   minimum on ties, the grid ascending). ``gamma=`` fixes it instead.

Summaries (the paper's Fig. 1): the error ``e_N = e(N)`` and the data-reliance ``beta_N = -2 eta gamma N**gamma``, the
slope of the curve against ``n**-0.5`` scaled by ``N**-0.5``. The linear rule ``e(dN) ~ e_N + (1/sqrt(d) - 1) beta_N``
(quartering the data adds about ``beta_N``, quadrupling it removes about ``beta_N / 2``) is exact only at
gamma = -0.5, so the exact ``e(dN)`` is reported beside it. The official README trusts extrapolation up to 4N.

Uncertainty. The official band ``e(n) +- 1.96 sqrt(x' Cov[alpha, eta] x)`` holds gamma fixed at its estimate and
under-covers, badly so for ``beta_N``. Here the intervals come from a three-parameter sandwich (delta method) over
(alpha, eta, gamma): Jacobian rows ``J_i = [1, n_i**g, eta n_i**g ln n_i]``, ``H = (J' W J)^-1``,
``Cov = H J' W S W J H`` with ``S = diag(sigma2(n_i))``, and gradients of ``e_N`` and ``beta_N`` through it; the
tests check their coverage on seeded synthetic curves. With gamma fixed by the caller the two-parameter covariance is
the exact one and gamma's interval is the point itself.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

V0 = 0.02                 # %^2: the variance floor of the official config (lc/config.yaml, v_0)
GAMMA_PRIOR = 5.0         # search_reg_coeff: weight of |gamma + 0.5| in the gamma search
GAMMA_CENTER = -0.5       # where the prior pulls gamma (and the default fixed gamma of the official config)
GAMMA_GRID = tuple(round(-1.0 + 0.01 * i, 2) for i in range(100))  # -1.00 ... -0.01; 0 is excluded
EXTRAPOLATION_LIMIT = 4.0  # the official README: predictions hold "up to 4x" the full training set
REPORTED_RATIOS = (0.25, 2.0, 4.0)  # d of the e(dN) columns


@dataclass(frozen=True, eq=False)
class LearningCurveFit:
    """A fitted learning curve ``e(n) = alpha + eta n**gamma`` (percent error, n per class) and its summaries.

    Attributes:
        alpha, eta, gamma: the curve parameters (alpha may be negative: it is not constrained).
        N: the reference size of ``e_N`` and ``beta_N`` (samples per class).
        e_N: ``e(N)``.
        beta_N: ``-2 eta gamma N**gamma``, the data-reliance.
        level: the confidence level of every ``*_ci`` interval.
        alpha_ci, eta_ci, gamma_ci, e_N_ci, beta_N_ci: (low, high) Wald intervals from ``covariance``.
        covariance: 3x3 covariance of (alpha, eta, gamma): the sandwich over all three parameters, or, with gamma
            fixed, the two-parameter one padded with zeros.
        covariance_given_gamma: 2x2 covariance of (alpha, eta) with gamma held at its value (the official band).
        gamma_fixed: whether gamma was given rather than searched.
        v0, v1: the variance model ``sigma2(n) = v0 + v1 / n`` (%^2).
        objective: the weighted sum of squared residuals at the chosen gamma (without the prior).
        sizes, counts, means: the distinct sizes (ascending), measurements per size and their mean errors.
        notes: warnings raised during the fit (gamma on a grid edge, v1 clamped, ...), also kept here.
    """

    alpha: float
    eta: float
    gamma: float
    N: float
    e_N: float
    beta_N: float
    level: float
    alpha_ci: tuple[float, float]
    eta_ci: tuple[float, float]
    gamma_ci: tuple[float, float]
    e_N_ci: tuple[float, float]
    beta_N_ci: tuple[float, float]
    covariance: np.ndarray
    covariance_given_gamma: np.ndarray
    gamma_fixed: bool
    v0: float
    v1: float
    objective: float
    sizes: tuple[float, ...]
    counts: tuple[int, ...]
    means: tuple[float, ...]
    notes: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------ curve values
    def e(self, n: float | np.ndarray) -> float | np.ndarray:
        """The fitted error at ``n`` samples per class (any n > 0; beyond ``extrapolation_limit`` it is a guess)."""
        if np.ndim(n):
            return self.alpha + self.eta * np.asarray(n, dtype=np.float64) ** self.gamma
        return float(self.alpha + self.eta * float(n) ** self.gamma)

    __call__ = e

    def beta(self, n: float) -> float:
        """The data-reliance ``-2 eta gamma n**gamma`` at size ``n``."""
        return float(-2.0 * self.eta * self.gamma * float(n) ** self.gamma)

    def approx(self, d: float) -> float:
        """The paper's linear rule ``e_N + (1/sqrt(d) - 1) beta_N`` for ``e(d N)`` (exact only at gamma = -0.5)."""
        return float(self.e_N + (1.0 / math.sqrt(d) - 1.0) * self.beta_N)

    @property
    def extrapolation_limit(self) -> float:
        """4N: the largest size the official README trusts the curve at."""
        return EXTRAPOLATION_LIMIT * self.N

    def se_e(self, n: float | np.ndarray) -> np.ndarray:
        """Standard error of ``e(n)`` from the three-parameter covariance (vectorized over ``n``)."""
        n = np.asarray(n, dtype=np.float64)
        p = n ** self.gamma
        grad = np.stack([np.ones_like(p), p, self.eta * p * np.log(n)], axis=-1)  # (..., 3)
        return np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", grad, self.covariance, grad), 0.0))

    def band(self, n: float | np.ndarray, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise (low, high) interval of ``e(n)`` at ``level`` (default: the fit's)."""
        z = _z(self.level if level is None else _check_level(level))
        value, se = np.asarray(self.e(np.asarray(n, dtype=np.float64))), self.se_e(n)
        return value - z * se, value + z * se

    def se_beta(self, n: float | None = None) -> float:
        """Standard error of ``beta(n)`` (default n = N) from the three-parameter covariance."""
        n = self.N if n is None else float(n)
        grad = _beta_gradient(self.eta, self.gamma, n)
        return float(math.sqrt(max(grad @ self.covariance @ grad, 0.0)))

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: parameters, intervals, e(dN) exact and approximate, the variance model."""
        se = np.sqrt(np.maximum(np.diag(self.covariance), 0.0))
        out: dict[str, Any] = dict(
            N=self.N, level=self.level, alpha=self.alpha, eta=self.eta, gamma=self.gamma, e_N=self.e_N,
            beta_N=self.beta_N, alpha_se=float(se[0]), eta_se=float(se[1]), gamma_se=float(se[2]),
            e_N_se=float(self.se_e(self.N)), beta_N_se=self.se_beta(), alpha_ci=list(self.alpha_ci),
            eta_ci=list(self.eta_ci), gamma_ci=list(self.gamma_ci), e_N_ci=list(self.e_N_ci),
            beta_N_ci=list(self.beta_N_ci), gamma_fixed=self.gamma_fixed, v0=self.v0, v1=self.v1,
            objective=self.objective, extrapolation_limit=self.extrapolation_limit,
            sizes=list(self.sizes), counts=list(self.counts), means=list(self.means), notes=list(self.notes),
            covariance=self.covariance.tolist())
        out["at"] = {f"{d:g}N": dict(n=d * self.N, exact=float(self.e(d * self.N)), approx=self.approx(d),
                                     ci=[float(v) for v in self.band(d * self.N)])
                     for d in REPORTED_RATIOS}
        return out


def fit_learning_curve(sizes: Sequence[float], errors: Sequence[float], N: float, *, gamma: float | None = None,
                       v0: float = V0, v1: float | None = None, gamma_prior: float = GAMMA_PRIOR,
                       gamma_grid: Sequence[float] | None = None, level: float = 0.95,
                       official_rounding: bool = False) -> LearningCurveFit:
    """Fits ``e(n) = alpha + eta n**gamma`` to error measurements as the official learning-curve code does.

    Args:
        sizes: one training-set size per measurement, in samples per class (> 0); sizes repeat for repetitions.
        errors: one test error per measurement, in percent (0..100).
        N: the size of ``e_N`` and ``beta_N`` (usually the full training set, per class).
        gamma: None searches gamma on ``gamma_grid`` with the prior; a negative number fixes it (the official
            ``gamma_search: False`` uses -0.5).
        v0: the variance floor of ``sigma2(n) = v0 + v1/n``, in %^2 (official 0.02).
        v1: None estimates it from the sizes with repeated measurements; a number >= 0 sets it (the lazy mode, one
            measurement per size; the official notebooks use 10 or 20).
        gamma_prior: the weight of ``|gamma + 0.5|`` added to the objective in the search (official 5).
        gamma_grid: the gamma values searched (default -1.00, -0.99, ..., -0.01).
        level: confidence level of the intervals, in (0, 1).
        official_rounding: round to 4 decimals where the official code does (sample variances, v1, sigma2, the
            objective, alpha and eta before e_N and beta_N), to reproduce its printed numbers digit for digit.

    Returns:
        A :class:`LearningCurveFit`.

    Raises:
        ValueError: fewer than 3 distinct sizes, no size measured twice without ``v1``, a size <= 0, an error
            outside [0, 100] or not finite, mismatched lengths, or a bad option.
        TypeError: non-numeric input.
    """
    n, e = _check_measurements(sizes, errors)
    N = _check_positive("N", N)
    v0 = _check_positive("v0", v0)
    level = _check_level(level)
    if v1 is not None:
        v1 = _check_number("v1", v1, minimum=0.0)
    gamma_prior = _check_number("gamma_prior", gamma_prior, minimum=0.0)
    if gamma is not None:
        gamma = _check_number("gamma", gamma)
        if gamma >= 0:
            raise ValueError(f"gamma must be < 0 (a decreasing curve; 0 makes eta and alpha indistinguishable); "
                             f"got {gamma!r}")
    grid = np.asarray(GAMMA_GRID if gamma_grid is None else [_check_number("gamma_grid", g) for g in gamma_grid])
    if grid.size == 0 or np.any(grid >= 0):
        raise ValueError(f"gamma_grid must hold negative values; got {list(grid)}")
    notes: list[str] = []
    rnd = (lambda x: np.round(x, 4)) if official_rounding else (lambda x: x)

    uniq, inverse, counts = np.unique(n, return_inverse=True, return_counts=True)
    if uniq.size < 3:
        raise ValueError(f"a learning curve needs at least 3 distinct training-set sizes; got {uniq.size} "
                         f"({[float(u) for u in uniq]})")
    means = np.array([e[inverse == j].mean() for j in range(uniq.size)])
    if v1 is None:
        repeated = counts >= 2
        if not repeated.any():
            raise ValueError("no training-set size has 2 or more measurements, so the variance cannot be estimated; "
                             "repeat at least one size (several disjoint partitions) or pass v1 (the lazy mode; "
                             "the official notebooks use v1 = 10 or 20)")
        s2 = rnd(np.array([np.var(e[inverse == j], ddof=1) for j in np.flatnonzero(repeated)]))
        x, w = 1.0 / uniq[repeated], counts[repeated] - 1.0
        v1 = float(rnd(np.sum(w * x * (s2 - v0)) / np.sum(w * x * x)))
        if v1 < 0:
            notes.append(f"the variance fit gave v1 = {v1:.4g} < 0 (repeats closer than the floor v0 = {v0}); "
                         f"v1 clamped to 0, so sigma2(n) = v0 at every size")
            v1 = 0.0
    sigma2 = rnd(v0 + v1 / n)                          # (M,) per measurement
    w = 1.0 / (sigma2 * counts[inverse])               # (M,)

    gammas = np.array([gamma]) if gamma is not None else grid
    params, objective = _wls(n, e, w, gammas)          # (G, 2), (G,)
    objective = rnd(objective)
    if gamma is None:
        best = int(np.argmin(objective + gamma_prior * np.abs(gammas - GAMMA_CENTER)))  # first minimum on ties
        if gammas[best] in (grid.min(), grid.max()):
            notes.append(f"gamma = {gammas[best]:g} lies on the edge of the searched grid "
                         f"[{grid.min():g}, {grid.max():g}]: the curve may want a gamma outside it")
    else:
        best = 0
    g = float(gammas[best])
    alpha, eta = (float(v) for v in rnd(params[best]))
    e_N = float(rnd(alpha + eta * N ** g))
    beta_N = float(rnd(-2.0 * eta * g * N ** g))

    cov2 = _covariance(np.stack([np.ones_like(n), n ** g], axis=1), w, sigma2)
    if gamma is None:
        jac = np.stack([np.ones_like(n), n ** g, eta * n ** g * np.log(n)], axis=1)
        cov3 = _covariance(jac, w, sigma2)
    else:
        cov3 = np.zeros((3, 3))
        cov3[:2, :2] = cov2
    z = _z(level)
    se = np.sqrt(np.maximum(np.diag(cov3), 0.0))
    se_e = math.sqrt(max(_e_gradient(eta, g, N) @ cov3 @ _e_gradient(eta, g, N), 0.0))
    se_b = math.sqrt(max(_beta_gradient(eta, g, N) @ cov3 @ _beta_gradient(eta, g, N), 0.0))
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return LearningCurveFit(
        alpha=alpha, eta=eta, gamma=g, N=N, e_N=e_N, beta_N=beta_N, level=level,
        alpha_ci=_ci(alpha, se[0], z), eta_ci=_ci(eta, se[1], z), gamma_ci=_ci(g, se[2], z),
        e_N_ci=_ci(e_N, se_e, z), beta_N_ci=_ci(beta_N, se_b, z), covariance=cov3, covariance_given_gamma=cov2,
        gamma_fixed=gamma is not None, v0=v0, v1=float(v1), objective=float(objective[best]),
        sizes=tuple(float(u) for u in uniq), counts=tuple(int(c) for c in counts),
        means=tuple(float(m) for m in means), notes=tuple(notes))


# ---------------------------------------------------------------------- numerics
def _wls(n: np.ndarray, e: np.ndarray, w: np.ndarray, gammas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form weighted least squares of ``e ~ alpha + eta n**g`` for every g at once: (G, 2) params, (G,) SSE."""
    p = n[None, :] ** gammas[:, None]                  # (G, M)
    s0, s1, s2 = w.sum(), (w * p).sum(1), (w * p * p).sum(1)
    t0, t1 = (w * e).sum(), (w * p * e).sum(1)
    det = s0 * s2 - s1 * s1                            # > 0 unless every n is the same (excluded above)
    alpha = (s2 * t0 - s1 * t1) / det
    eta = (s0 * t1 - s1 * t0) / det
    resid = e[None, :] - alpha[:, None] - eta[:, None] * p
    return np.stack([alpha, eta], axis=1), (w[None, :] * resid * resid).sum(1)


def _covariance(jac: np.ndarray, w: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """Sandwich ``H J' W S W J H`` with ``H = (J' W J)^+`` (pseudo-inverse: a flat curve, eta = 0, is singular)."""
    h = np.linalg.pinv(jac.T @ (w[:, None] * jac))
    meat = jac.T @ ((w * w * sigma2)[:, None] * jac)
    return h @ meat @ h


def _e_gradient(eta: float, gamma: float, n: float) -> np.ndarray:
    p = n ** gamma
    return np.array([1.0, p, eta * p * math.log(n)])


def _beta_gradient(eta: float, gamma: float, n: float) -> np.ndarray:
    p = n ** gamma
    return np.array([0.0, -2.0 * gamma * p, -2.0 * eta * p * (1.0 + gamma * math.log(n))])


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _ci(value: float, se: float, z: float) -> tuple[float, float]:
    return (float(value - z * se), float(value + z * se))


# ---------------------------------------------------------------------- argument guards
def _check_number(name: str, value: object, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}; got {value!r}")
    return value


def _check_positive(name: str, value: object) -> float:
    value = _check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return value


def _check_level(level: object) -> float:
    level = _check_number("level", level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    return level


def _as_vector(name: str, values: object) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers; got {type(values).__name__} {values!r}")
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:  # ragged input
        raise TypeError(f"{name} must be a flat sequence of numbers; got {values!r}") from exc
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name} must hold real numbers; got dtype {array.dtype} ({values!r})")
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per measurement); got shape {array.shape}")
    return array.astype(np.float64)


def _check_measurements(sizes: object, errors: object) -> tuple[np.ndarray, np.ndarray]:
    n, e = _as_vector("sizes", sizes), _as_vector("errors", errors)
    if n.size != e.size:
        raise ValueError(f"sizes and errors must have one entry per measurement; got {n.size} sizes and "
                         f"{e.size} errors")
    bad = ~np.isfinite(n) | (n <= 0)
    if bad.any():
        raise ValueError(f"sizes must be finite and > 0 (samples per class); got {n[bad].tolist()}")
    bad = ~np.isfinite(e) | (e < 0) | (e > 100)
    if bad.any():
        raise ValueError(f"errors must be finite percentages in [0, 100]; got {e[bad].tolist()}")
    return n, e
