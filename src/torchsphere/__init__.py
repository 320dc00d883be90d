"""torchsphere: hyperspherical learning for PyTorch.

Implements *Deep Hyperspherical Learning* (W. Liu et al., NIPS 2017, arXiv 1711.03189) — SphereConv, SphereNet,
GA-Softmax, SphereNorm — and its sibling methods (MHE, hyperspherical uniformity, orthonormality).
"""
from . import functional, nn
from .functional import angular_activation, orthonormal_penalty, sphere_conv1d, sphere_conv2d, sphere_conv3d, sphere_linear
from .nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

__version__ = "0.1.0"

__all__ = [
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
    "__version__",
    "angular_activation",
    "functional",
    "nn",
    "orthonormal_penalty",
    "sphere_conv1d",
    "sphere_conv2d",
    "sphere_conv3d",
    "sphere_linear",
]
