"""Analysis of networks: learning curves (Hoiem et al., ICML 2021) and gradient flow through depth.

``GradientFlow(model, optimizer, every=k)`` records per-layer activation RMS, weight-gradient and weight norms and
the effective learning rate while any training loop runs, changing nothing (``gradient_flow``; docs/training.md).
The learning-curve fit is pure numerics, no training inside.

``fit_learning_curve(sizes, errors, N)`` fits ``e(n) = alpha + eta n**gamma`` to test errors (percent) measured at
several training-set sizes (samples per class), as the official code github.com/allenai/learning-curve does, and
reports ``e_N``, the data-reliance ``beta_N`` and intervals over all three parameters. ``curve_crossings`` and
``compare_fits`` compare two fitted curves. See docs/learning_curves.md.
"""
from .comparison import Crossing, compare_fits, curve_crossings
from .gradient_flow import GradientFlow, activation_rms, relative_update
from .learning_curve import GAMMA_GRID, V0, LearningCurveFit, fit_learning_curve

__all__ = [
    "Crossing",
    "GAMMA_GRID",
    "GradientFlow",
    "LearningCurveFit",
    "V0",
    "activation_rms",
    "compare_fits",
    "curve_crossings",
    "fit_learning_curve",
    "relative_update",
]
