"""torchsphere.analysis: the learning-curve fit (Hoiem et al., ICML 2021) against a slow reference, the official
golden numbers, interval coverage on seeded synthetic curves, invariances and guards."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from conftest import LC_COVERAGE_BETA, LC_COVERAGE_E, LC_EXACT_ATOL
from torchsphere.analysis import GAMMA_GRID, fit_learning_curve
from torchsphere.analysis.comparison import compare_fits, curve_crossings

# The No-Pretr-Ft measurements (CIFAR-100, errors in percent, n per class) from data/no_pretr_ft.json of
# github.com/allenai/learning-curve (commit 6a56f9e), Copyright 2021 Tanmay Gupta, Apache License 2.0.
NO_PRETR_FT = {
    25: [74.04, 74.48, 74.07, 74.4, 75.95, 74.97, 74.02, 75.8, 74.6, 74.27],
    50: [57.59, 58.45, 58.13, 58.44, 59.46, 58.14, 58.71, 58.22],
    100: [45.01, 43.64, 45.06, 44.63],
    200: [35.36, 35.2],
    400: [27.92],
}
SIZES = [n for n, errors in NO_PRETR_FT.items() for _ in errors]
ERRORS = [e for errors in NO_PRETR_FT.values() for e in errors]
SCHEDULE = {25: 16, 50: 8, 100: 4, 200: 2, 400: 1}  # the official README's repetitions at N/16 ... N


def flat(schedule: dict[int, int]) -> np.ndarray:
    return np.array([n for n, m in schedule.items() for _ in range(m)], dtype=np.float64)


def reference_fit(n, e, N, v0=0.02, v1=None, prior=5.0):
    """Slow, obvious float64 port of the official loop: per-size variances, v1, then pinv-WLS at every gamma."""
    n, e = np.asarray(n, float), np.asarray(e, float)
    sizes = sorted(set(n.tolist()))
    m = {s: int((n == s).sum()) for s in sizes}
    if v1 is None:
        num = den = 0.0
        for s in sizes:
            if m[s] >= 2:
                num += (m[s] - 1) * (1 / s) * (np.var(e[n == s], ddof=1) - v0)
                den += (m[s] - 1) * (1 / s) ** 2
        v1 = num / den
    best = None
    for g in GAMMA_GRID:
        A = np.array([[1.0, s ** g] for s in n])
        w = np.array([1.0 / ((v0 + v1 / s) * m[s]) for s in n])
        M = np.linalg.pinv(np.diag(np.sqrt(w)) @ A) @ np.diag(np.sqrt(w))
        alpha, eta = M @ e
        obj = float(np.sum(w * (e - A @ np.array([alpha, eta])) ** 2))
        score = obj + prior * abs(g + 0.5)
        if best is None or score < best[0]:
            best = (score, g, alpha, eta, obj)
    return dict(gamma=best[1], alpha=best[2], eta=best[3], objective=best[4], v1=v1)


# ---------------------------------------------------------------------- exactness
def test_noise_free_curve_is_recovered_exactly():
    n = flat(SCHEDULE)
    alpha, eta, gamma = 5.7, 259.0, -0.41
    fit = fit_learning_curve(n, alpha + eta * n ** gamma, 400, v1=15.0)
    assert fit.gamma == gamma
    for got, want in ((fit.alpha, alpha), (fit.eta, eta), (fit.e_N, alpha + eta * 400 ** gamma),
                      (fit.beta_N, -2 * eta * gamma * 400 ** gamma)):
        assert got == pytest.approx(want, abs=LC_EXACT_ATOL)
    assert fit.objective == pytest.approx(0.0, abs=1e-12)


def test_off_grid_gamma_comes_back_as_the_nearest_grid_point():
    n = flat(SCHEDULE)
    fit = fit_learning_curve(n, 10 + 300 * n ** -0.413, 400, v1=15.0)
    assert fit.gamma == -0.41
    assert abs(fit.e_N - (10 + 300 * 400 ** -0.413)) < 0.05


def test_matches_the_slow_reference_on_noisy_data():
    rng = np.random.default_rng(3)
    n = flat(SCHEDULE)
    e = 20 + 150 * n ** -0.25 + rng.normal(0, np.sqrt(0.02 + 15 / n))
    fit, ref = fit_learning_curve(n, e, 400), reference_fit(n, e, 400)
    assert fit.gamma == ref["gamma"]
    for key in ("alpha", "eta", "objective", "v1"):
        assert getattr(fit, key) == pytest.approx(ref[key], rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------- golden numbers of the official code
def test_golden_no_pretr_ft_gamma_search():
    fit = fit_learning_curve(SIZES, ERRORS, 400, official_rounding=True)
    assert (fit.gamma, round(fit.e_N, 4), round(fit.beta_N, 4)) == (-0.41, 27.9133, 18.2284)
    assert (round(fit.alpha, 4), round(fit.eta, 4), round(fit.v1, 4), round(fit.objective, 4)) == \
        (5.6835, 259.2864, 12.6524, 6.2808)
    plain = fit_learning_curve(SIZES, ERRORS, 400)  # without the official rounding: the same to 4 decimals
    assert (plain.gamma, round(plain.e_N, 4), round(plain.beta_N, 4)) == (-0.41, 27.9133, 18.2284)


def test_golden_no_pretr_ft_gamma_fixed():
    fit = fit_learning_curve(SIZES, ERRORS, 400, gamma=-0.5, official_rounding=True)
    assert (round(fit.e_N, 4), round(fit.beta_N, 4), round(fit.alpha, 4), round(fit.eta, 4)) == \
        (28.2575, 16.0257, 12.2318, 320.5148)
    assert round(fit.objective, 3) == 16.561
    plain = fit_learning_curve(SIZES, ERRORS, 400, gamma=-0.5)
    assert (round(plain.e_N, 2), round(plain.beta_N, 2)) == (28.26, 16.03)
    assert plain.gamma_ci == (-0.5, -0.5) and plain.gamma_fixed


def test_golden_no_pretr_ft_lazy():
    fit = fit_learning_curve([100, 200, 400], [45.01, 35.36, 27.92], 400, v1=20, official_rounding=True)
    assert (fit.gamma, round(fit.e_N, 4), round(fit.beta_N, 4), round(fit.alpha, 4), round(fit.eta, 4)) == \
        (-0.43, 27.955, 18.0819, 6.9295, 276.4594)


# ---------------------------------------------------------------------- honest intervals
TRUE_CURVES = [(5.7, 259.0, -0.41), (10.0, 300.0, -0.5), (2.0, 900.0, -0.8)]


@pytest.mark.parametrize(("alpha", "eta", "gamma"), TRUE_CURVES)
def test_interval_coverage_on_seeded_synthetic_curves(alpha, eta, gamma):
    rng = np.random.default_rng(0)
    n = flat(SCHEDULE)
    truth = alpha + eta * n ** gamma
    true_e, true_b = alpha + eta * 400 ** gamma, -2 * eta * gamma * 400 ** gamma
    trials, hit_e, hit_b, hit_b_official, e_values = 300, 0, 0, 0, []
    z = 1.959963984540054
    for _ in range(trials):
        e = truth + rng.normal(0, np.sqrt(0.02 + 15 / n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fit = fit_learning_curve(n, e, 400)
        hit_e += fit.e_N_ci[0] <= true_e <= fit.e_N_ci[1]
        hit_b += fit.beta_N_ci[0] <= true_b <= fit.beta_N_ci[1]
        se_official = abs(2 * fit.gamma * 400 ** fit.gamma) * math.sqrt(fit.covariance_given_gamma[1, 1])
        hit_b_official += abs(fit.beta_N - true_b) <= z * se_official
        e_values.append(fit.e_N)
    low, high = LC_COVERAGE_E
    assert low <= hit_e / trials <= high
    low, high = LC_COVERAGE_BETA
    assert low <= hit_b / trials <= high
    assert hit_b_official / trials < 0.8  # the official gamma-conditional band under-covers beta_N
    assert abs(np.mean(e_values) - true_e) < 0.1  # e_N is unbiased within the reference's simulation bounds


def test_band_and_standard_errors_agree():
    fit = fit_learning_curve(SIZES, ERRORS, 400)
    low, high = fit.band(400.0)
    assert (float(low), float(high)) == pytest.approx(fit.e_N_ci, abs=1e-9)
    assert fit.to_dict()["beta_N_se"] == pytest.approx((fit.beta_N_ci[1] - fit.beta_N_ci[0]) / (2 * 1.959963984540054))
    wide = fit.band(400.0, level=0.99)
    assert wide[0] < low and wide[1] > high


# ---------------------------------------------------------------------- invariances
def test_shift_moves_alpha_and_e_N_only():
    a, b = fit_learning_curve(SIZES, ERRORS, 400), fit_learning_curve(SIZES, np.add(ERRORS, 7.5), 400)
    assert (b.gamma, b.alpha - a.alpha, b.e_N - a.e_N) == pytest.approx((a.gamma, 7.5, 7.5))
    assert (b.eta, b.beta_N) == pytest.approx((a.eta, a.beta_N))


def test_scaling_errors_and_v0_scales_the_curve():
    s = 0.5
    a, b = fit_learning_curve(SIZES, ERRORS, 400), fit_learning_curve(SIZES, np.multiply(ERRORS, s), 400,
                                                                        v0=0.02 * s * s)
    assert b.gamma == a.gamma
    assert (b.alpha, b.eta, b.e_N, b.beta_N) == pytest.approx((s * a.alpha, s * a.eta, s * a.e_N, s * a.beta_N))


def test_order_of_measurements_does_not_matter():
    order = np.random.default_rng(1).permutation(len(SIZES))
    a = fit_learning_curve(SIZES, ERRORS, 400)
    b = fit_learning_curve(np.array(SIZES)[order], np.array(ERRORS)[order], 400)
    assert (b.gamma, b.e_N, b.beta_N) == pytest.approx((a.gamma, a.e_N, a.beta_N), rel=1e-12)


def test_linear_rule_is_exact_at_gamma_minus_half():
    fit = fit_learning_curve(SIZES, ERRORS, 400, gamma=-0.5)
    for d in (0.25, 2.0, 4.0):
        assert fit.approx(d) == pytest.approx(fit.e(d * 400), rel=1e-12)
    searched = fit_learning_curve(SIZES, ERRORS, 400)  # gamma -0.41: the rule is only an approximation
    assert abs(searched.approx(4) - searched.e(1600)) > 0.3
    assert searched.extrapolation_limit == 1600


# ---------------------------------------------------------------------- comparison of curves
def test_crossing_of_two_known_curves():
    n = flat(SCHEDULE)
    a = fit_learning_curve(n, 10 + 100 * n ** -0.5, 400, gamma=-0.5, v1=15)
    b = fit_learning_curve(n, 5 + 200 * n ** -0.5, 400, gamma=-0.5, v1=15)
    (cross,) = curve_crossings(a, b)
    assert cross.n == pytest.approx(400.0, rel=1e-8) and cross.error == pytest.approx(15.0)
    assert cross.below == "b" and cross.trusted
    comparison = compare_fits(a, b)
    assert comparison["delta_e_N"] == pytest.approx(0.0, abs=1e-9)
    assert comparison["delta_beta_N"] == pytest.approx(5.0)
    assert curve_crossings(a, a.__class__(**{**a.__dict__, "alpha": a.alpha + 1})) == []


# ---------------------------------------------------------------------- guards
@pytest.mark.parametrize(("sizes", "errors", "kwargs", "error", "match"), [
    ([100, 200, 100, 200], [40, 30, 41, 31], {}, ValueError, "at least 3 distinct training-set sizes; got 2"),
    ([100, 200, 400], [40, 30, 20], {}, ValueError, "no training-set size has 2 or more measurements"),
    ([100, 100, 200, 400], [40, float("nan"), 30, 20], {}, ValueError, r"errors must be finite percentages.*nan"),
    ([100, 100, 200, 400], [40, 41, 130, 20], {}, ValueError, r"errors must be finite percentages.*130"),
    ([100, 100, 200, 400], [40, 41, -1, 20], {}, ValueError, r"in \[0, 100\]; got \[-1.0\]"),
    ([100, 100, 0, 400], [40, 41, 30, 20], {}, ValueError, r"sizes must be finite and > 0.*\[0.0\]"),
    ([100, 100, -5, 400], [40, 41, 30, 20], {}, ValueError, r"sizes must be finite and > 0.*-5"),
    ([100, 100, 200], [40, 41, 30, 20], {}, ValueError, "got 3 sizes and 4 errors"),
    ([100, 100, 200, 400], [40, 41, 30, 20], {"gamma": 0.2}, ValueError, r"gamma must be < 0 .*; got 0.2"),
    ([100, 100, 200, 400], [40, 41, 30, 20], {"level": 95}, ValueError, r"level must be in \(0, 1\)"),
    ([100, 100, 200, 400], [40, 41, 30, 20], {"v1": -3}, ValueError, "v1 must be >= 0; got -3"),
    ([100, 100, 200, 400], [40, 41, 30, 20], {"gamma": "-0.5"}, TypeError, "gamma must be a real number"),
    ("100,200,400", [40, 30, 20], {}, TypeError, "sizes must be a sequence of numbers"),
    ([100, 100, 200, 400], ["a", "b", "c", "d"], {}, TypeError, "errors must hold real numbers"),
])
def test_bad_input_raises(sizes, errors, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_learning_curve(sizes, errors, 400, **kwargs)


def test_bad_N_raises():
    with pytest.raises(ValueError, match="N must be > 0; got 0"):
        fit_learning_curve(SIZES, ERRORS, 0)


def test_repeats_closer_than_the_floor_clamp_v1_with_a_warning():
    n = [25, 25, 50, 50, 100, 100, 400]
    e = [70.0, 70.0, 55.0, 55.0, 45.0, 45.0, 28.0]  # zero sample variance: v1 estimate < 0
    with pytest.warns(RuntimeWarning, match="v1 clamped to 0"):
        fit = fit_learning_curve(n, e, 400)
    assert fit.v1 == 0.0 and any("clamped" in note for note in fit.notes)
    assert np.all(np.isfinite(fit.covariance))


def test_gamma_on_the_grid_edge_warns():
    n = flat(SCHEDULE)
    with pytest.warns(RuntimeWarning, match="edge of the searched grid"):
        fit = fit_learning_curve(n, 3 + 5000 * n ** -1.6, 400, v1=15)
    assert fit.gamma == -1.0
