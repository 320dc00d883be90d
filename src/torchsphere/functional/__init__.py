"""Functional core of torchsphere: pure tensor functions, no state."""
from ._checks import OPERATORS
from .conv import patch_norm_sq, sphere_conv1d, sphere_conv2d, sphere_conv3d
from .linear import sphere_linear
from .margins import angular_margin_logits, margin_logits, psi
from .norms import patch_norm_safe, safe_norm, safe_normalize, safe_rnorm
from .operators import ACOS_EPS, angular_activation, learnable_k, safe_acos
from .orthonormal import orthonormal_penalty

__all__ = [
    "ACOS_EPS",
    "OPERATORS",
    "angular_activation",
    "angular_margin_logits",
    "learnable_k",
    "margin_logits",
    "orthonormal_penalty",
    "patch_norm_safe",
    "patch_norm_sq",
    "psi",
    "safe_acos",
    "safe_norm",
    "safe_normalize",
    "safe_rnorm",
    "sphere_conv1d",
    "sphere_conv2d",
    "sphere_conv3d",
    "sphere_linear",
]
