"""Functional core of torchsphere: pure tensor functions, no state."""
from ._checks import OPERATORS
from .conv import patch_norm_sq, sphere_conv1d, sphere_conv2d, sphere_conv3d
from .linear import sphere_linear
from .operators import ACOS_EPS, angular_activation, learnable_k, safe_acos
from .orthonormal import orthonormal_penalty

__all__ = [
    "ACOS_EPS",
    "OPERATORS",
    "angular_activation",
    "learnable_k",
    "orthonormal_penalty",
    "patch_norm_sq",
    "safe_acos",
    "sphere_conv1d",
    "sphere_conv2d",
    "sphere_conv3d",
    "sphere_linear",
]
