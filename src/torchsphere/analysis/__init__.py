"""Analysis of trained networks: learning curves (Hoiem et al., ICML 2021). Pure numerics, no training inside.

``fit_learning_curve(sizes, errors, N)`` fits ``e(n) = alpha + eta n**gamma`` to test errors (percent) measured at
several training-set sizes (samples per class), as the official code github.com/allenai/learning-curve does, and
reports ``e_N``, the data-reliance ``beta_N`` and intervals over all three parameters. ``curve_crossings`` and
``compare_fits`` compare two fitted curves. See docs/learning_curves.md.
"""
from .comparison import Crossing, compare_fits, curve_crossings
from .learning_curve import GAMMA_GRID, V0, LearningCurveFit, fit_learning_curve

__all__ = [
    "Crossing",
    "GAMMA_GRID",
    "LearningCurveFit",
    "V0",
    "compare_fits",
    "curve_crossings",
    "fit_learning_curve",
]
